#include "comm/background_all_reduce.h"

#include <algorithm>
#include <chrono>

namespace llamad {

BackgroundAllReduce::BackgroundAllReduce(Communicator* comm, float* data, size_t bucket_elements)
    : comm_(comm), data_(data), bucket_elements_(std::max<size_t>(1, bucket_elements)),
      worker_(std::make_unique<SerialWorker>()) {}

BackgroundAllReduce::BackgroundAllReduce(DeviceCollectives* device, void* data, DType type, size_t bucket_elements)
    : device_(device), data_(data), type_(type), bucket_elements_(std::max<size_t>(1, bucket_elements)) {}

BackgroundAllReduce::~BackgroundAllReduce() {
  if (!finished_) Finish().IgnoreError();
}

void BackgroundAllReduce::Add(size_t begin, size_t end) {
  if (pending_end_ > pending_begin_ && end == pending_begin_) {
    pending_begin_ = begin;  // extends the merged range downwards
  } else {
    if (pending_end_ > pending_begin_) Enqueue(pending_begin_, pending_end_);
    pending_begin_ = begin;
    pending_end_ = end;
  }
  if (pending_end_ - pending_begin_ >= bucket_elements_) {
    Enqueue(pending_begin_, pending_end_);
    pending_begin_ = pending_end_ = 0;
  }
}

void BackgroundAllReduce::Enqueue(size_t begin, size_t end) {
  if (device_ != nullptr) {
    // Issuing only queues the collective on the GPU: no need for a thread.
    if (status_.ok()) {
      status_ = device_->AllReduceSum(static_cast<char*>(data_) + begin * DTypeSize(type_), end - begin, type_,
                                      Ordering::kBeside);
    }
    return;
  }
  worker_->Post([this, begin, end] {
    // After a failure the rest is skipped: the peers are gone, and every rank stops.
    if (!status_.ok()) return;
    const auto start = std::chrono::steady_clock::now();
    status_ = comm_->AllReduceSum(static_cast<float*>(data_) + begin, end - begin);
    busy_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
}

absl::Status BackgroundAllReduce::Finish() {
  if (finished_) return status_;
  if (pending_end_ > pending_begin_) Enqueue(pending_begin_, pending_end_);
  pending_begin_ = pending_end_ = 0;
  finished_ = true;
  if (device_ != nullptr) {
    // Even after a failure: the backend must not run ahead of what was already queued.
    absl::Status joined = device_->Join();
    if (status_.ok()) status_ = joined;
  } else {
    worker_.reset();  // runs what was queued, then stops
  }
  return status_;
}

}  // namespace llamad
