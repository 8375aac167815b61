// What cuda_backend.cu gives the C++ side (no absl, no CUDA headers: nvcc compiles the
// one, the host compiler the other).
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace llamad {

// Which attention kernels the backend runs. kAuto: cuDNN's fused attention where cuDNN
// is installed and has an engine for the shape, the backend's own flash kernels
// otherwise. kCudnn: cuDNN only (MakeCudaBackend fails without it). kLlamad: the own
// kernels only.
enum class CudaAttention { kAuto, kCudnn, kLlamad };

// bf16 uploads and downloads go through an f32 staging buffer on the device in pieces of
// at most this many elements, so that copying a whole model's parameters holds no
// model-sized scratch (the memory planner counts it).
constexpr size_t kCudaStagingElements = size_t{16} << 20;

struct CudaBackendOptions {
  int device = 0;
  CudaAttention attention = CudaAttention::kAuto;
  // The fused LM head holds at most this many f32 logits (plus as many bf16 gradients).
  size_t lm_head_chunk_elements = size_t{64} << 20;
  // AttentionArgs::backward_stages of the own kernels: 0 as many as fit; 1 runs, on any
  // GPU, the path that GPUs with less shared memory take (for tests).
  int attention_backward_stages = 0;
};

// Whether this binary was built with the CUDA backend.
bool CudaBackendBuilt();
// Number of CUDA devices present (0 without a driver, a device, or CUDA in the build).
int CudaDeviceCount();
// Whether the CUDA driver runs and reports that no device is there (cudaErrorNoDevice):
// where this process was given a GPU, it is gone. False without a driver (or one too
// old for this build): that is the machine's setup, not a failed GPU.
bool CudaDeviceVanished();
// "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 81559 MiB)", or "no CUDA device".
std::string CudaDeviceDescription(int device = 0);
// Dense bf16 peak of the device in FLOP/s for MFU: the datasheet figure of known parts,
// otherwise a measured large GEMM.
double CudaPeakBf16Flops(int device = 0);

// Whether cuDNN's fused attention can run on GPU `device` (which becomes the current
// device); the reason in `why` when not.
bool CudnnAttentionAvailable(int device, std::string* why);

// Creates the backend on an existing device (MakeCudaBackend checks that first).
std::unique_ptr<Backend> NewCudaBackend(const CudaBackendOptions& options);

// The device and the stream (a cudaStream_t) that a CUDA backend runs its ops on, for
// work that must be ordered with them (NCCL's collectives); false for other backends.
bool CudaStreamOf(Backend& backend, int* device, void** stream);

}  // namespace llamad
