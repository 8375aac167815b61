#include "storage/files.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

namespace llamad::storage {
namespace {

absl::Status ErrnoError(const std::string& path, const char* what, int error = errno) {
  return absl::InternalError(path + ": " + what + ": " + std::strerror(error));
}

// Opens `path` (a file or a folder), syncs it and closes it.
absl::Status Sync(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | flags);
  if (fd < 0) return ErrnoError(path, "cannot open");
  const int error = ::fsync(fd) == 0 ? 0 : errno;
  ::close(fd);
  return error == 0 ? absl::OkStatus() : ErrnoError(path, "fsync failed", error);
}

// Writes `bytes` to `path` (replacing it), synced to disk when `sync`. A failure removes
// the file, so no partial one is left.
absl::Status Write(const std::string& path, std::string_view bytes, bool sync) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(path, "cannot create");
  absl::Status status;
  for (size_t done = 0; done < bytes.size() && status.ok();) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) status = ErrnoError(path, "write failed", n < 0 ? errno : EIO);
    done += size_t(std::max<ssize_t>(n, 0));
  }
  if (sync && status.ok() && ::fsync(fd) != 0) status = ErrnoError(path, "fsync failed");
  if (::close(fd) != 0 && status.ok()) status = ErrnoError(path, "close failed");
  if (!status.ok()) ::unlink(path.c_str());
  return status;
}

// Renames the synced file `tmp` over `path` and syncs the folder, which makes the rename
// itself durable. A failed rename removes `tmp`.
absl::Status RenameDurably(const std::string& tmp, const std::string& path) {
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const absl::Status status = ErrnoError(path, "cannot rename");
    ::unlink(tmp.c_str());
    return status;
  }
  const std::string dir = std::filesystem::path(path).parent_path().string();
  return SyncFolder(dir.empty() ? "." : dir);
}

}  // namespace

absl::Status CreateFolders(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (!ec) return absl::OkStatus();
  const std::string message = path + ": cannot create: " + ec.message();
  switch (ec.value()) {
    case ENOTDIR:  // a file where a folder must be
    case EEXIST:
    case EACCES:
    case EPERM:
    case EROFS:
    case ENAMETOOLONG:
    case ENOENT:  // a file system that takes no new names, such as /proc
    case ELOOP:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::StatusOr<FileLock> FileLock::Acquire(const std::string& path) {
  return Lock(path, O_RDWR | O_CREAT, LOCK_EX);
}

absl::StatusOr<FileLock> FileLock::TryAcquire(const std::string& path) {
  // Read-only opens a folder too; O_NONBLOCK keeps the open itself from waiting when a
  // FIFO stands where the lock file was expected (it does not change a file's lock).
  return Lock(path, O_RDONLY | O_NONBLOCK, LOCK_EX | LOCK_NB);
}

absl::StatusOr<FileLock> FileLock::Lock(const std::string& path, int open_flags, int lock_flags) {
  const int fd = ::open(path.c_str(), open_flags | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(path, (open_flags & O_CREAT) ? "cannot create the lock file" : "cannot open");
  int rc;
  while ((rc = ::flock(fd, lock_flags)) != 0 && errno == EINTR) {
  }
  if (rc != 0) {
    const int error = errno;
    ::close(fd);
    if (error == EWOULDBLOCK) return absl::FailedPreconditionError(path + ": locked by another process");
    return ErrnoError(path, "cannot lock", error);
  }
  return FileLock(fd);
}

FileLock::FileLock(FileLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

FileLock::~FileLock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the lock
}

absl::Status SyncFolder(const std::string& path) { return Sync(path, O_DIRECTORY); }

absl::Status PublishFile(const std::string& tmp, const std::string& path) {
  if (auto status = Sync(tmp, 0); !status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  return RenameDurably(tmp, path);
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int error = errno;
    const absl::Status status = ErrnoError(path, "cannot open", error);
    return error == ENOENT ? absl::NotFoundError(status.message()) : status;
  }
  std::string bytes;
  absl::Status status;
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) status = ErrnoError(path, "read failed");  // EISDIR for a folder
    if (n <= 0) break;
    bytes.append(buffer, size_t(n));
  }
  ::close(fd);
  if (!status.ok()) return status;
  return bytes;
}

absl::Status WriteFile(const std::string& path, std::string_view bytes) { return Write(path, bytes, false); }

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  if (auto status = Write(tmp, bytes, true); !status.ok()) return status;
  return RenameDurably(tmp, path);
}

}  // namespace llamad::storage
