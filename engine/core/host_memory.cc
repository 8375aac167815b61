#include "core/host_memory.h"

#include <cstdio>
#include <cstring>

namespace llamad {

int64_t AvailableHostMemoryBytes() {
  FILE* f = std::fopen("/proc/meminfo", "r");
  if (f == nullptr) return -1;
  char line[256];
  int64_t result = -1;
  while (std::fgets(line, sizeof(line), f)) {
    long long kib = 0;
    if (std::sscanf(line, "MemAvailable: %lld kB", &kib) == 1) {
      result = int64_t(kib) * 1024;
      break;
    }
  }
  std::fclose(f);
  return result;
}

}  // namespace llamad
