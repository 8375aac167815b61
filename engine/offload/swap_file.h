// The NVMe tier: a scratch file that holds state too large for memory (the optimizer's
// moments), read and written in fixed-size chunks with io_uring and O_DIRECT.
//
// A swap file is scratch: it is unlinked as soon as it is created, so it disappears
// with the process however that ends; checkpoints, not swap, are what survives.
//
// Stream() runs the update pipeline: while chunk i is updated in memory, chunk i+1 is
// being read and chunk i-1 written, each split into `block_bytes` requests with up to
// `queue_depth` of them in flight.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "storage/direct_io.h"

namespace llamad::offload {

struct SwapOptions {
  size_t chunk_bytes = 64 << 20;  // what one update step of the pipeline works on
  size_t block_bytes = 1 << 20;   // one read or write request (a multiple of 4 KiB)
  int queue_depth = 32;           // requests in flight
};

class SwapFile {
 public:
  // Creates (and unlinks) a swap file of `bytes` in folder `dir`, allocating its blocks
  // up front. Errors name the folder and say what is wrong: it does not exist, its file
  // system cannot do direct I/O (tmpfs, some network file systems), or it has not
  // enough free space.
  static absl::StatusOr<std::unique_ptr<SwapFile>> Create(const std::string& dir, size_t bytes,
                                                          const SwapOptions& options);
  ~SwapFile();
  SwapFile(const SwapFile&) = delete;
  SwapFile& operator=(const SwapFile&) = delete;

  size_t size() const { return bytes_; }
  size_t chunk_bytes() const { return options_.chunk_bytes; }
  size_t num_chunks() const { return (bytes_ + options_.chunk_bytes - 1) / options_.chunk_bytes; }
  // Bytes of chunk `i` (the last one may be shorter).
  size_t chunk_size(size_t i) const;

  // kUpdate: read each chunk, update it, write it back. kRead: no write back. kWrite: no
  // read (update fills the chunk).
  enum class Mode { kUpdate, kRead, kWrite };
  // For every chunk in order: calls update(i, data) on it (4 KiB aligned, chunk_size(i)
  // bytes), with the chunk read first and written after as `mode` says. Reads run ahead
  // and writes behind the update, so the disk and the update overlap.
  // A failed request is an error naming what failed (DirectIoQueue::Drain: DataLoss for
  // a read, ResourceExhausted for a full disk).
  absl::Status Stream(const std::function<void(size_t chunk, char* data)>& update, Mode mode = Mode::kUpdate);

  // Bytes moved by Stream so far.
  uint64_t bytes_read() const { return io_->bytes_read(); }
  uint64_t bytes_written() const { return io_->bytes_written(); }
  // Whether requests move one at a time with pread/pwrite (io_uring is blocked here).
  bool synchronous() const { return io_->synchronous(); }

 private:
  SwapFile(std::string path, int fd, size_t bytes, const SwapOptions& options);
  // Queues one chunk's requests (read or write) for buffer `slot` (the queue's tag).
  absl::Status Queue(bool write, size_t chunk, size_t slot);

  std::string path_;
  int fd_ = -1;
  size_t bytes_ = 0;
  SwapOptions options_;
  // Three chunk buffers: reading ahead, being updated, being written. Declared before
  // the queue, so that the queue (which waits for requests in flight) goes first.
  std::vector<std::unique_ptr<char, void (*)(void*)>> buffers_;
  std::unique_ptr<storage::DirectIoQueue> io_;
};

}  // namespace llamad::offload
