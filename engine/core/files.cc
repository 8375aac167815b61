#include "core/files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace llamad {
namespace {

absl::Status ErrnoError(const std::string& path, const char* what) {
  return absl::InternalError(path + ": " + what + ": " + std::strerror(errno));
}

}  // namespace

absl::Status PublishFile(const std::string& tmp, const std::string& path) {
  const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(tmp, "cannot open");
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced) return ErrnoError(tmp, "fsync failed");
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError(path, "cannot rename");
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(tmp, "cannot create");
  for (size_t done = 0; done < bytes.size();) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const absl::Status error = ErrnoError(tmp, "write failed");
      ::close(fd);
      return error;
    }
    done += size_t(n);
  }
  if (::close(fd) != 0) return ErrnoError(tmp, "close failed");
  return PublishFile(tmp, path);
}

}  // namespace llamad
