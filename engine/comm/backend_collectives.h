// Collectives on a backend's f32 or bf16 buffers. The CPU backend's buffers are host
// memory and go to the communicator as they are; a GPU's are staged through host memory
// as f32 (exact for bf16 values), so that GPU ranks reduce over the same Gloo transport
// as CPU ranks. That staging is the correct-first path: every byte crosses PCIe and TCP
// once per step, after the backward rather than overlapped with it.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "backend/backend.h"
#include "comm/communicator.h"

namespace llamad {

// Whether the backend's buffers are host memory a communicator can use directly.
bool BuffersInHostMemory(const Backend& backend);

// In-place sum over all ranks of n elements of `buffer`.
absl::Status AllReduceSumOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n);
// Copies root's n elements of `buffer` to every rank.
absl::Status BroadcastOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n, int root);
// Sums n elements of `data` over all ranks and adds the sum into root's `into` (n
// elements; the other ranks' is untouched). Every rank's `data` is scratch afterwards.
absl::Status ReduceAddOnBackend(Communicator& comm, Backend& backend, void* data, size_t n, int root, void* into);
// In place: each rank's EvenSlice of the n elements of `buffer` goes to every rank.
absl::Status AllGatherSlicesOnBackend(Communicator& comm, Backend& backend, void* buffer, size_t n);

}  // namespace llamad
