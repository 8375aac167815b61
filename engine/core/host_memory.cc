#include "core/host_memory.h"

#include <sys/stat.h>
#include <unistd.h>

#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

namespace llamad {
namespace {

namespace fs = std::filesystem;

// The file's first word as a number of bytes; nullopt for "max" (no limit), a missing
// file or anything else.
std::optional<int64_t> ReadBytes(const fs::path& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word)) return std::nullopt;
  int64_t value = 0;
  const auto [end, error] = std::from_chars(word.data(), word.data() + word.size(), value);
  if (error != std::errc() || end != word.data() + word.size() || value < 0) return std::nullopt;
  return value;
}

struct CgroupLimit {
  int64_t left = 0;  // bytes the limit leaves: the limit less the cgroup's usage
  fs::path dir;      // the limiting cgroup's folder
};

// The tightest limit on the cgroup at `path` under the hierarchy's `root` and on its
// ancestors up to `root`. Inside a cgroup namespace the process's own cgroup is the
// root, and /proc/self/cgroup's path may not exist under it: then the root alone.
std::optional<CgroupLimit> TightestLimit(const fs::path& root, const std::string& path, const char* limit_file,
                                         const char* usage_file) {
  std::error_code ec;
  fs::path dir = (root / fs::path(path).relative_path()).lexically_normal();
  if (!fs::is_directory(dir, ec)) dir = root;
  std::optional<CgroupLimit> tightest;
  for (;;) {
    const auto limit = ReadBytes(dir / limit_file), usage = ReadBytes(dir / usage_file);
    // cgroup v1 writes a number near 2^63 for "no limit".
    if (limit && usage && *limit < (int64_t{1} << 60)) {
      const int64_t left = *limit > *usage ? *limit - *usage : 0;
      if (!tightest || left < tightest->left) tightest = CgroupLimit{left, dir};
    }
    if (dir == root || !dir.has_parent_path() || dir.parent_path() == dir) break;
    dir = dir.parent_path();
    if (dir.native().size() < root.native().size()) break;
  }
  return tightest;
}

// The memory cgroup's limit from /proc/self/cgroup: v2 ("0::PATH", one hierarchy with
// cgroup.controllers at its root) or v1 (the line naming the memory controller).
std::optional<CgroupLimit> CgroupMemoryLimit(const fs::path& proc, const fs::path& cgroup) {
  std::ifstream in(proc / "self" / "cgroup");
  std::error_code ec;
  for (std::string line; std::getline(in, line);) {
    const size_t first = line.find(':'), second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1), path = line.substr(second + 1);
    if (controllers.empty() && fs::exists(cgroup / "cgroup.controllers", ec)) {
      return TightestLimit(cgroup, path, "memory.max", "memory.current");
    }
    std::istringstream names(controllers);
    for (std::string name; std::getline(names, name, ',');) {
      if (name == "memory" && fs::is_directory(cgroup / "memory", ec)) {
        return TightestLimit(cgroup / "memory", path, "memory.limit_in_bytes", "memory.usage_in_bytes");
      }
    }
  }
  return std::nullopt;
}

}  // namespace

HostMemory ReadHostMemory(const std::string& proc, const std::string& cgroup) {
  HostMemory host;
  {
    std::ifstream in(fs::path(proc) / "meminfo");
    for (std::string line; std::getline(in, line);) {
      long long kib = 0;
      if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kib) == 1) {
        host.available = int64_t(kib) * 1024;
        break;
      }
    }
  }
  {
    std::ifstream in(fs::path(proc) / "sys" / "kernel" / "random" / "boot_id");
    std::getline(in, host.key);
    if (host.key.empty()) {
      char name[256] = {};
      if (::gethostname(name, sizeof(name) - 1) == 0) host.key = name;
    }
  }
  if (auto limit = CgroupMemoryLimit(proc, cgroup); limit && (host.available < 0 || limit->left < host.available)) {
    host.available = limit->left;
    host.cgroup_limited = true;
    // Cgroup folders' inode numbers are unique within a kernel, whatever a namespace
    // names them.
    struct stat st {};
    host.key += ":cgroup:" + (::stat(limit->dir.c_str(), &st) == 0 ? std::to_string(st.st_ino) : limit->dir.string());
  }
  return host;
}

int64_t AvailableHostMemoryBytes() { return ReadHostMemory().available; }

}  // namespace llamad
