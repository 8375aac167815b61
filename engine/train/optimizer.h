// AdamW over a model's parameters and the learning-rate schedule.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>

#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "backend/backend.h"
#include "model/llama.h"
#include "offload/swap_file.h"

namespace llamad {

struct LrSchedule {
  double max_lr = 3e-4;
  double min_lr_ratio = 0.1;  // The floor is max_lr * min_lr_ratio.
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;

  // Learning rate of 0-based step `step`: linear warmup to max_lr over warmup_steps
  // (step 0 gets max_lr / warmup_steps), then cosine decay to the floor at total_steps.
  double At(int64_t step) const;
};

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  // Applied to matrices, not to norm weights.
};

// Owns the two moment buffers (backend accum_dtype()) for a model's parameters.
//
// ZeRO-1: with Shard(begin, end) the optimizer keeps moments only for the flat element
// range [begin, end) of the parameter layout and steps only those parameters; the
// caller all-gathers the updated parameters. exp_avg()/exp_avg_sq() then address the
// shard.
class AdamWOptimizer {
 public:
  AdamWOptimizer(LlamaModel* model, Backend* backend, const AdamWOptions& options);
  ~AdamWOptimizer();
  AdamWOptimizer(const AdamWOptimizer&) = delete;
  AdamWOptimizer& operator=(const AdamWOptimizer&) = delete;

  // One update with learning rate `lr`; gradients are multiplied by grad_scale first.
  // Fails only when offloaded state cannot be read or written.
  absl::Status Step(double lr, double grad_scale);
  int64_t step() const { return step_; }
  // The step counter and the moment buffers (model parameter layout), for checkpoints.
  void set_step(int64_t step) { step_ = step; }
  // The moments in memory, of flat elements [shard_begin(), memory_end()) (allocated, as
  // zeros, at first use); null when there are none (all offloaded).
  void* exp_avg();
  void* exp_avg_sq();
  // Whether moments are in memory: false until their first use (they are zeros then) and
  // while all are offloaded.
  bool has_moments() const { return m_ != nullptr; }

  // Keeps only [begin, end) of the moments (taken from the current full buffers).
  void Shard(size_t begin, size_t end);
  size_t shard_begin() const { return shard_begin_; }
  size_t shard_end() const { return shard_end_; }
  // The moments of [shard_begin(), memory_end()) are in the backend's memory; those of
  // [memory_end(), shard_end()) are elsewhere: on the NVMe tier (CPU backend), or in host
  // memory and from swap_begin() on the NVMe tier (a GPU's, OffloadToHost).
  size_t memory_end() const { return memory_end_; }
  // The moments of [swap_begin(), shard_end()) are on the NVMe tier (shard_end() when
  // none are): memory_end() on the CPU backend; on a GPU whose state is in host memory,
  // the host keeps those of [memory_end(), swap_begin()).
  size_t swap_begin() const { return swap_begin_; }
  // Bytes of moments held in the backend's memory now (the CPU backend's NVMe tier: with
  // the pipeline's chunk buffers).
  size_t state_bytes() const { return state_bytes_; }

  // The NVMe tier: moves the moments of the last `fraction` (0, 1] of the shard's
  // elements (all of the shard, after Shard, by default) into a swap file in `dir` and
  // frees them from memory; Step then updates the rest in memory and streams these
  // through memory chunk by chunk. The update is the same arithmetic on the same values,
  // so parameters stay bit-identical to keeping the moments in memory. CPU backend (a
  // GPU's go through OffloadToHost).
  absl::Status OffloadToNvme(const std::string& dir, const offload::SwapOptions& options, double fraction = 1.0);
  bool offloaded() const { return swap_ != nullptr; }
  // The elements of a shard of `n` whose moments go to the swap with `fraction`: the
  // plan counts them the same way.
  static size_t SwappedElements(size_t n, double fraction) {
    return std::min(n, size_t(std::ceil(fraction * double(n))));
  }
  const offload::SwapFile* swap() const { return swap_.get(); }
  // Elements per chunk of the NVMe tier: a chunk holds both f32 moments of a range of
  // elements, in at most `chunk_bytes` (the plan counts them the same way).
  static size_t SwapChunkElements(size_t chunk_bytes) { return std::max<size_t>(1, chunk_bytes / (2 * sizeof(float))); }
  // Bytes of the swap file holding the moments of `swapped` elements, in whole chunks of
  // at most `chunk_bytes` (the plan counts them the same way).
  static uint64_t SwapFileBytes(size_t swapped, size_t chunk_bytes) {
    const size_t per_chunk = SwapChunkElements(chunk_bytes);
    return uint64_t((swapped + per_chunk - 1) / per_chunk) * per_chunk * 2 * sizeof(float);
  }
  // ZeRO-Offload (offload.optimizer host; a backend with separate master weights, the
  // GPU's): the f32 master weights and both moments move to host memory, and the model's
  // device copy of the master weights is freed. Step then runs AdamW on the CPU chunk by
  // chunk: the chunk's gradients come down, the CPU updates its master weights and
  // moments, and the weights go back up as the layers' bf16 copy. The device keeps the
  // bf16 parameters, the gradients and the activations; the gradients are scratch after
  // such a Step. After Shard, only the shard's state moves (and only its parameters are
  // updated; the caller gathers the rest). `threads`: CPU threads for the update (0: all).
  //
  // With `fraction` below 1 only the state of the last `fraction` of the shard's elements
  // moves (SwappedElements, as for the NVMe tier): from memory_end() on; the device keeps
  // and steps the rest, the same arithmetic, so the parameters stay bit-identical.
  //
  // With `nvme` (ZeRO-Infinity) the moments of the last nvme->fraction of the moved
  // elements go on to a swap file (from swap_begin() on), never held in host memory: the
  // CPU step streams them through the NVMe tier's pipeline after the host's chunks.
  struct NvmeTier {
    std::string dir;
    offload::SwapOptions options;
    double fraction = 1.0;
  };
  // `chunk_bytes`: the unit of the step's pipeline (offload.chunk_mb; with the NVMe tier,
  // its options' chunk): the gradients come down in chunks of that many bytes of f32, two
  // of them in host memory, one updated while the next comes down. 64 MiB is large
  // enough for PCIe, small next to the state.
  static constexpr size_t kHostChunkBytes = size_t{64} << 20;
  struct HostTier {
    int threads = 0;
    double fraction = 1.0;
    size_t chunk_bytes = kHostChunkBytes;
    // offload.host_moments: bf16 keeps the moments in host memory as bf16, rounded
    // stochastically (cpu::AdamWBf16Moments): 4 bytes per element less host memory, and
    // 20 bytes moved per element in the CPU's update instead of 28. Checkpoints still
    // hold f32 (the bf16 values exactly), so a bf16 run resumes exactly from its own
    // checkpoints; an f32 run's checkpoint loaded into a bf16 run has its moments
    // rounded to the nearest bf16, and a bf16 checkpoint loads into an f32 run as is.
    bool bf16_moments = false;
  };
  absl::Status OffloadToHost(const HostTier& host, const NvmeTier* nvme = nullptr);
  // The two pinned gradient buffers' elements: a chunk each (at most the `kept` elements
  // whose moments stay in host memory); with the NVMe tier the first also takes a swap
  // chunk's gradients. The allocation and the memory plan both use this.
  static std::array<size_t, 2> HostGradBuffers(size_t kept, size_t chunk_bytes, bool nvme) {
    const size_t chunk = std::max<size_t>(1, std::min(kept, chunk_bytes / sizeof(float)));
    return {nvme ? std::max(chunk, SwapChunkElements(chunk_bytes)) : chunk, chunk};
  }
  bool host_offloaded() const { return host_ != nullptr; }
  // While host-offloaded: the master weights of flat elements [memory_end(), shard_end())
  // and the moments of [memory_end(), swap_begin()), the first at index 0.
  const float* host_master() const { return host_master_.get(); }
  // The master weights to write into: a restore puts the state there directly, never on
  // the device, and then calls UploadHostWeights.
  float* mutable_host_master() { return host_master_.get(); }
  // The host's moments (kExpAvg or kExpAvgSq) of elements memory_end() + [at, at + count)
  // as f32, out of whichever type they are kept in, and into it (bf16: to nearest). Safe
  // from several threads on disjoint ranges.
  enum Moment { kExpAvg = 0, kExpAvgSq = 1 };
  void ReadHostMoment(Moment which, size_t at, size_t count, float* out) const;
  void WriteHostMoment(Moment which, size_t at, size_t count, const float* in);
  bool host_moments_bf16() const { return host_moments_[0].bf16 != nullptr; }
  // The host's moment `which` as 32-bit words (its bytes, rounded up to whole words), to
  // send as they are: rank 0's to the others under ddp.
  std::pair<float*, size_t> HostMomentWords(Moment which);
  // While host-offloaded: the device's parameters of the host's elements take their
  // master weights, rounded, as after a step (for a restore into the host arrays).
  void UploadHostWeights();
  // While offloaded: streams the moments from the swap, calling f(begin, count, m, v)
  // for flat elements [begin, begin + count) of the parameter layout, in order, without
  // holding them all in memory (a checkpoint copies them straight into its snapshot).
  absl::Status ReadOffloadedMoments(
      const std::function<void(size_t begin, size_t count, const float* m, const float* v)>& f);
  // While offloaded: sets the moments in the swap chunk by chunk (a restore): f(begin,
  // count, m, v) writes those of flat elements [begin, begin + count), in order. After
  // f's first error f is not called again (the remaining chunks are written as they
  // were) and that error is returned; otherwise the swap's own status.
  absl::Status WriteOffloadedMoments(
      const std::function<absl::Status(size_t begin, size_t count, float* m, float* v)>& f);

 private:
  void EnsureMoments();
  // Sets chunk_elements_ for `options` and returns them with whole chunks' bytes.
  offload::SwapOptions ChunkedSwapOptions(const offload::SwapOptions& options);
  // Keeps the moments of [begin, end) (within those held now) in buffers of that size.
  void KeepMoments(size_t begin, size_t end);

  LlamaModel* model_;
  Backend* backend_;
  AdamWOptions options_;
  void* m_ = nullptr;
  void* v_ = nullptr;
  size_t shard_begin_ = 0, shard_end_ = 0;
  size_t memory_end_ = 0;
  size_t swap_begin_ = 0;
  size_t state_bytes_ = 0;
  int64_t step_ = 0;
  // Offloaded: chunk c of the swap holds exp_avg then exp_avg_sq of flat elements
  // memory_end_ + [c * chunk_elements_, (c + 1) * chunk_elements_).
  std::unique_ptr<offload::SwapFile> swap_;
  size_t chunk_elements_ = 0;
  // Updates the parameters of shard elements [lo, hi) with moments m/v of that range.
  void UpdateRange(size_t lo, size_t hi, char* m, char* v, AdamWStep s);
  // Host-offloaded: the CPU backend that runs the update, the state it updates, and the
  // gradient chunk brought down from the device.
  std::unique_ptr<Backend> host_;
  std::unique_ptr<float[]> host_master_;
  // The moments of [memory_end_, swap_begin_): f32, or bf16 (HostTier::bf16_moments).
  struct HostMomentArray {
    std::unique_ptr<float[]> f32;
    std::unique_ptr<uint16_t[]> bf16;
  };
  HostMomentArray host_moments_[2];
  bool AllocateHostMoments(size_t kept, bool bf16);
  std::unique_ptr<float[]> host_grad_[2];  // chunk c's gradients in [c % 2]
  size_t host_chunk_elements_ = 0;
  absl::Status StepOnHost(const AdamWStep& s);
  // The CPU's AdamW over elements [lo, hi), with their gradients and f32 moments at
  // grad, m, v (the NVMe tier's chunk), or (m and v null) the host arrays' moments.
  void UpdateOnHost(size_t lo, size_t hi, const float* grad, float* m, float* v, AdamWStep s);
  // Host-offloaded: the updated master weights of [lo, hi) up into the device's
  // parameters, through the spent gradients of the range.
  void SendUpdatedWeights(size_t lo, size_t hi);
  // The parts of host elements [lo, hi) whose parameters the device holds: in two where
  // the range spans the parameters' shard and their replica; of the shard only what the
  // device holds (TrimParamShard: the rest is rounded from the host master weights at
  // each gather). Either may be empty.
  std::array<std::pair<size_t, size_t>, 2> DeviceParamParts(size_t lo, size_t hi) const;
};

}  // namespace llamad
