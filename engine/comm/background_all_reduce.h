// Gradient all-reduce overlapped with the backward: ranges are summed in the order they
// were queued (the same order on every rank) while the caller goes on computing. Host
// buffers are summed on a worker thread; a GPU's go to its device collectives (NCCL),
// whose stream runs beside the backend's.
#pragma once

#include <memory>

#include "comm/communicator.h"
#include "comm/device_collectives.h"
#include "core/dtype.h"
#include "core/serial_worker.h"

namespace llamad {

class BackgroundAllReduce {
 public:
  // Sums data[begin, end) over the ranks for every range queued; `data` is host f32.
  BackgroundAllReduce(Communicator* comm, float* data, size_t bucket_elements);
  // The same for GPU buffers of `type`, with `device`'s collectives: the backend's ops
  // after Finish() wait for them.
  BackgroundAllReduce(DeviceCollectives* device, void* data, DType type, size_t bucket_elements);
  ~BackgroundAllReduce();  // Finish() if the caller did not

  // Queues a range; adjacent ranges (queued from the back of the buffer to the front)
  // are merged until they hold at least bucket_elements, then go out as one collective.
  void Add(size_t begin, size_t end);
  // Sends what is still merged, waits for every queued collective (host) or orders the
  // backend after them (GPU), and returns the first error.
  absl::Status Finish();
  // Seconds the worker spent inside collectives (read after Finish; host buffers only:
  // the device collectives measure their own).
  double busy_seconds() const { return busy_seconds_; }

 private:
  void Enqueue(size_t begin, size_t end);

  Communicator* comm_ = nullptr;
  DeviceCollectives* device_ = nullptr;
  void* data_;
  DType type_ = DType::kF32;
  size_t bucket_elements_;
  size_t pending_begin_ = 0, pending_end_ = 0;  // merged, not yet queued
  bool finished_ = false;
  // Touched only by the worker until Finish has stopped it.
  absl::Status status_;
  double busy_seconds_ = 0;
  std::unique_ptr<SerialWorker> worker_;  // host buffers; null once finished
};

}  // namespace llamad
