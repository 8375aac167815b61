#include "comm/backend_collectives.h"

#include <functional>
#include <vector>

namespace llamad {
namespace {

// Runs `collective` on the buffer's values in host f32 memory.
absl::Status OnHost(Backend& backend, void* buffer, size_t n,
                    const std::function<absl::Status(float*)>& collective) {
  if (BuffersInHostMemory(backend)) return collective(static_cast<float*>(buffer));
  std::vector<float> host(n);
  backend.DownloadF32(host.data(), buffer, n);
  if (auto s = collective(host.data()); !s.ok()) return s;
  backend.UploadF32(buffer, host.data(), n);
  return absl::OkStatus();
}

}  // namespace

bool BuffersInHostMemory(const Backend& backend) {
  return backend.name() == "cpu" && backend.accum_dtype() == DType::kF32;
}

absl::Status AllReduceSumOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n) {
  return OnHost(backend, buffer, n, [&](float* data) { return comm.AllReduceSum(data, n); });
}

absl::Status BroadcastOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n, int root) {
  return OnHost(backend, buffer, n, [&](float* data) { return comm.Broadcast(data, n, root); });
}

}  // namespace llamad
