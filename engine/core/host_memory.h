// What the host has to give.
#pragma once

#include <cstdint>
#include <string>

namespace llamad {

// The memory this process can still take from its host.
struct HostMemory {
  // Bytes: /proc/meminfo's MemAvailable, or less where the process's cgroup has a memory
  // limit (v2 memory.max, v1 memory.limit_in_bytes; the tightest of its cgroup and their
  // ancestors) that leaves less. -1: unknown.
  int64_t available = -1;
  bool cgroup_limited = false;  // the cgroup's limit, not MemAvailable, gives `available`
  // Processes with the same key draw on the same memory: the kernel's boot id (every
  // container on a machine shares it; the host name where it cannot be read), and the
  // limiting cgroup's folder where that limit binds.
  std::string key;
};

// Reads /proc (meminfo, self/cgroup, sys/kernel/random/boot_id) and the cgroup file
// system under the given roots.
HostMemory ReadHostMemory(const std::string& proc = "/proc", const std::string& cgroup = "/sys/fs/cgroup");

// ReadHostMemory().available.
int64_t AvailableHostMemoryBytes();

}  // namespace llamad
