// A queue of file reads and writes on io_uring, several in flight at once.
//
// Sequential direct I/O at one request at a time leaves a disk idle between requests;
// with a few 1 MiB requests in flight it runs near its bandwidth (fio on this project's
// VM disk: 1.5 GB/s write at queue depth 1 against 2.5-2.7 GB/s at 2-4). Checkpoint
// shards and the NVMe tier's swap files both move their bytes through this queue.
//
// Each transfer carries a caller-chosen tag (a small integer, say a buffer's slot) so
// that the caller can wait for the requests of one buffer while others stay in flight.
// Short transfers are resubmitted for the rest; a request completes when all its bytes
// moved or it failed, and the first failure per tag is reported by Drain(tag).
//
// Where io_uring is not available (a container whose seccomp profile blocks it, the
// kernel.io_uring_disabled sysctl, or LLAMAD_IO_URING=0 in the environment) the queue
// moves each request at once with pread/pwrite, one at a time: slower, same results.
//
// Not thread-safe: one thread queues and drains.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

struct io_uring;
struct io_uring_sqe;

namespace llamad::storage {

class DirectIoQueue {
 public:
  // `fd` stays owned by the caller and must outlive the queue. `what` names the file in
  // errors ("the NVMe swap file", a shard's path). `block_bytes` is the largest request;
  // `queue_depth` (1..4096) the most requests in flight. A request that fails to move
  // is an error from Drain; a failure of the queue itself (io_uring) is Internal.
  static absl::StatusOr<std::unique_ptr<DirectIoQueue>> Create(int fd, std::string what, size_t block_bytes,
                                                               int queue_depth);
  // Waits for whatever is still in flight (after an error) before the buffers can go.
  ~DirectIoQueue();
  DirectIoQueue(const DirectIoQueue&) = delete;
  DirectIoQueue& operator=(const DirectIoQueue&) = delete;

  // Queues the transfer of `size` bytes between `data` and the file at `offset`, split
  // into requests of at most block_bytes, and submits them. Waits for completions only
  // when the queue is full. `data` must stay valid until Drain(tag) returns.
  absl::Status Queue(bool write, char* data, uint64_t offset, size_t size, size_t tag);
  // Waits for every request queued with `tag`. A failed or incomplete request is an
  // error that says what failed: DataLoss for a read (what should be there is not),
  // ResourceExhausted for a write to a full disk, Internal for any other write.
  absl::Status Drain(size_t tag);
  // Drains every tag; returns the first error.
  absl::Status DrainAll();

  uint64_t bytes_read() const { return bytes_read_; }
  uint64_t bytes_written() const { return bytes_written_; }
  // Whether requests move one at a time with pread/pwrite (no io_uring here).
  bool synchronous() const { return !ring_ready_; }

 private:
  DirectIoQueue(int fd, std::string what, size_t block_bytes, int queue_depth);
  struct Request {
    char* data = nullptr;
    uint64_t offset = 0;
    size_t length = 0;
    size_t tag = 0;
    bool write = false;
  };
  // Fills a submission entry from request `id` (io_uring user_data = id).
  void Prepare(io_uring_sqe* sqe, uint32_t id);
  // Reaps one completion, accounting it to its tag; a short transfer goes out again.
  absl::Status ReapOne();
  absl::Status Submit();
  // Without io_uring: moves the request now, recording a failure under its tag.
  void Transfer(const Request& request);
  // The first failure of a request under `tag`: `result` is what the last transfer
  // returned (-errno, 0 or the bytes moved), `left` the bytes it still had to move.
  void RecordFailure(const Request& request, long result, size_t left);

  int fd_;
  std::string what_;
  size_t block_bytes_;
  int queue_depth_;
  std::unique_ptr<io_uring> ring_;
  bool ring_ready_ = false;
  int in_flight_ = 0;
  std::vector<Request> requests_;        // indexed by id, queue_depth of them
  std::vector<uint32_t> free_requests_;  // ids not in flight
  std::vector<int> pending_;             // requests in flight per tag
  std::vector<absl::Status> errors_;     // the first failure per tag
  uint64_t bytes_read_ = 0, bytes_written_ = 0;
};

}  // namespace llamad::storage
