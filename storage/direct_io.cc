#include "storage/direct_io.h"

#include <fmt/format.h>
#include <liburing.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>

namespace llamad::storage {

absl::StatusOr<std::unique_ptr<DirectIoQueue>> DirectIoQueue::Create(int fd, std::string what, size_t block_bytes,
                                                                     int queue_depth) {
  if (block_bytes == 0 || block_bytes > (size_t{1} << 30)) {
    return absl::InvalidArgumentError(fmt::format("{}: I/O block of {} bytes is not in 1 B..1 GiB", what, block_bytes));
  }
  if (queue_depth < 1 || queue_depth > 4096) {
    return absl::InvalidArgumentError(fmt::format("{}: queue depth {} is not in 1..4096", what, queue_depth));
  }
  std::unique_ptr<DirectIoQueue> queue(new DirectIoQueue(fd, std::move(what), block_bytes, queue_depth));
  const char* allowed = std::getenv("LLAMAD_IO_URING");
  if (allowed == nullptr || std::string(allowed) != "0") {
    // Unavailable (ENOSYS, EPERM under seccomp or the sysctl): one request at a time.
    queue->ring_ready_ = ::io_uring_queue_init(unsigned(queue_depth), queue->ring_.get(), 0) == 0;
  }
  return queue;
}

DirectIoQueue::DirectIoQueue(int fd, std::string what, size_t block_bytes, int queue_depth)
    : fd_(fd),
      what_(std::move(what)),
      block_bytes_(block_bytes),
      queue_depth_(queue_depth),
      ring_(std::make_unique<io_uring>()),
      requests_(size_t(queue_depth)) {
  for (uint32_t id = uint32_t(queue_depth); id > 0; --id) free_requests_.push_back(id - 1);
}

DirectIoQueue::~DirectIoQueue() {
  if (!ring_ready_) return;
  while (in_flight_ > 0 && ReapOne().ok()) {
  }
  ::io_uring_queue_exit(ring_.get());
}

void DirectIoQueue::Prepare(io_uring_sqe* sqe, uint32_t id) {
  const Request& r = requests_[id];
  if (r.write) {
    ::io_uring_prep_write(sqe, fd_, r.data, unsigned(r.length), r.offset);
  } else {
    ::io_uring_prep_read(sqe, fd_, r.data, unsigned(r.length), r.offset);
  }
  ::io_uring_sqe_set_data64(sqe, id);
}

absl::Status DirectIoQueue::Submit() {
  if (const int r = ::io_uring_submit(ring_.get()); r < 0) {
    return absl::InternalError(fmt::format("{}: io_uring submit failed: {}", what_, std::strerror(-r)));
  }
  return absl::OkStatus();
}

absl::Status DirectIoQueue::ReapOne() {
  io_uring_cqe* cqe = nullptr;
  int r;
  do {
    // Submits anything a short submit left in the queue, then waits for a completion.
    r = ::io_uring_submit_and_wait(ring_.get(), 1);
    if (r >= 0) r = ::io_uring_peek_cqe(ring_.get(), &cqe);
  } while (r == -EINTR || r == -EAGAIN);
  if (r < 0) return absl::InternalError(fmt::format("{}: io_uring wait failed: {}", what_, std::strerror(-r)));
  const uint32_t id = uint32_t(::io_uring_cqe_get_data64(cqe));
  const int result = cqe->res;
  ::io_uring_cqe_seen(ring_.get(), cqe);
  Request& request = requests_[id];
  (request.write ? bytes_written_ : bytes_read_) += uint64_t(std::max(result, 0));
  if (result > 0 && size_t(result) < request.length) {
    // A short transfer: the rest goes out again, as the same request. Its entry in the
    // submission queue was consumed (the queue was flushed before the wait), so there is
    // room.
    io_uring_sqe* sqe = ::io_uring_get_sqe(ring_.get());
    if (sqe == nullptr) {
      return absl::InternalError(fmt::format("{}: io_uring has no room to resubmit a short transfer", what_));
    }
    request.data += result;
    request.offset += uint64_t(result);
    request.length -= size_t(result);
    Prepare(sqe, id);
    return Submit();
  }
  --in_flight_;
  --pending_[request.tag];
  free_requests_.push_back(id);
  if (size_t(std::max(result, 0)) != request.length) RecordFailure(request, result, request.length);
  return absl::OkStatus();
}

void DirectIoQueue::RecordFailure(const Request& request, long result, size_t left) {
  if (!errors_[request.tag].ok()) return;
  std::string failure;
  if (result < 0) {
    failure = std::strerror(int(-result));
  } else if (result == 0 && !request.write) {
    failure = fmt::format("the file ends before byte {}: it is shorter than expected", request.offset);
  } else {
    failure = fmt::format("moved {} of the {} bytes left", result, left);
  }
  const std::string message = fmt::format("{} {}: {}{}", request.write ? "writing" : "reading", what_, failure,
                                          result == -ENOSPC ? " (the disk is full)" : "");
  // What was read back is damaged or missing; a write that failed damaged nothing
  // already written, and is this machine's failure (or a full disk).
  errors_[request.tag] = !request.write       ? absl::DataLossError(message)
                         : result == -ENOSPC  ? absl::ResourceExhaustedError(message)
                                              : absl::InternalError(message);
}

void DirectIoQueue::Transfer(const Request& request) {
  char* data = request.data;
  uint64_t offset = request.offset;
  size_t left = request.length;
  while (left > 0) {
    const ssize_t n = request.write ? ::pwrite(fd_, data, left, off_t(offset)) : ::pread(fd_, data, left, off_t(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      RecordFailure(request, n < 0 ? -long(errno) : 0, left);
      return;
    }
    (request.write ? bytes_written_ : bytes_read_) += uint64_t(n);
    data += n;
    offset += uint64_t(n);
    left -= size_t(n);
  }
}

absl::Status DirectIoQueue::Queue(bool write, char* data, uint64_t offset, size_t size, size_t tag) {
  if (tag >= pending_.size()) {
    pending_.resize(tag + 1, 0);
    errors_.resize(tag + 1);
  }
  if (!ring_ready_) {
    for (size_t done = 0; done < size; done += block_bytes_) {
      Transfer({data + done, offset + done, std::min(block_bytes_, size - done), tag, write});
    }
    return absl::OkStatus();
  }
  for (size_t done = 0; done < size;) {
    const size_t length = std::min(block_bytes_, size - done);
    io_uring_sqe* sqe = in_flight_ < queue_depth_ ? ::io_uring_get_sqe(ring_.get()) : nullptr;
    if (sqe == nullptr) {  // the queue is full: send what is queued, then make room
      if (auto s = Submit(); !s.ok()) return s;
      if (auto s = ReapOne(); !s.ok()) return s;
      continue;
    }
    const uint32_t id = free_requests_.back();  // in_flight_ < queue_depth_: one is free
    free_requests_.pop_back();
    requests_[id] = {data + done, offset + done, length, tag, write};
    Prepare(sqe, id);
    ++in_flight_;
    ++pending_[tag];
    done += length;
  }
  return Submit();
}

absl::Status DirectIoQueue::Drain(size_t tag) {
  if (tag >= pending_.size()) return absl::OkStatus();
  while (pending_[tag] > 0) {
    if (auto s = ReapOne(); !s.ok()) return s;
  }
  absl::Status error;
  std::swap(error, errors_[tag]);
  return error;
}

absl::Status DirectIoQueue::DrainAll() {
  absl::Status status;
  for (size_t tag = 0; tag < pending_.size(); ++tag) {
    auto drained = Drain(tag);
    if (status.ok()) status = drained;
  }
  return status;
}

}  // namespace llamad::storage
