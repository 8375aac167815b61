#include "gpu_timeline.h"

#include <cstdlib>
#include <mutex>
#include <vector>

#ifdef LLAMAD_WITH_CUPTI
#include <cupti.h>
#endif

namespace llamad {

#ifndef LLAMAD_WITH_CUPTI

std::unique_ptr<GpuTimeline> GpuTimeline::Start(std::string* why) {
  *why = "this build has no CUPTI (CUDA's profiling interface)";
  return nullptr;
}
GpuTimeline::~GpuTimeline() = default;
void GpuTimeline::Mark(const std::string&) {}
nlohmann::json GpuTimeline::Stop(int, int) { return {}; }

#else

namespace {

// Filled by CUPTI's buffer callback, which may run on a thread of CUPTI's own.
std::mutex recorded_mutex;
std::vector<GpuActivity> recorded;
uint64_t dropped = 0;  // records CUPTI had no room for
bool recording = false;

const CUpti_ActivityKind kKinds[] = {CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL, CUPTI_ACTIVITY_KIND_MEMCPY,
                                     CUPTI_ACTIVITY_KIND_MEMSET};

std::string CuptiError(const char* call, CUptiResult r) {
  const char* text = nullptr;
  cuptiGetResultString(r, &text);
  return std::string(call) + ": " + (text != nullptr ? text : "unknown CUPTI error");
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  constexpr size_t kBytes = 8 << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBytes));
  *size = *buffer != nullptr ? kBytes : 0;
  *max_records = 0;  // as many as fit
}

void CUPTIAPI BufferCompleted(CUcontext context, uint32_t stream, uint8_t* buffer, size_t, size_t valid) {
  std::vector<GpuActivity> got;
  CUpti_Activity* record = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) {
      const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
      got.push_back({k->start, k->end, "kernel", ShortKernelName(k->name)});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      const char* kind = m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_HTOD   ? "host-to-device"
                         : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOH ? "device-to-host"
                         : m->copyKind == CUPTI_ACTIVITY_MEMCPY_KIND_DTOD ? "device-to-device"
                                                                          : "copy";
      got.push_back({m->start, m->end, kind, kind});
    } else if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      got.push_back({m->start, m->end, "memset", "memset"});
    }
  }
  std::free(buffer);
  size_t lost = 0;
  if (cuptiActivityGetNumDroppedRecords(context, stream, &lost) != CUPTI_SUCCESS) lost = 0;
  std::lock_guard<std::mutex> lock(recorded_mutex);
  recorded.insert(recorded.end(), got.begin(), got.end());
  dropped += lost;
}

}  // namespace

std::unique_ptr<GpuTimeline> GpuTimeline::Start(std::string* why) {
  if (recording) {
    *why = "a timeline is already recording";
    return nullptr;
  }
  static const CUptiResult registered = cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted);
  if (registered != CUPTI_SUCCESS) {
    *why = CuptiError("cuptiActivityRegisterCallbacks", registered);
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(recorded_mutex);
    recorded.clear();
    dropped = 0;
  }
  for (CUpti_ActivityKind kind : kKinds) {
    if (const CUptiResult r = cuptiActivityEnable(kind); r != CUPTI_SUCCESS) {
      for (CUpti_ActivityKind k : kKinds) cuptiActivityDisable(k);
      *why = CuptiError("cuptiActivityEnable", r);
      return nullptr;
    }
  }
  std::unique_ptr<GpuTimeline> t(new GpuTimeline);
  cuptiGetTimestamp(&t->begin_ns_);
  recording = true;
  return t;
}

GpuTimeline::~GpuTimeline() {
  if (!stopped_) Stop();
}

void GpuTimeline::Mark(const std::string& label) {
  uint64_t now = 0;
  cuptiGetTimestamp(&now);
  marks_.emplace_back(now, label);
}

nlohmann::json GpuTimeline::Stop(int top_kernels, int top_gaps) {
  uint64_t end_ns = 0;
  cuptiGetTimestamp(&end_ns);
  // Records still in CUPTI's buffers come out through BufferCompleted.
  cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  for (CUpti_ActivityKind kind : kKinds) cuptiActivityDisable(kind);
  recording = false;
  stopped_ = true;
  std::vector<GpuActivity> activities;
  uint64_t lost = 0;
  {
    std::lock_guard<std::mutex> lock(recorded_mutex);
    activities.swap(recorded);
    lost = dropped;
  }
  return SummarizeGpuActivity(std::move(activities), begin_ns_, end_ns, marks_, top_kernels, top_gaps, lost);
}

#endif

}  // namespace llamad
