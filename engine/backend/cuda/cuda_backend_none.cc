// The CUDA entry points of a build without nvcc: there is no device to use.
#include "backend/cuda/cuda_backend_impl.h"

#include <cstdio>
#include <cstdlib>

namespace llamad {

bool CudaBackendBuilt() { return false; }
int CudaDeviceCount() { return 0; }
bool CudaDeviceVanished() { return false; }
std::string CudaDeviceDescription(int) { return "no CUDA backend in this build"; }
double CudaPeakBf16Flops(int) { return 0; }
bool CudnnAttentionAvailable(int, std::string* why) {
  *why = "this build has no CUDA backend";
  return false;
}
bool CudaStreamOf(Backend&, int*, void**) { return false; }
std::unique_ptr<Backend> NewCudaBackend(const CudaBackendOptions&) {
  std::fprintf(stderr, "llamad: this build has no CUDA backend\n");
  std::abort();
}

}  // namespace llamad
