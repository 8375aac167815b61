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
    : model_(model), backend_(backend), options_(options) {
  m_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
  v_ = backend_->Allocate(model_->num_params(), backend_->accum_dtype());
}

AdamWOptimizer::~AdamWOptimizer() {
  backend_->Free(m_);
  backend_->Free(v_);
}

void AdamWOptimizer::Step(double lr, double grad_scale) {
  ++step_;
  auto accum = [&](void* base, size_t offset) {
    return static_cast<char*>(base) + model_->accum_byte_offset(offset);
  };
  const bool master = model_->master_data() != model_->param_data();
  AdamWStep s{lr, options_.beta1, options_.beta2, options_.eps, 0.0, step_, grad_scale};
  for (const ParamInfo& p : model_->params()) {
    s.weight_decay = p.decay ? options_.weight_decay : 0.0;
    backend_->AdamW(static_cast<char*>(model_->param_data()) + model_->param_byte_offset(p.offset),
                    master ? accum(model_->master_data(), p.offset) : nullptr,
                    accum(model_->grad_data(), p.offset), accum(m_, p.offset),
                    accum(v_, p.offset), p.numel, s);
  }
}

}  // namespace llamad
