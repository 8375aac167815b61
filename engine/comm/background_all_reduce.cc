#include "comm/background_all_reduce.h"

#include <algorithm>
#include <chrono>

namespace llamad {

BackgroundAllReduce::BackgroundAllReduce(Communicator* comm, float* data, size_t bucket_elements)
    : comm_(comm), data_(data), bucket_elements_(std::max<size_t>(1, bucket_elements)),
      worker_([this] { Run(); }) {}

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
  {
    std::lock_guard lock(mu_);
    queue_.emplace_back(begin, end);
  }
  cv_.notify_one();
}

void BackgroundAllReduce::Run() {
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return !queue_.empty() || closing_; });
    if (queue_.empty()) return;  // closing and drained
    const auto [begin, end] = queue_.front();
    queue_.pop_front();
    const bool failed = !status_.ok();
    lock.unlock();
    // After a failure the rest is skipped: the peers are gone, and every rank stops.
    absl::Status s;
    if (!failed) {
      const auto start = std::chrono::steady_clock::now();
      s = comm_->AllReduceSum(data_ + begin, end - begin);
      busy_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    lock.lock();
    if (status_.ok() && !s.ok()) status_ = s;
  }
}

absl::Status BackgroundAllReduce::Finish() {
  if (finished_) return status_;
  if (pending_end_ > pending_begin_) Enqueue(pending_begin_, pending_end_);
  pending_begin_ = pending_end_ = 0;
  {
    std::lock_guard lock(mu_);
    closing_ = true;
  }
  cv_.notify_one();
  worker_.join();
  finished_ = true;
  return status_;
}

}  // namespace llamad
