#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <new>

#include "backend/cpu/adamw_simd.h"
#include "backend/cpu/cpu_backend.h"
#include "core/strings.h"

namespace llamad {

double LrSchedule::At(int64_t step) const {
  if (step < warmup_steps) return max_lr * double(step + 1) / double(warmup_steps);
  const double min_lr = max_lr * min_lr_ratio;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::clamp(double(step - warmup_steps) / double(decay_steps), 0.0, 1.0);
  return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamWOptimizer::AdamWOptimizer(LlamaModel* model, Backend* backend, const AdamWOptions& options)
    : model_(model),
      backend_(backend),
      options_(options),
      shard_end_(model->num_params()),
      memory_end_(model->num_params()),
      swap_begin_(model->num_params()) {
  state_bytes_ = 2 * model_->num_params() * DTypeSize(backend_->accum_dtype());
}

// The moments come into memory at their first use (all zeros until the first step), so
// that a shard or an NVMe swap file set up before training never holds them whole in
// memory first: a fresh swap file reads as zeros.
void AdamWOptimizer::EnsureMoments() {
  if (m_ != nullptr || memory_end_ == shard_begin_) return;
  m_ = backend_->Allocate(memory_end_ - shard_begin_, backend_->accum_dtype());
  v_ = backend_->Allocate(memory_end_ - shard_begin_, backend_->accum_dtype());
}

void* AdamWOptimizer::exp_avg() {
  EnsureMoments();
  return m_;
}

void* AdamWOptimizer::exp_avg_sq() {
  EnsureMoments();
  return v_;
}

AdamWOptimizer::~AdamWOptimizer() {
  // The last step's uploads of the host master weights may still be queued.
  if (host_) backend_->Synchronize();
  if (host_master_) backend_->UnpinHostMemory(host_master_.get());
  for (auto& g : host_grad_) {
    if (g) backend_->UnpinHostMemory(g.get());
  }
  backend_->Free(m_);
  backend_->Free(v_);
}

void AdamWOptimizer::UpdateRange(size_t lo, size_t hi, char* m, char* v, AdamWStep s) {
  const size_t elem = DTypeSize(backend_->accum_dtype());
  const bool master = backend_->needs_master_weights();
  ForEachTensorPart(model_->params(), lo, hi, [&](const ParamInfo& p, size_t begin, size_t end) {
    s.weight_decay = p.decay ? options_.weight_decay : 0.0;  // matrices only
    backend_->AdamW(model_->param_at(begin), master ? model_->master_at(begin) : nullptr, model_->grad_at(begin),
                    m + (begin - lo) * elem, v + (begin - lo) * elem, end - begin, s);
  });
}

absl::Status AdamWOptimizer::Step(double lr, double grad_scale) {
  ++step_;
  const AdamWStep s{lr, options_.beta1, options_.beta2, options_.eps, 0.0, step_, grad_scale};
  EnsureMoments();
  if (host_) return StepOnHost(s);
  if (memory_end_ > shard_begin_) {
    UpdateRange(shard_begin_, memory_end_, static_cast<char*>(m_), static_cast<char*>(v_), s);
  }
  if (!swap_) return absl::OkStatus();
  // Chunk c is read while c-1 is written and c+1 read: the disk works during the update.
  return swap_->Stream([&](size_t c, char* data) {
    const size_t lo = swap_begin_ + c * chunk_elements_, hi = std::min(shard_end_, lo + chunk_elements_);
    if (lo < hi) UpdateRange(lo, hi, data, data + chunk_elements_ * sizeof(float), s);
  });
}

absl::Status AdamWOptimizer::OffloadToHost(const HostTier& host, const NvmeTier* nvme) {
  if (host_) return absl::OkStatus();
  const double fraction = host.fraction;
  const char* tier = nvme != nullptr ? "offload.optimizer: nvme" : "offload.optimizer: host";
  if (!(fraction > 0 && fraction <= 1)) {
    return absl::InvalidArgumentError(StrCat("offload.host_fraction ", fraction, " is not within (0, 1]"));
  }
  if (nvme != nullptr && !(nvme->fraction > 0 && nvme->fraction <= 1)) {
    return absl::InvalidArgumentError(StrCat("offload.nvme_fraction ", nvme->fraction, " is not within (0, 1]"));
  }
  if (!backend_->needs_master_weights() || backend_->accum_dtype() != DType::kF32) {
    return absl::FailedPreconditionError(StrCat(
        tier, " moves a GPU's f32 optimizer state to host memory; the ", backend_->name(),
        " backend keeps it there already (offload.optimizer: memory, or nvme for its NVMe tier)"));
  }
  if (swap_) return absl::FailedPreconditionError("offload.optimizer: host and nvme are exclusive");
  // The last `fraction` of the shard (all of it without ZeRO): the master weights outside
  // the shard are not this rank's to update, and the parameters of the others' shards
  // arrive gathered. The rest of the shard keeps its state on the device. With the NVMe
  // tier the last nvme->fraction of those elements keep their moments in the swap file,
  // never in host memory.
  const size_t n = SwappedElements(shard_end_ - shard_begin_, fraction);
  const size_t begin = shard_end_ - n;
  const size_t swapped = nvme != nullptr ? SwappedElements(n, nvme->fraction) : 0;
  const size_t kept = n - swapped, swap_begin = shard_end_ - swapped;
  const offload::SwapOptions swap_options = nvme != nullptr ? ChunkedSwapOptions(nvme->options) : offload::SwapOptions{};
  const auto [grad0, chunk] =
      HostGradBuffers(kept, nvme != nullptr ? nvme->options.chunk_bytes : host.chunk_bytes, nvme != nullptr);
  host_chunk_elements_ = chunk;
  host_master_.reset(new (std::nothrow) float[n]);
  const bool moments_allocated = AllocateHostMoments(kept, host.bf16_moments);
  host_grad_[0].reset(new (std::nothrow) float[grad0]);
  host_grad_[1].reset(new (std::nothrow) float[host_chunk_elements_]);
  auto release = [&] {
    host_master_.reset(), host_grad_[0].reset(), host_grad_[1].reset();
    for (HostMomentArray& a : host_moments_) a = {};
    swap_.reset();
    swap_begin_ = shard_end_;
  };
  if (!host_master_ || !moments_allocated || !host_grad_[0] || !host_grad_[1]) {
    release();
    const double moment_bytes = host.bf16_moments ? 4.0 : 8.0;
    return absl::ResourceExhaustedError(StrCat(tier, ": cannot allocate ",
                                               BytesForPeople(4.0 * double(n) + moment_bytes * double(kept)),
                                               " of host memory for the master weights and the AdamW moments kept there"));
  }
  if (nvme != nullptr) {
    auto swap = offload::SwapFile::Create(nvme->dir, SwapFileBytes(swapped, swap_options.chunk_bytes), swap_options);
    if (!swap.ok()) {
      release();
      return swap.status();
    }
    swap_ = std::move(*swap);
    swap_begin_ = swap_begin;
  }
  if (m_ != nullptr) {
    // Restored moments come along, straight from the device into the host arrays and the
    // swap's chunks; fresh ones are the zeros above (and a fresh swap file reads as zeros).
    const size_t elem = DTypeSize(backend_->accum_dtype());
    for (const auto& [which, device] : {std::pair{kExpAvg, m_}, std::pair{kExpAvgSq, v_}}) {
      const char* from = static_cast<char*>(device) + (begin - shard_begin_) * elem;
      if (!host_moments_bf16()) {
        backend_->DownloadF32(host_moments_[which].f32.get(), from, kept);
        continue;
      }
      // Through a gradient buffer, a chunk at a time, rounded to nearest on the way.
      float* staging = host_grad_[1].get();
      for (size_t at = 0; at < kept; at += host_chunk_elements_) {
        const size_t count = std::min(host_chunk_elements_, kept - at);
        backend_->DownloadF32(staging, from + at * elem, count);
        WriteHostMoment(which, at, count, staging);
      }
    }
    if (swap_) {
      auto s = WriteOffloadedMoments([&](size_t first, size_t count, float* cm, float* cv) {
        backend_->DownloadF32(cm, static_cast<char*>(m_) + (first - shard_begin_) * elem, count);
        backend_->DownloadF32(cv, static_cast<char*>(v_) + (first - shard_begin_) * elem, count);
        return absl::OkStatus();
      });
      if (!s.ok()) {  // everything stays on the device, as before
        release();
        return s;
      }
    }
    KeepMoments(shard_begin_, begin);
  }
  // What crosses PCIe every step: the gradient chunks down, the master weights up.
  backend_->PinHostMemory(host_master_.get(), n * sizeof(float));
  backend_->PinHostMemory(host_grad_[0].get(), grad0 * sizeof(float));
  backend_->PinHostMemory(host_grad_[1].get(), host_chunk_elements_ * sizeof(float));
  backend_->DownloadF32(host_master_.get(), model_->master_at(begin), n);
  model_->TrimMasterWeights(begin);
  memory_end_ = begin;
  host_ = MakeCpuBackend({DType::kF32, host.threads});
  state_bytes_ = 2 * (begin - shard_begin_) * DTypeSize(backend_->accum_dtype());  // what stays on the device
  return absl::OkStatus();
}

void AdamWOptimizer::UpdateOnHost(size_t lo, size_t hi, const float* grad, float* m, float* v, AdamWStep s) {
  // grad (and m and v, when given) hold elements [lo, hi); the master weights and the
  // host arrays are indexed from memory_end_.
  const bool arrays = m == nullptr;
  ForEachTensorPart(model_->params(), lo, hi, [&](const ParamInfo& p, size_t begin, size_t end) {
    s.weight_decay = p.decay ? options_.weight_decay : 0.0;  // matrices only
    float* master = host_master_.get() + (begin - memory_end_);
    const float* g = grad + (begin - lo);
    const size_t at = begin - memory_end_;
    if (arrays && host_moments_bf16()) {
      AdamWBf16MomentsOnThreads(master, g, host_moments_[kExpAvg].bf16.get() + at,
                                host_moments_[kExpAvgSq].bf16.get() + at, end - begin, begin, s);
      return;
    }
    float* mp = arrays ? host_moments_[kExpAvg].f32.get() + at : m + (begin - lo);
    float* vp = arrays ? host_moments_[kExpAvgSq].f32.get() + at : v + (begin - lo);
    host_->AdamW(master, nullptr, g, mp, vp, end - begin, s);
  });
}

bool AdamWOptimizer::AllocateHostMoments(size_t kept, bool bf16) {
  // Zeros: fresh moments (a restore overwrites them). bf16 arrays are padded to whole
  // 32-bit words for HostMomentWords.
  for (HostMomentArray& a : host_moments_) {
    a = {};
    if (bf16) {
      a.bf16.reset(new (std::nothrow) uint16_t[std::max<size_t>(kept, 1) + 1]());
    } else {
      a.f32.reset(new (std::nothrow) float[std::max<size_t>(kept, 1)]());
    }
    if (!a.f32 && !a.bf16) return false;
  }
  return true;
}

void AdamWOptimizer::ReadHostMoment(Moment which, size_t at, size_t count, float* out) const {
  const HostMomentArray& a = host_moments_[which];
  if (a.bf16) {
    cpu::Bf16ToF32(a.bf16.get() + at, out, count);
  } else {
    std::copy_n(a.f32.get() + at, count, out);
  }
}

void AdamWOptimizer::WriteHostMoment(Moment which, size_t at, size_t count, const float* in) {
  HostMomentArray& a = host_moments_[which];
  if (a.bf16) {
    cpu::F32ToBf16(in, a.bf16.get() + at, count);
  } else {
    std::copy_n(in, count, a.f32.get() + at);
  }
}

std::pair<float*, size_t> AdamWOptimizer::HostMomentWords(Moment which) {
  const size_t kept = swap_begin_ - memory_end_;
  HostMomentArray& a = host_moments_[which];
  if (a.bf16) return {reinterpret_cast<float*>(a.bf16.get()), (kept + 1) / 2};
  return {a.f32.get(), kept};
}

std::array<std::pair<size_t, size_t>, 2> AdamWOptimizer::DeviceParamParts(size_t lo, size_t hi) const {
  const size_t split = std::clamp(model_->replicated_begin(), lo, hi);
  const size_t held = std::clamp(model_->param_held_end(), lo, split);
  return {std::pair{lo, held}, std::pair{split, hi}};
}

void AdamWOptimizer::SendUpdatedWeights(size_t lo, size_t hi) {
  // The chunk's gradients are spent: their device memory carries the updated weights up,
  // and the device rounds them into the layers' bf16 copy, as its AdamW would (no staging
  // buffer on the device).
  //
  // The upload may still run when this returns: the CPU goes on to the next chunk while
  // the device takes this one. The master weights it reads change again only in the next
  // step, after downloads that wait for it (the stream keeps them in order).
  for (const auto& [from, to] : DeviceParamParts(lo, hi)) {
    if (to == from) continue;
    backend_->UploadF32Async(model_->grad_at(from), host_master_.get() + (from - memory_end_), to - from);
    backend_->Copy(model_->param_at(from), model_->grad_at(from), to - from);
  }
}

void AdamWOptimizer::UploadHostWeights() {
  if (!host_) return;
  // Converted on the way up by the backend (its staging buffer: the gradients, which
  // SendUpdatedWeights borrows, need not exist yet), with the same rounding.
  for (const auto& [from, to] : DeviceParamParts(memory_end_, shard_end_)) {
    if (to > from) backend_->UploadF32(model_->param_at(from), host_master_.get() + (from - memory_end_), to - from);
  }
}

absl::Status AdamWOptimizer::StepOnHost(const AdamWStep& s) {
  const size_t chunk = host_chunk_elements_;
  // Moments in host arrays up to here; past it (ZeRO-Infinity) on the NVMe tier.
  const size_t arrays_end = swap_ ? swap_begin_ : shard_end_;
  // Chunk c covers elements memory_end_ + [c * chunk, ...); host arrays are indexed from
  // memory_end_, where the host's part of the shard begins.
  auto range = [&](size_t c) {
    const size_t lo = memory_end_ + c * chunk;
    return std::pair<size_t, size_t>{lo, std::min(arrays_end, lo + chunk)};
  };
  auto download = [&](size_t c) {
    const auto [lo, hi] = range(c);
    backend_->DownloadF32(host_grad_[c % 2].get(), model_->grad_at(lo), hi - lo);
  };
  if (arrays_end > memory_end_) download(0);
  // The device's part of the shard (host_fraction below 1) updates on its stream while
  // the CPU updates the first chunks.
  if (memory_end_ > shard_begin_) {
    UpdateRange(shard_begin_, memory_end_, static_cast<char*>(m_), static_cast<char*>(v_), s);
  }
  for (size_t c = 0; range(c).first < arrays_end; ++c) {
    const auto [lo, hi] = range(c);
    // The next chunk's gradients come down while the CPU updates this one.
    std::future<void> next;
    if (hi < arrays_end) next = std::async(std::launch::async, download, c + 1);
    UpdateOnHost(lo, hi, host_grad_[c % 2].get(), nullptr, nullptr, s);
    if (next.valid()) next.get();  // before this thread issues more work on the device
    SendUpdatedWeights(lo, hi);
  }
  if (!swap_) return absl::OkStatus();
  // The moments of the rest come through memory from the swap: the disk reads the next
  // chunk and writes the last while the CPU updates this one.
  return swap_->Stream([&](size_t c, char* data) {
    const size_t lo = swap_begin_ + c * chunk_elements_, hi = std::min(shard_end_, lo + chunk_elements_);
    if (lo >= hi) return;
    float* grad = host_grad_[0].get();
    backend_->DownloadF32(grad, model_->grad_at(lo), hi - lo);
    float* m = reinterpret_cast<float*>(data);
    UpdateOnHost(lo, hi, grad, m, m + chunk_elements_, s);
    SendUpdatedWeights(lo, hi);
  });
}

absl::Status AdamWOptimizer::ReadOffloadedMoments(
    const std::function<void(size_t, size_t, const float*, const float*)>& f) {
  if (!swap_) return absl::FailedPreconditionError("the optimizer state is not offloaded");
  const size_t n = shard_end_ - swap_begin_;
  return swap_->Stream(
      [&](size_t c, char* data) {
        const size_t lo = c * chunk_elements_, count = lo < n ? std::min(chunk_elements_, n - lo) : 0;
        if (count == 0) return;
        const float* cm = reinterpret_cast<const float*>(data);
        f(swap_begin_ + lo, count, cm, cm + chunk_elements_);
      },
      offload::SwapFile::Mode::kRead);
}

absl::Status AdamWOptimizer::WriteOffloadedMoments(
    const std::function<absl::Status(size_t, size_t, float*, float*)>& f) {
  if (!swap_) return absl::FailedPreconditionError("the optimizer state is not offloaded");
  const size_t n = shard_end_ - swap_begin_;
  absl::Status first_error;
  auto streamed = swap_->Stream(
      [&](size_t c, char* data) {
        const size_t lo = c * chunk_elements_, count = lo < n ? std::min(chunk_elements_, n - lo) : 0;
        if (count == 0 || !first_error.ok()) return;
        float* cm = reinterpret_cast<float*>(data);
        first_error = f(swap_begin_ + lo, count, cm, cm + chunk_elements_);
      },
      offload::SwapFile::Mode::kWrite);
  return first_error.ok() ? streamed : first_error;
}

absl::Status AdamWOptimizer::OffloadToNvme(const std::string& dir, const offload::SwapOptions& options,
                                           double fraction) {
  if (backend_->name() != "cpu" || backend_->accum_dtype() != DType::kF32) {
    return absl::FailedPreconditionError(StrCat(
        "offload.optimizer: nvme on the ", backend_->name(),
        " backend moves the optimizer state to host memory, and its moments on to the NVMe tier, with "
        "OffloadToHost"));
  }
  if (!(fraction > 0 && fraction <= 1)) {
    return absl::InvalidArgumentError(StrCat("offload.nvme_fraction ", fraction, " is not within (0, 1]"));
  }
  if (swap_) return absl::OkStatus();
  // The last `fraction` of the shard's elements go to the swap.
  const size_t swapped = SwappedElements(shard_end_ - shard_begin_, fraction);
  const size_t swap_begin = shard_end_ - swapped;
  const offload::SwapOptions o = ChunkedSwapOptions(options);
  auto swap = offload::SwapFile::Create(dir, SwapFileBytes(swapped, o.chunk_bytes), o);
  if (!swap.ok()) return swap.status();
  swap_ = std::move(*swap);
  swap_begin_ = swap_begin;
  // Moments already in memory (a restored checkpoint's): those of the swapped elements
  // move into the swap, the others into buffers of their own size. Untouched moments
  // are zeros, which a fresh swap file already reads as.
  if (m_ != nullptr) {
    const float* m = static_cast<const float*>(m_);
    const float* v = static_cast<const float*>(v_);
    auto s = WriteOffloadedMoments([&](size_t begin, size_t count, float* cm, float* cv) {
      std::copy_n(m + (begin - shard_begin_), count, cm);
      std::copy_n(v + (begin - shard_begin_), count, cv);
      return absl::OkStatus();
    });
    if (!s.ok()) {  // all moments stay in memory, as before
      swap_.reset();
      swap_begin_ = shard_end_;
      return s;
    }
    KeepMoments(shard_begin_, swap_begin);
  }
  memory_end_ = swap_begin;
  // The moments kept in memory and the pipeline's buffers.
  state_bytes_ = 2 * (memory_end_ - shard_begin_) * sizeof(float) + 3 * o.chunk_bytes;
  return absl::OkStatus();
}

void AdamWOptimizer::Shard(size_t begin, size_t end) {
  if (swap_ || host_) {  // the moments are elsewhere: shard first, then offload (Trainer does)
    std::fprintf(stderr, "llamad: AdamWOptimizer::Shard after offloading\n");
    std::abort();
  }
  KeepMoments(begin, end);
  shard_begin_ = begin;
  shard_end_ = memory_end_ = swap_begin_ = end;
  state_bytes_ = 2 * (end - begin) * DTypeSize(backend_->accum_dtype());
}

offload::SwapOptions AdamWOptimizer::ChunkedSwapOptions(const offload::SwapOptions& options) {
  chunk_elements_ = SwapChunkElements(options.chunk_bytes);
  offload::SwapOptions o = options;
  o.chunk_bytes = chunk_elements_ * 2 * sizeof(float);  // exp_avg and exp_avg_sq of the same elements
  return o;
}

void AdamWOptimizer::KeepMoments(size_t begin, size_t end) {
  if (m_ == nullptr) return;  // not allocated yet: they are zeros, allocated at first use
  const size_t elem = DTypeSize(backend_->accum_dtype());
  void* m = nullptr;
  void* v = nullptr;
  if (end > begin) {
    m = backend_->Allocate(end - begin, backend_->accum_dtype());
    v = backend_->Allocate(end - begin, backend_->accum_dtype());
    backend_->Copy(m, static_cast<char*>(m_) + (begin - shard_begin_) * elem, end - begin);
    backend_->Copy(v, static_cast<char*>(v_) + (begin - shard_begin_) * elem, end - begin);
  }
  backend_->Free(m_);
  backend_->Free(v_);
  m_ = m;
  v_ = v;
}

}  // namespace llamad
