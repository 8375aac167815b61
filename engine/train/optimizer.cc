#include "train/optimizer.h"

#include <algorithm>
#include <cmath>

namespace llamad {

double LrSchedule::At(int64_t step) const {
  if (step < warmup_steps) return max_lr * double(step + 1) / double(warmup_steps);
  const double min_lr = max_lr * min_lr_ratio;
  const int64_t decay_steps = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = std::clamp(double(step - warmup_steps) / double(decay_steps), 0.0, 1.0);
  return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

AdamWOptimizer::AdamWOptimizer(LlamaModel* model, Backend* backend, const AdamWOptions& options)
    : model_(model), backend_(backend), options_(options), shard_end_(model->num_params()) {
  m_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
  v_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
  state_bytes_ = 2 * model_->num_params() * DTypeSize(backend_->accum_dtype());
}

AdamWOptimizer::~AdamWOptimizer() {
  backend_->Free(m_);
  backend_->Free(v_);
  if (unsharded_) {
    backend_->Free(shard_m_);
    backend_->Free(shard_v_);
  }
}

void AdamWOptimizer::Step(double lr, double grad_scale) {
  ++step_;
  const size_t elem = DTypeSize(backend_->accum_dtype());
  auto accum = [&](void* base, size_t offset) {
    return static_cast<char*>(base) + model_->accum_byte_offset(offset);
  };
  const bool master = model_->master_data() != model_->param_data();
  AdamWStep s{lr, options_.beta1, options_.beta2, options_.eps, 0.0, step_, grad_scale};
  for (const ParamInfo& p : model_->params()) {
    // The part of this tensor inside the shard (all of it without sharding).
    const size_t begin = std::max(p.offset, shard_begin_), end = std::min(p.offset + p.numel, shard_end_);
    if (begin >= end) continue;
    s.weight_decay = p.decay ? options_.weight_decay : 0.0;
    backend_->AdamW(static_cast<char*>(model_->param_data()) + model_->param_byte_offset(begin),
                    master ? accum(model_->master_data(), begin) : nullptr,
                    accum(model_->grad_data(), begin),
                    static_cast<char*>(m_) + (begin - shard_begin_) * elem,
                    static_cast<char*>(v_) + (begin - shard_begin_) * elem, end - begin, s);
  }
}

void AdamWOptimizer::Shard(size_t begin, size_t end) {
  const size_t elem = DTypeSize(backend_->accum_dtype());
  void* m = backend_->Allocate(end - begin, backend_->accum_dtype());
  void* v = backend_->Allocate(end - begin, backend_->accum_dtype());
  backend_->Copy(m, static_cast<char*>(m_) + (begin - shard_begin_) * elem, end - begin);
  backend_->Copy(v, static_cast<char*>(v_) + (begin - shard_begin_) * elem, end - begin);
  backend_->Free(m_);
  backend_->Free(v_);
  m_ = m;
  v_ = v;
  shard_begin_ = begin;
  shard_end_ = end;
  state_bytes_ = 2 * (end - begin) * elem;
}

void AdamWOptimizer::Unshard(const std::function<void(float*, float*, const float*, const float*)>& fill) {
  shard_m_ = m_;
  shard_v_ = v_;
  m_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
  v_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
  fill(static_cast<float*>(m_), static_cast<float*>(v_), static_cast<const float*>(shard_m_),
       static_cast<const float*>(shard_v_));
  unsharded_ = true;
}

void AdamWOptimizer::Reshard() {
  backend_->Free(m_);
  backend_->Free(v_);
  m_ = shard_m_;
  v_ = shard_v_;
  shard_m_ = shard_v_ = nullptr;
  unsharded_ = false;
}

}  // namespace llamad
