// A summary of what a GPU did during a stretch of the host's time, from a list of its
// activities (kernels, copies, memsets on any stream): how much of the stretch it was
// busy (overlaps counted once), where it sat idle and between which operations, and how
// the busy time splits by kernel. Plain C++: GpuTimeline (gpu_timeline.h) collects the
// activities from CUPTI, and the tests check the arithmetic on made-up ones.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

namespace llamad {

struct GpuActivity {
  uint64_t start_ns = 0, end_ns = 0;
  // "kernel", "host-to-device", "device-to-host", "device-to-device", "copy" or "memset".
  std::string kind;
  std::string name;  // the kernel's (ShortKernelName); else the kind
};

// "void llamad::cuda::(anonymous namespace)::RmsNormKernel<8>(bf16*, ...)" (or its mangled
// form) -> "RmsNormKernel<8>": no return type, arguments or qualifiers outside template
// arguments. Names that are not C++ ("sm90_xmma_gemm_...") stay whole: kernels are
// grouped by these names, and library kernels often differ only at the end.
std::string ShortKernelName(const char* name);

// Host-side labels, each in force from its time on ("optimizer").
using TimelineMarks = std::vector<std::pair<uint64_t, std::string>>;

// The stretch [begin_ns, end_ns): `dropped` (records the recorder lost), wall_s, busy_s, idle_s, gaps_of_10us (how many idle gaps
// last 10 us or more) and gaps_of_10us_s, busy_by_kind_s, the kernels by total time (top
// `top_kernels`: kernel, s, calls) and the longest idle gaps (top `top_gaps`: s, at_s, the
// phase in force where it began, and the activities after and before it). Activities
// are clipped to the stretch.
nlohmann::json SummarizeGpuActivity(std::vector<GpuActivity> activities, uint64_t begin_ns, uint64_t end_ns,
                                    const TimelineMarks& marks, int top_kernels = 15, int top_gaps = 8,
                                    uint64_t dropped = 0);

// A few lines of text of such a summary, indented; long names cut to fit.
void PrintGpuActivitySummary(const nlohmann::json& summary);

}  // namespace llamad
