#include "comm/backend_collectives.h"

#include <functional>
#include <vector>

#include "comm/device_collectives.h"

namespace llamad {
namespace {


// Host f32 memory for staging n elements, kept between calls: staged collectives run
// every step, and the largest is the whole gradient.
float* Staging(size_t n) {
  thread_local std::vector<float> host;
  if (host.size() < n) host.resize(n);
  return host.data();
}

// Runs `collective` on the buffer's values in host f32 memory. Without `download` the
// collective only writes the staging (a broadcast's receivers), so nothing comes down.
absl::Status OnHost(Backend& backend, void* buffer, size_t n, bool download,
                    const std::function<absl::Status(float*)>& collective) {
  if (BuffersInHostMemory(backend)) return collective(static_cast<float*>(buffer));
  float* host = Staging(n);
  if (download) backend.DownloadF32(host, buffer, n);
  if (auto s = collective(host); !s.ok()) return s;
  backend.UploadF32(buffer, host, n);
  return absl::OkStatus();
}

}  // namespace

DeviceCollectives* DeviceCollectivesFor(Communicator& comm, const Backend& backend) {
  return BuffersInHostMemory(backend) ? nullptr : comm.device_collectives();
}

bool BuffersInHostMemory(const Backend& backend) {
  return backend.name() == "cpu" && backend.accum_dtype() == DType::kF32;
}

absl::Status AllReduceSumOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n) {
  if (auto* device = DeviceCollectivesFor(comm, backend)) return device->AllReduceSum(buffer, n, backend.BufferType(buffer, n));
  return OnHost(backend, buffer, n, true, [&](float* data) { return comm.AllReduceSum(data, n); });
}

absl::Status BroadcastOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n, int root) {
  if (auto* device = DeviceCollectivesFor(comm, backend)) {
    return device->Broadcast(buffer, n, backend.BufferType(buffer, n), root);
  }
  return OnHost(backend, buffer, n, comm.rank() == root, [&](float* data) { return comm.Broadcast(data, n, root); });
}

absl::Status ReduceAddOnBackend(Communicator& comm, Backend& backend, void* data, size_t n, int root, void* into) {
  const bool root_here = comm.rank() == root;
  if (BuffersInHostMemory(backend)) {
    // A plain loop, not the backend: this runs on a helper thread beside the backward.
    float* sum = static_cast<float*>(data);
    if (auto s = comm.ReduceSum(sum, n, root); !s.ok() || !root_here) return s;
    float* total = static_cast<float*>(into);
    for (size_t i = 0; i < n; ++i) total[i] += sum[i];
    return absl::OkStatus();
  }
  float* host = Staging(n);
  backend.DownloadF32(host, data, n);
  if (auto s = comm.ReduceSum(host, n, root); !s.ok() || !root_here) return s;
  backend.UploadF32(data, host, n);
  backend.Add(into, data, n);  // root: data now holds the sum
  return absl::OkStatus();
}

absl::Status ReduceScatterAddOnBackend(Communicator& comm, Backend& backend, void* data, size_t begin, size_t end,
                                       size_t n, void* own) {
  const std::vector<OwnedPart> parts = OwnedParts(begin, end, n, comm.world_size());
  const DType type = backend.BufferType(data, end - begin);
  auto at = [&](const OwnedPart& p) { return static_cast<char*>(data) + p.offset * DTypeSize(type); };
  if (auto* device = DeviceCollectivesFor(comm, backend)) {
    if (auto s = device->ReduceScatter(data, parts, type); !s.ok()) return s;
    for (const OwnedPart& p : parts) {
      if (p.owner == comm.rank()) backend.Add(own, at(p), p.count);
    }
    return absl::OkStatus();
  }
  // Through the host communicator: one reduce per owner.
  for (const OwnedPart& p : parts) {
    if (auto s = ReduceAddOnBackend(comm, backend, at(p), p.count, p.owner, p.owner == comm.rank() ? own : nullptr);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status GatherPartsOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t begin, size_t end,
                                  size_t n, Ordering order) {
  const std::vector<OwnedPart> parts = OwnedParts(begin, end, n, comm.world_size());
  const DType type = backend.BufferType(buffer, end - begin);
  if (auto* device = DeviceCollectivesFor(comm, backend)) return device->GatherParts(buffer, parts, type, order);
  for (const OwnedPart& p : parts) {
    void* part = static_cast<char*>(buffer) + p.offset * DTypeSize(type);
    if (auto s = BroadcastOnBackend(comm, backend, part, p.count, p.owner); !s.ok()) return s;
  }
  return absl::OkStatus();
}

}  // namespace llamad
