// Collectives on a backend's f32 or bf16 buffers. The CPU backend's buffers are host
// memory and go to the communicator as they are. A GPU's go to the communicator's device
// collectives (NCCL, comm/nccl_communicator.h) where it has them, ordered on the GPU with
// the backend's ops; otherwise they are staged through host memory as f32 (exact for
// bf16 values) over the same Gloo transport as CPU ranks, every byte crossing PCIe and
// TCP, with the calling thread waiting.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/device_collectives.h"

namespace llamad {

// Whether the backend's buffers are host memory a communicator can use directly.
bool BuffersInHostMemory(const Backend& backend);
// The communicator's collectives on the backend's own (GPU) buffers, or null: host
// buffers, or a communicator without them.
DeviceCollectives* DeviceCollectivesFor(Communicator& comm, const Backend& backend);

// In-place sum over all ranks of n elements of `buffer`.
absl::Status AllReduceSumOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n);
// Copies root's n elements of `buffer` to every rank.
absl::Status BroadcastOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n, int root);
// Sums n elements of `data` over all ranks and adds the sum into root's `into` (n
// elements; the other ranks' is untouched), over the host communicator (GPU buffers
// through host memory). Every rank's `data` is scratch afterwards.
absl::Status ReduceAddOnBackend(Communicator& comm, Backend& backend, void* data, size_t n, int root, void* into);
// Reduce-scatter, adding: `data` holds elements [begin, end) of a flat range of n that the
// ranks own in EvenSlices. Each rank's part of it is summed over all ranks and added into
// `own`, this rank's part (null when it has none). Every rank's `data` is scratch after.
absl::Status ReduceScatterAddOnBackend(Communicator& comm, Backend& backend, void* data, size_t begin, size_t end,
                                       size_t n, void* own);
// All-gather in place: `buffer` holds elements [begin, end) of a flat range of n that the
// ranks own in EvenSlices, and each rank's part of it goes to every rank. With NCCL all
// parts go in one launch, ordered with the backend's ops by `order`; otherwise one
// broadcast per part, the calling thread waiting.
absl::Status GatherPartsOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t begin, size_t end,
                                  size_t n, Ordering order = Ordering::kInline);

}  // namespace llamad
