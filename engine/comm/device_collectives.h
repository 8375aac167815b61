// Collectives on the buffers of one GPU (NCCL), ordered with its backend's own work:
// each starts once the backend's ops issued before it have finished, the backend's ops
// issued after it wait for it, and the calling thread does not wait for either. A failure
// (a lost peer, a collective that made no progress within the timeout) comes back from a
// later call; the caller stops training, as with any failed collective.
#pragma once

#include <cstddef>

#include <vector>

#include "absl/status/status.h"
#include "comm/communicator.h"
#include "core/dtype.h"

namespace llamad {

// How a collective is ordered with the backend's later ops. kInline: they wait for it.
// kBeside: they run beside it until Join(), so that the backward goes on computing while
// finished gradients are reduced, or the next region's parameters are gathered.
enum class Ordering { kInline, kBeside };

class DeviceCollectives {
 public:
  virtual ~DeviceCollectives() = default;
  // In place: every rank ends with the element-wise sum over all ranks.
  virtual absl::Status AllReduceSum(void* buffer, size_t n, DType type, Ordering order = Ordering::kInline) = 0;
  // Root's buffer to every rank.
  virtual absl::Status Broadcast(void* buffer, size_t n, DType type, int root,
                                 Ordering order = Ordering::kInline) = 0;
  // In place: each part of the buffer goes from its owner to every rank (an all-gather
  // whose parts may differ in size, which ncclAllGather does not allow: one broadcast per
  // part, all in one launch).
  virtual absl::Status GatherParts(void* buffer, const std::vector<OwnedPart>& parts, DType type,
                                   Ordering order = Ordering::kInline) = 0;
  // Reduce-scatter in place: each part of the buffer is summed over the ranks into its
  // owner's buffer. The parts may differ in size (EvenSlices), which ncclReduceScatter
  // does not allow: one reduce per part, all in one launch.
  virtual absl::Status ReduceScatter(void* buffer, const std::vector<OwnedPart>& parts, DType type,
                                     Ordering order = Ordering::kInline) = 0;
  // The backend's ops issued from now on wait for every collective issued so far.
  virtual absl::Status Join() = 0;
  // A ticket for the collective issued last (0 before any), and the Join of that one
  // alone: the backend's later ops wait for it (and for those before it: they run in
  // order) but not for collectives issued after it, such as a reduction issued while a
  // prefetched gather was in flight.
  virtual uint64_t last_ticket() = 0;
  virtual absl::Status JoinCollective(uint64_t ticket) = 0;
  // The first failure so far. A collective that fails after it was issued (a peer lost
  // mid-way, a watchdog abort) leaves void results behind: check this once the backend
  // has synchronized, before results are used for anything that lasts.
  virtual absl::Status status() = 0;

  // GPU time of the collectives that have finished so far, and the part of it the
  // backend waited for: all of an inline collective's, and of those beside it what was
  // still running when the backend reached a Join. Measured with events on the GPU;
  // exact once the backend has synchronized.
  virtual double busy_seconds() = 0;
  virtual double exposed_seconds() = 0;
};

}  // namespace llamad
