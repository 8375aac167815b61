// Records what the GPU does during a stretch of the host's time, through CUPTI's activity
// interface, and summarizes it (gpu_activity.h). bench-gpu records one training step with
// it, so that the step's time beyond the sum of its kernels is measured, not guessed.
//
// Tracing adds a little time to each launch: the step it records is not a timed one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "gpu_activity.h"

namespace llamad {

class GpuTimeline {
 public:
  // Starts recording. Null, with the reason in *why, where CUPTI is not built in or the
  // machine refuses it; the caller goes on without a timeline. One at a time.
  static std::unique_ptr<GpuTimeline> Start(std::string* why);
  ~GpuTimeline();

  // A label for what the host does next ("optimizer"): each idle gap is reported with the
  // label in force where it began.
  void Mark(const std::string& label);

  // Ends the stretch (synchronize the device first) and summarizes it
  // (SummarizeGpuActivity).
  nlohmann::json Stop(int top_kernels = 15, int top_gaps = 8);

 private:
  GpuTimeline() = default;
  uint64_t begin_ns_ = 0;
  TimelineMarks marks_;
  bool stopped_ = false;
};

}  // namespace llamad
