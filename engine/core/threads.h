#pragma once
// The most CPU threads a rank takes (llama-train --threads; 0 means all cores). llamad's
// worker_threads, and the count it gives a rank by default, stay within it, so that a
// setting llamad accepts is one every rank accepts too.

namespace llamad {

inline constexpr int kMaxThreads = 1024;

}  // namespace llamad
