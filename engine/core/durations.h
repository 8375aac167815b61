#pragma once
// The longest duration llamad's config takes. Durations are added to clocks and multiplied
// by small factors; 30 days is far past any useful setting and keeps all of that inside
// int64. llama-train holds the stop grace llamad passes it (LLAMAD_STOP_GRACE_MS) to the
// same bound.

#include <cstdint>

namespace llamad {

inline constexpr int64_t kMaxDurationMs = 30LL * 24 * 3'600'000;  // 30 days

}  // namespace llamad
