#include "core/host_memory.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include "core/strings.h"

namespace llamad {
namespace {

namespace fs = std::filesystem;

// The file's first word as a number of bytes; nullopt for "max" (no limit), a missing
// file or anything else.
std::optional<int64_t> ReadBytes(const fs::path& path) {
  std::ifstream in(path);
  std::string word;
  if (!(in >> word)) return std::nullopt;
  const std::optional<int64_t> value = ParseInt64(word);
  if (!value || *value < 0) return std::nullopt;
  return value;
}

struct CgroupLimit {
  int64_t left = 0;  // bytes the limit leaves
  fs::path dir;      // the limiting cgroup's folder
};

// The `key` line of a cgroup's memory.stat (bytes), 0 where it has none.
int64_t StatBytes(const fs::path& stat, const std::string& key) {
  std::ifstream in(stat);
  std::string name;
  for (int64_t value = 0; in >> name >> value;) {
    if (name == key) return value;
  }
  return 0;
}

// The names one hierarchy's files go by.
struct CgroupFiles {
  const char* limit;         // memory.max, memory.limit_in_bytes
  const char* usage;         // memory.current, memory.usage_in_bytes
  const char* inactive_file; // memory.stat's page cache the kernel reclaims first
};

// The tightest limit on the cgroup at `path` under the hierarchy's `root` and on its
// ancestors up to `root`. Inside a cgroup namespace the process's own cgroup is the
// root, and /proc/self/cgroup's path may not lie under the mount: then the root alone.
std::optional<CgroupLimit> TightestLimit(fs::path root, const std::string& path, const CgroupFiles& files) {
  root = root.lexically_normal();
  if (!root.has_filename()) root = root.parent_path();  // no trailing separator
  std::error_code ec;
  fs::path dir = (root / fs::path(path).relative_path()).lexically_normal();
  if (!dir.has_filename()) dir = dir.parent_path();
  const fs::path below = dir.lexically_relative(root);
  if (!fs::is_directory(dir, ec) || below.empty() || *below.begin() == "..") dir = root;
  std::optional<CgroupLimit> tightest;
  for (;;) {
    const auto limit = ReadBytes(dir / files.limit), usage = ReadBytes(dir / files.usage);
    // cgroup v1 writes a number near 2^63 for "no limit".
    if (limit && usage && *limit < (int64_t{1} << 60)) {
      const int64_t used = std::max<int64_t>(0, *usage - StatBytes(dir / "memory.stat", files.inactive_file));
      const int64_t left = std::max<int64_t>(0, *limit - used);
      if (!tightest || left < tightest->left) tightest = CgroupLimit{left, dir};
    }
    if (dir == root || !dir.has_parent_path() || dir.parent_path() == dir) break;
    dir = dir.parent_path();
  }
  return tightest;
}

// The memory cgroup's limit from /proc/self/cgroup: v2 ("0::PATH", one hierarchy with
// cgroup.controllers at its root) or v1 (the line naming the memory controller; on
// hybrid systems the v2 line names a hierarchy without cgroup.controllers at this root).
std::optional<CgroupLimit> CgroupMemoryLimit(const fs::path& proc, const fs::path& cgroup) {
  std::ifstream in(proc / "self" / "cgroup");
  std::error_code ec;
  for (std::string line; std::getline(in, line);) {
    const size_t first = line.find(':'), second = first == std::string::npos ? first : line.find(':', first + 1);
    if (second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1), path = line.substr(second + 1);
    if (controllers.empty() && fs::exists(cgroup / "cgroup.controllers", ec)) {
      return TightestLimit(cgroup, path, {"memory.max", "memory.current", "inactive_file"});
    }
    std::istringstream names(controllers);
    for (std::string name; std::getline(names, name, ',');) {
      if (name == "memory" && fs::is_directory(cgroup / "memory", ec)) {
        return TightestLimit(cgroup / "memory", path,
                             {"memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"});
      }
    }
  }
  return std::nullopt;
}

}  // namespace

int64_t HostMemory::available() const {
  if (cgroup_left >= 0 && (mem_available < 0 || cgroup_left < mem_available)) return cgroup_left;
  return mem_available;
}

HostMemory ReadHostMemory(const std::string& proc, const std::string& cgroup) {
  HostMemory host;
  {
    std::ifstream in(fs::path(proc) / "meminfo");
    for (std::string line; std::getline(in, line);) {
      long long kib = 0;
      if (std::sscanf(line.c_str(), "MemAvailable: %lld kB", &kib) == 1) {
        host.mem_available = int64_t(kib) * 1024;
        break;
      }
    }
  }
  {
    std::ifstream in(fs::path(proc) / "sys" / "kernel" / "random" / "boot_id");
    std::getline(in, host.machine_key);
    if (host.machine_key.empty()) {
      char name[256] = {};
      if (::gethostname(name, sizeof(name) - 1) == 0) host.machine_key = name;
    }
  }
  if (auto limit = CgroupMemoryLimit(proc, cgroup)) {
    host.cgroup_left = limit->left;
    // Cgroup folders' inode numbers are unique within a kernel, whatever a namespace
    // names them.
    struct stat st {};
    host.cgroup_key = host.machine_key + ":cgroup:" +
                      (::stat(limit->dir.c_str(), &st) == 0 ? std::to_string(st.st_ino) : limit->dir.string());
  }
  return host;
}

int64_t AvailableHostMemoryBytes() { return ReadHostMemory().available(); }

}  // namespace llamad
