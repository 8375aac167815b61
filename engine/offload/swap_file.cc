#include "offload/swap_file.h"

#include <fcntl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "core/strings.h"

namespace llamad::offload {
namespace {

constexpr size_t kAlign = 4096;  // direct I/O: offsets, lengths and buffers

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

absl::StatusOr<std::unique_ptr<SwapFile>> SwapFile::Create(const std::string& dir, size_t bytes,
                                                           const SwapOptions& options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes % kAlign != 0 || options.block_bytes == 0 ||
      options.block_bytes % kAlign != 0) {
    return absl::InvalidArgumentError(StrCat("NVMe swap: chunk (", options.chunk_bytes, " bytes) and block (",
                                             options.block_bytes, " bytes) must be positive multiples of 4 KiB"));
  }
  if (options.block_bytes > (size_t{64} << 20)) {
    return absl::InvalidArgumentError(StrCat("NVMe swap: block of ", options.block_bytes, " bytes exceeds 64 MiB"));
  }
  if (options.queue_depth < 1 || options.queue_depth > 4096) {
    return absl::InvalidArgumentError(StrCat("NVMe swap: queue depth ", options.queue_depth, " is not in 1..4096"));
  }
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(StrCat(dir, ": no such folder for the NVMe swap file"));
  }
  bytes = RoundUp(std::max<size_t>(bytes, 1), kAlign);
  std::string path = (std::filesystem::path(dir) / "llamad-swap-XXXXXX").string();
  int fd = ::mkostemp(path.data(), O_CLOEXEC);
  if (fd < 0) {
    return absl::PermissionDeniedError(StrCat(dir, ": cannot create the NVMe swap file: ", std::strerror(errno)));
  }
  ::unlink(path.c_str());  // scratch: gone with the process, whatever happens
  // Direct I/O on the descriptor mkostemp made (not a reopen by name, which another user
  // of a shared folder could redirect).
  const int flags = ::fcntl(fd, F_GETFL);
  const int open_errno = flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_DIRECT) == 0 ? 0 : errno;
  if (open_errno != 0) {
    ::close(fd);
    fd = -1;
  }
  if (fd < 0) {
    return absl::FailedPreconditionError(
        open_errno == EINVAL
            ? StrCat(dir, ": this file system cannot do direct I/O (O_DIRECT; tmpfs and some network file systems "
                          "cannot); put the NVMe swap on a local disk")
            : StrCat(dir, ": cannot open the NVMe swap file with O_DIRECT: ", std::strerror(open_errno)));
  }
  auto fail = [&](absl::Status s) {
    ::close(fd);
    return s;
  };
  if (::fallocate(fd, 0, 0, off_t(bytes)) != 0) {
    const int e = errno;
    struct statvfs vfs {};
    const double free_bytes = ::fstatvfs(fd, &vfs) == 0 ? double(vfs.f_bavail) * double(vfs.f_frsize) : 0;
    auto no_space = [&] {
      return fail(absl::ResourceExhaustedError(StrCat(dir, ": not enough free space for the NVMe swap: it needs ",
                                                      BytesForPeople(bytes), ", ", BytesForPeople(free_bytes),
                                                      " are free")));
    };
    if (e == ENOSPC || e == EFBIG) return no_space();
    if (e != EOPNOTSUPP) {
      return fail(absl::InternalError(StrCat(dir, ": cannot allocate the NVMe swap file: ", std::strerror(e))));
    }
    // No fallocate here: size the file, and check the space instead.
    if (free_bytes < double(bytes)) return no_space();
    if (::ftruncate(fd, off_t(bytes)) != 0) {
      return fail(absl::InternalError(StrCat(dir, ": cannot size the NVMe swap file: ", std::strerror(errno))));
    }
  }
  // A file system whose direct I/O needs more than 4 KiB alignment fails here, at start.
  alignas(kAlign) static const char kZeros[kAlign] = {};
  const ssize_t wrote = ::pwrite(fd, kZeros, kAlign, 0);
  const int probe_errno = errno;
  if (wrote != ssize_t(kAlign)) {
    return fail(absl::FailedPreconditionError(
        StrCat(dir, ": a 4 KiB direct write to the NVMe swap file failed (", std::strerror(probe_errno),
               "); its file system needs larger or other alignment")));
  }
  std::unique_ptr<SwapFile> swap(new SwapFile(path, fd, bytes, options));
  auto io = storage::DirectIoQueue::Create(fd, "the NVMe swap file", options.block_bytes, options.queue_depth);
  if (!io.ok()) return io.status();
  swap->io_ = *std::move(io);
  for (int i = 0; i < 3; ++i) {
    swap->buffers_.emplace_back(static_cast<char*>(std::aligned_alloc(kAlign, options.chunk_bytes)), &std::free);
    if (!swap->buffers_.back()) {
      return absl::ResourceExhaustedError(
          StrCat("NVMe swap: cannot allocate ", BytesForPeople(double(options.chunk_bytes)), " chunk buffers"));
    }
  }
  return swap;
}

SwapFile::SwapFile(std::string path, int fd, size_t bytes, const SwapOptions& options)
    : path_(std::move(path)), fd_(fd), bytes_(bytes), options_(options) {}

SwapFile::~SwapFile() {
  io_.reset();  // requests still in flight (after an error) finish before the buffers go
  if (fd_ >= 0) ::close(fd_);
}

size_t SwapFile::chunk_size(size_t i) const {
  return std::min(options_.chunk_bytes, bytes_ - i * options_.chunk_bytes);
}

absl::Status SwapFile::Queue(bool write, size_t chunk, size_t slot) {
  return io_->Queue(write, buffers_[slot].get(), chunk * options_.chunk_bytes, chunk_size(chunk), slot);
}

absl::Status SwapFile::Stream(const std::function<void(size_t, char*)>& update, Mode mode) {
  const size_t n = num_chunks();
  const bool read = mode != Mode::kWrite, write = mode != Mode::kRead;
  auto slot = [](size_t i) { return i % 3; };
  absl::Status status = read ? Queue(false, 0, slot(0)) : absl::OkStatus();
  for (size_t i = 0; status.ok() && i < n; ++i) {
    if (i + 1 < n) {
      // Its buffer last held chunk i-2, whose write must be done before reading into it.
      status = io_->Drain(slot(i + 1));
      if (status.ok() && read) status = Queue(false, i + 1, slot(i + 1));
    }
    if (status.ok()) status = io_->Drain(slot(i));
    if (!status.ok()) break;
    update(i, buffers_[slot(i)].get());
    if (write) status = Queue(true, i, slot(i));
  }
  // Whatever happened, nothing may stay in flight past this call.
  auto drained = io_->DrainAll();
  return status.ok() ? drained : status;
}

}  // namespace llamad::offload
