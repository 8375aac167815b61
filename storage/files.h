// Creating folders and publishing files durably: a reader sees the old file or the whole
// new one, also after a crash.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace llamad::storage {

// Creates `path` and its missing parents. A path that cannot be a folder as given (a file in
// the way, no permission, a read-only or virtual file system, a name too long) is
// InvalidArgument, the caller's input to fix; other failures (no space, I/O errors) are
// Internal. The message names the path and the reason.
absl::Status CreateFolders(const std::string& path);

// Syncs the folder `path`, which makes the names created, renamed or removed in it durable.
absl::Status SyncFolder(const std::string& path);

// An exclusive lock on the file `path` (made when missing), held until this object is
// destroyed. Processes that fill a shared cache take one so that each item is written once
// and never read half-written.
class FileLock {
 public:
  // Waits while another process holds the lock.
  static absl::StatusOr<FileLock> Acquire(const std::string& path);
  // Does not wait: FailedPrecondition while another process holds the lock. `path` must
  // exist, and may be a folder, whose lock is on the folder itself.
  static absl::StatusOr<FileLock> TryAcquire(const std::string& path);
  FileLock(FileLock&& other) noexcept;
  FileLock& operator=(FileLock&&) = delete;
  ~FileLock();

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  static absl::StatusOr<FileLock> Lock(const std::string& path, int open_flags, int lock_flags);
  int fd_;
};

// Syncs the finished file `tmp`, renames it over `path` and syncs the folder, which makes
// the rename itself durable. A failure before the rename removes `tmp`.
absl::Status PublishFile(const std::string& tmp, const std::string& path);

// Writes `bytes` to path + ".tmp", syncs it and publishes it over `path` as PublishFile
// does. A failed write leaves no temporary either.
absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes);

// The whole of the file `path`. NotFound when it does not exist; a folder, or a read that
// fails part way (an I/O error), is an error that names the path and the reason, never a
// shorter content.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// Writes `bytes` to `path`, replacing it, without syncing the disk: for a file that a
// crash may lose, as it is written again. A failed write removes the file, and the error
// names it and the reason.
absl::Status WriteFile(const std::string& path, std::string_view bytes);

}  // namespace llamad::storage
