// What the host has to give.
#pragma once

#include <cstdint>

namespace llamad {

// Bytes the kernel reports as available (MemAvailable in /proc/meminfo), or -1 when
// it cannot be read.
int64_t AvailableHostMemoryBytes();

}  // namespace llamad
