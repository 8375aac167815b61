// What the host has to give.
#pragma once

#include <cstdint>
#include <string>

namespace llamad {

// The memory this process can still take from its host, and who else draws on it.
struct HostMemory {
  int64_t mem_available = -1;  // /proc/meminfo's MemAvailable in bytes; -1: unknown
  // Processes with the same key draw on the same MemAvailable: the kernel's boot id
  // (every container on a machine shares it), or the host name where it cannot be read.
  std::string machine_key;
  // The tightest memory limit of the process's cgroup and its ancestors (v2 memory.max,
  // v1 memory.limit_in_bytes): bytes it leaves, its usage less the page cache the kernel
  // would reclaim first (inactive_file). -1: no limit.
  int64_t cgroup_left = -1;
  std::string cgroup_key;  // machine_key and the limiting cgroup (empty: no limit)

  // What this process can take: the smaller of the two, -1 when neither is known.
  int64_t available() const;
};

// Reads /proc (meminfo, self/cgroup, sys/kernel/random/boot_id) and the cgroup file
// system under the given roots.
HostMemory ReadHostMemory(const std::string& proc = "/proc", const std::string& cgroup = "/sys/fs/cgroup");

// ReadHostMemory().available().
int64_t AvailableHostMemoryBytes();

}  // namespace llamad
