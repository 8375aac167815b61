// Collectives on the buffers of one GPU (NCCL), ordered with its backend's own work:
// each starts once the backend's ops issued before it have finished, the backend's ops
// issued after it wait for it, and the calling thread does not wait for either. A failure
// (a lost peer, a collective that made no progress within the timeout) comes back from a
// later call; the caller stops training, as with any failed collective.
#pragma once

#include <cstddef>

#include "absl/status/status.h"
#include "core/dtype.h"

namespace llamad {

class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
  // In place: every rank ends with the element-wise sum over all ranks.
  virtual absl::Status AllReduceSum(void* buffer, size_t n, DType type) = 0;
  // Root's buffer to every rank.
  virtual absl::Status Broadcast(void* buffer, size_t n, DType type, int root) = 0;
  // The sum over all ranks into root's buffer, in place; the others' is left as it was.
  virtual absl::Status ReduceSum(void* buffer, size_t n, DType type, int root) = 0;
  // In place: each rank's EvenSlice of the n elements goes to every rank.
  virtual absl::Status AllGatherSlices(void* buffer, size_t n, DType type) = 0;

  // An all-reduce that the backend's later ops do not wait for until Join(), so that the
  // backward goes on computing while finished gradients are summed.
  virtual absl::Status AllReduceSumOverlapped(void* buffer, size_t n, DType type) = 0;
  // The backend's ops issued from now on wait for every collective issued so far.
  virtual absl::Status Join() = 0;

  // GPU time of the collectives that have finished so far, and the part of it after the
  // backward had finished at a Join (communication that nothing overlapped). Measured
  // with events on the GPU; exact once the backend has synchronized.
  virtual double busy_seconds() = 0;
  virtual double exposed_seconds() = 0;
};

}  // namespace llamad
