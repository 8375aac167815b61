#include "model/llama.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include <cmath>

#include "core/strings.h"

namespace llamad {

std::vector<ParamInfo> LlamaParamLayout(const ModelConfig& c) {
  std::vector<ParamInfo> out;
  size_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay) {
    size_t numel = 1;
    for (int64_t d : shape) numel *= size_t(d);
    out.push_back({std::move(name), std::move(shape), offset, numel, decay});
    offset += numel;
  };
  const int64_t C = c.hidden_size, F = c.intermediate_size, D = c.head_dim();
  add("model.embed_tokens.weight", {c.vocab_size, C}, true);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {C}, false);
    add(p + "self_attn.q_proj.weight", {c.num_attention_heads * D, C}, true);
    add(p + "self_attn.k_proj.weight", {c.num_key_value_heads * D, C}, true);
    add(p + "self_attn.v_proj.weight", {c.num_key_value_heads * D, C}, true);
    add(p + "self_attn.o_proj.weight", {C, c.num_attention_heads * D}, true);
    add(p + "post_attention_layernorm.weight", {C}, false);
    add(p + "mlp.gate_proj.weight", {F, C}, true);
    add(p + "mlp.up_proj.weight", {F, C}, true);
    add(p + "mlp.down_proj.weight", {C, F}, true);
  }
  add("model.norm.weight", {C}, false);
  add("lm_head.weight", {c.vocab_size, C}, true);
  return out;
}

LlamaModel::LlamaModel(const ModelConfig& config, Backend* backend, const LlamaOptions& options)
    : config_(config), backend_(backend), options_(options), params_(LlamaParamLayout(config)) {
  num_params_ = params_.back().offset + params_.back().numel;
  grad_end_ = param_end_ = param_held_end_ = master_end_ = replicated_begin_ = num_params_;
  const bool shard = options.shard_end > options.shard_begin;
  if (shard && (options.shard_end > num_params_)) {
    std::fprintf(stderr, "llamad: LlamaModel shard [%zu, %zu) beyond the model's %zu elements\n",
                 options.shard_begin, options.shard_end, num_params_);
    std::abort();
  }
  if (shard && options.shard_parameters) {
    // The shard's part before the replicated regions, if any; those after it whole.
    replicated_begin_ = std::min(options.replicated_begin, num_params_);
    param_begin_ = std::min(options.shard_begin, replicated_begin_);
    param_end_ = std::min(options.shard_end, replicated_begin_);
    param_held_end_ = param_end_;
    params_data_ = backend_->Allocate(std::max<size_t>(1, param_end_ - param_begin_));
    if (replicated_begin_ < num_params_) replica_ = backend_->Allocate(num_params_ - replicated_begin_);
    param_scratch_elements_ = LargestGradientRegion(config_);
    param_scratch_[0] = backend_->Allocate(param_scratch_elements_);
  } else {
    params_data_ = backend_->Allocate(num_params_);
  }
  // The gradients come at their first use (EnsureGrads): a ZeRO-2/3 rank shards them
  // before training and so never holds them whole.
  if (!backend_->needs_master_weights()) {
    master_data_ = params_data_;
  } else if (shard) {
    master_begin_ = options.shard_begin;
    master_end_ = options.shard_end;
    master_data_ = backend_->Allocate(master_end_ - master_begin_, backend_->accum_dtype());
  } else {
    master_data_ = backend_->Allocate(num_params_, backend_->accum_dtype());
  }
}

LlamaModel::~LlamaModel() {
  FreeActivations();
  if (master_data_ != params_data_) backend_->Free(master_data_);
  backend_->Free(params_data_);
  backend_->Free(replica_);
  backend_->Free(grads_data_);
  backend_->Free(grad_scratch_);
  for (void* scratch : param_scratch_) backend_->Free(scratch);
}

void LlamaModel::EnsureGrads() {
  if (grads_data_ != nullptr) return;
  grads_data_ = backend_->Allocate(grad_end_ - grad_begin_, backend_->accum_dtype());  // zeros
}

void* LlamaModel::grad_data() {
  EnsureGrads();
  return grads_data_;
}

void* LlamaModel::grad_at(size_t offset) {
  EnsureGrads();
  return static_cast<char*>(grads_data_) + accum_byte_offset(offset - grad_begin_);
}

size_t LlamaModel::grad_bytes() const {
  return accum_byte_offset(grad_end_ - grad_begin_ + grad_scratch_elements_);
}

size_t LargestGradientRegion(const ModelConfig& config) {
  // The regions Run hands out: final norm and LM head, each layer, the embedding.
  const std::vector<ParamInfo> params = LlamaParamLayout(config);
  const size_t n = params.back().offset + params.back().numel;
  size_t largest = std::max(n - params[params.size() - 2].offset, params.front().numel);
  for (size_t l = 0; l < size_t(config.num_hidden_layers); ++l) {
    largest = std::max(largest, params[1 + 9 * (l + 1)].offset - params[1 + 9 * l].offset);
  }
  return largest;
}

size_t ReplicatedBegin(const ModelConfig& config, double sharded_share) {
  const std::vector<ParamInfo> params = LlamaParamLayout(config);
  const size_t n = params.back().offset + params.back().numel;
  if (sharded_share >= 1) return n;
  const double at = sharded_share * double(n);
  // Region starts: the embedding, each layer (params[1 + 9 l]), the final norm and LM
  // head (params[1 + 9 L]); then the end.
  std::vector<size_t> boundaries = {0};
  for (size_t l = 0; l <= size_t(config.num_hidden_layers); ++l) boundaries.push_back(params[1 + 9 * l].offset);
  boundaries.push_back(n);
  for (size_t b : boundaries) {
    if (double(b) >= at) return b;
  }
  return n;
}

void LlamaModel::ShardGradients(size_t begin, size_t end, GradSink sink) {
  const size_t largest = LargestGradientRegion(config_);
  backend_->Free(grads_data_);  // null when never used
  grads_data_ = backend_->Allocate(end - begin, backend_->accum_dtype());
  grad_scratch_ = backend_->Allocate(largest, backend_->accum_dtype());
  grad_scratch_elements_ = largest;
  grad_begin_ = begin;
  grad_end_ = end;
  grad_sink_ = std::move(sink);
}

void* LlamaModel::param_at(size_t offset) {
  if (offset >= replicated_begin_) return static_cast<char*>(replica_) + param_byte_offset(offset - replicated_begin_);
  if (offset >= param_held_end_ && param_held_end_ < param_end_) {
    std::fprintf(stderr, "llamad: parameter %zu is in host memory (the device holds [%zu, %zu))\n", offset,
                 param_begin_, param_held_end_);
    std::abort();
  }
  return static_cast<char*>(params_data_) + param_byte_offset(offset - param_begin_);
}

size_t LlamaModel::param_bytes() const {
  return param_byte_offset(param_held_end_ - param_begin_ + (param_prefetch_ ? 2 : 1) * param_scratch_elements_ +
                           (num_params_ - replicated_begin_));
}

void LlamaModel::GatherParametersWith(ParamGather gather, bool prefetch) {
  if (param_scratch_[0] == nullptr) {
    std::fprintf(stderr, "llamad: LlamaModel::GatherParametersWith on a model built without shard_parameters\n");
    std::abort();
  }
  if (prefetch && param_scratch_[1] == nullptr) param_scratch_[1] = backend_->Allocate(param_scratch_elements_);
  param_gather_ = std::move(gather);
  param_prefetch_ = prefetch;
}

void LlamaModel::BeginGradRegion(size_t begin) {
  if (!grad_sink_) return;
  region_begin_ = begin;
  backend_->Zero(grad_scratch_, grad_scratch_elements_);
}

void LlamaModel::EndGradRegion(size_t begin, size_t end) {
  if (grad_sink_) grad_sink_(begin, end, grad_scratch_);
  if (grad_ready_) grad_ready_(begin, end);
}

size_t LlamaModel::param_byte_offset(size_t offset) const {
  return offset * DTypeSize(backend_->dtype());
}

size_t LlamaModel::accum_byte_offset(size_t offset) const {
  return offset * DTypeSize(backend_->accum_dtype());
}

void LlamaModel::InitWeights(uint64_t seed) {
  const auto [held_begin, held_end] = held_master_range();
  ForEachTensorPart(params_, held_begin, held_end, [&](const ParamInfo& p, size_t lo, size_t hi) {
    if (p.shape.size() == 1) {
      backend_->Fill(master_at(lo), hi - lo, 1.0);
    } else {
      const uint64_t stream = uint64_t(&p - params_.data());  // each tensor its own
      backend_->FillNormal(master_at(lo), hi - lo, 0.02, seed, stream, /*first=*/lo - p.offset);
    }
  });
  SyncParamsFromMaster();
}

void LlamaModel::SyncParamsFromMaster() {
  if (master_data_ == params_data_ || master_data_ == nullptr) return;
  // In two parts where the master weights span the shard and the replica.
  const size_t split = std::clamp(replicated_begin_, master_begin_, master_end_);
  if (split > master_begin_) backend_->Copy(param_at(master_begin_), master_data_, split - master_begin_);
  if (master_end_ > split) backend_->Copy(param_at(split), master_at(split), master_end_ - split);
}

void* LlamaModel::master_at(size_t offset) {
  if (master_data_ == params_data_) return param_at(offset);
  if (master_data_ == nullptr || offset < master_begin_ || offset > master_end_) {
    std::fprintf(stderr, "llamad: master weight %zu outside the held [%zu, %zu)\n", offset, master_begin_,
                 master_data_ == nullptr ? master_begin_ : master_end_);
    std::abort();
  }
  return static_cast<char*>(master_data_) + accum_byte_offset(offset - master_begin_);
}

void LlamaModel::TrimMasterWeights(size_t end) {
  if (master_data_ == params_data_ || master_data_ == nullptr) return;
  end = std::clamp(end, master_begin_, master_end_);
  if (end == master_end_) return;
  if (end == master_begin_) {
    backend_->Free(master_data_);
    master_data_ = nullptr;
    master_end_ = end;  // held_master_range() is empty
    return;
  }
  void* kept = backend_->Allocate(end - master_begin_, backend_->accum_dtype());
  backend_->Copy(kept, master_data_, end - master_begin_);
  backend_->Free(master_data_);
  master_data_ = kept;
  master_end_ = end;
}

void LlamaModel::TrimParamShard(size_t end) {
  // Parameters not sharded, or the backend's parameters are its master weights (which
  // the optimizer steps in place): nothing to trim.
  if (param_scratch_[0] == nullptr || master_data_ == params_data_) return;
  end = std::clamp(end, param_begin_, param_held_end_);
  if (end == param_held_end_) return;
  void* kept = backend_->Allocate(std::max<size_t>(1, end - param_begin_));
  if (end > param_begin_) backend_->Copy(kept, params_data_, end - param_begin_);
  backend_->Free(params_data_);
  params_data_ = kept;
  param_held_end_ = end;
}

void LlamaModel::ZeroGrads() {
  EnsureGrads();
  backend_->Zero(grads_data_, grad_end_ - grad_begin_);
}

void* LlamaModel::ParamPtr(size_t offset) const {
  if (!param_gather_) return static_cast<char*>(params_data_) + param_byte_offset(offset);
  if (offset >= replicated_begin_) return static_cast<char*>(replica_) + param_byte_offset(offset - replicated_begin_);
  return static_cast<char*>(param_scratch_[param_slot_]) + param_byte_offset(offset - param_region_begin_);
}

void* LlamaModel::GradPtr(size_t offset) const {
  if (!grad_sink_) return static_cast<char*>(grads_data_) + accum_byte_offset(offset);
  return static_cast<char*>(grad_scratch_) + accum_byte_offset(offset - region_begin_);
}

LlamaModel::LayerWeights LlamaModel::LayerPointers(int layer, bool grads) const {
  const size_t first = 1 + size_t(layer) * 9;  // Index of the layer's input_layernorm.
  auto at = [&](size_t k) -> void* {
    const size_t offset = params_[first + k].offset;
    return grads ? GradPtr(offset) : ParamPtr(offset);
  };
  return {at(0), at(1), at(4), at(5), at(6), at(8)};
}

void LlamaModel::UseParamRegion(const std::vector<std::pair<size_t, size_t>>& regions, size_t k) {
  if (!param_gather_) return;
  const std::pair<size_t, size_t> region = regions[k];
  auto held = [&](const std::pair<size_t, size_t>& r) { return r.first >= replicated_begin_; };
  // A region of the replica is read in place (ParamPtr); any other goes into a slot.
  if (!held(region)) {
    if (has_prefetch_ && prefetched_ == region) {
      if (prefetch_wait_) prefetch_wait_();
      param_slot_ = 1 - param_slot_;  // the prefetch went into the slot not in use
    } else if (slot_region_[param_slot_] == region) {
      // Still in the slot in use (the region before was read from the replica).
    } else {
      // Not prefetched (the first region of a Run). Any other prefetch is a collective
      // already started: it must end before its slot is written again.
      if (has_prefetch_ && prefetch_wait_) prefetch_wait_();
      param_slot_ = param_prefetch_ ? 1 - param_slot_ : 0;
      slot_region_[param_slot_] = region;
      if (ParamWait wait = param_gather_(region.first, region.second, param_scratch_[param_slot_])) wait();
    }
    has_prefetch_ = false;
    prefetch_wait_ = nullptr;
    param_region_begin_ = region.first;
  }
  // Start the gather of the next slot-held region into the slot not in use, unless it is
  // there already (the last layer, used again by the backward right after the LM head).
  if (!param_prefetch_ || has_prefetch_) return;
  size_t next = k + 1;
  while (next < regions.size() && held(regions[next])) ++next;
  if (next >= regions.size() || regions[next] == slot_region_[param_slot_]) return;
  const int other = 1 - param_slot_;
  prefetched_ = regions[next];
  has_prefetch_ = true;
  if (slot_region_[other] == prefetched_) {
    prefetch_wait_ = nullptr;
    return;
  }
  slot_region_[other] = prefetched_;
  prefetch_wait_ = param_gather_(prefetched_.first, prefetched_.second, param_scratch_[other]);
}

size_t LayoutActivations(const ModelConfig& config, int batch, int seq, bool grad_checkpoint,
                         DType dtype, DType accum, ActivationBuffers& a,
                         const std::function<void*(size_t, DType)>& alloc) {
  const size_t N = size_t(batch) * seq, C = config.hidden_size, F = config.intermediate_size;
  const size_t QKV = config.qkv_dim(), H = config.num_attention_heads;
  size_t total = 0;
  auto take = [&](size_t numel) {
    total += numel * DTypeSize(dtype);
    return alloc(numel, dtype);
  };
  auto take_accum = [&](size_t numel) {
    total += numel * DTypeSize(accum);
    return alloc(numel, accum);
  };
  const int L = int(config.num_hidden_layers);
  a.residual.clear();
  for (int l = 0; l <= L; ++l) a.residual.push_back(take(N * C));
  a.layers.assign(grad_checkpoint ? 1 : L, LayerActivations{});
  for (auto& layer : a.layers) {
    layer.ln1 = take(N * C);
    layer.rstd1 = take_accum(N);
    layer.qkv = take(N * QKV);
    layer.attn = take(N * C);
    layer.lse = take_accum(size_t(batch) * H * seq);
    layer.x_mid = take(N * C);
    layer.ln2 = take(N * C);
    layer.rstd2 = take_accum(N);
    layer.gate_up = take(N * 2 * F);
    layer.h = take(N * F);
  }
  a.final_norm = take(N * C);
  a.final_rstd = take_accum(N);
  a.rope_table = take_accum(size_t(seq) * config.head_dim());
  a.d_residual = take(N * C);
  a.d_norm = take(N * C);
  a.d_attn = take(N * C);
  a.d_qkv = take(N * QKV);
  a.d_h = take(N * F);
  a.d_gate_up = take(N * 2 * F);
  return total;
}

void LlamaModel::FreeActivations() {
  for (void* p : owned_) backend_->Free(p);
  owned_.clear();
  acts_ = ActivationBuffers{};
  activation_bytes_ = 0;
  batch_ = seq_ = capacity_batch_ = 0;
}

void LlamaModel::EnsureActivations(int batch, int seq) {
  // Buffers laid out for a larger batch serve a smaller one (every op takes its sizes),
  // so a rank's shorter last micro-batch does not reallocate.
  if (seq == seq_ && batch <= capacity_batch_) {
    batch_ = batch;
    return;
  }
  FreeActivations();
  batch_ = capacity_batch_ = batch;
  seq_ = seq;
  const size_t before = backend_->allocated_bytes();
  LayoutActivations(config_, batch, seq, options_.grad_checkpoint, backend_->dtype(),
                    backend_->accum_dtype(), acts_, [&](size_t numel, DType type) {
                      void* p = backend_->Allocate(numel, type);
                      owned_.push_back(p);
                      return p;
                    });
  backend_->RopeTable(acts_.rope_table, seq, int(config_.head_dim()), config_.rope_theta);
  activation_bytes_ = backend_->allocated_bytes() - before;
}

void LlamaModel::LayerForward(int layer, const void* x_in, void* x_out, LayerActivations& a) {
  Backend& be = *backend_;
  const LayerWeights w = LayerPointers(layer, /*grads=*/false);
  const int N = batch_ * seq_, C = int(config_.hidden_size), F = int(config_.intermediate_size);
  const int QKV = int(config_.qkv_dim());
  const AttentionShape shape{batch_, seq_, int(config_.num_attention_heads),
                             int(config_.num_key_value_heads), int(config_.head_dim())};
  const int block = options_.attention_block > 0 ? options_.attention_block : seq_;
  be.RmsNorm(a.ln1, a.rstd1, x_in, w.ln1, N, C, config_.rms_norm_eps);
  be.Linear(a.qkv, a.ln1, w.qkv, N, C, QKV, false);
  be.Rope(a.qkv, acts_.rope_table, shape, /*inverse=*/false);
  be.Attention(a.attn, a.lse, a.qkv, shape, block);
  be.Copy(a.x_mid, x_in, size_t(N) * C);
  be.Linear(a.x_mid, a.attn, w.o, N, C, C, /*accumulate=*/true);
  be.RmsNorm(a.ln2, a.rstd2, a.x_mid, w.ln2, N, C, config_.rms_norm_eps);
  be.Linear(a.gate_up, a.ln2, w.gate_up, N, C, 2 * F, false);
  be.SwiGlu(a.h, a.gate_up, N, F);
  if (x_out != nullptr) {
    be.Copy(x_out, a.x_mid, size_t(N) * C);
    be.Linear(x_out, a.h, w.down, N, F, C, /*accumulate=*/true);
  }
}

void LlamaModel::LayerBackward(int layer, const void* x_in, void* dres, LayerActivations& a) {
  Backend& be = *backend_;
  const LayerWeights w = LayerPointers(layer, /*grads=*/false);
  const LayerWeights g = LayerPointers(layer, /*grads=*/true);
  const int N = batch_ * seq_, C = int(config_.hidden_size), F = int(config_.intermediate_size);
  const int QKV = int(config_.qkv_dim());
  const AttentionShape shape{batch_, seq_, int(config_.num_attention_heads),
                             int(config_.num_key_value_heads), int(config_.head_dim())};
  const int block = options_.attention_block > 0 ? options_.attention_block : seq_;
  // MLP branch: x_out = x_mid + down(swiglu(gate_up(norm2(x_mid)))).
  be.LinearBackward(acts_.d_h, g.down, dres, a.h, w.down, N, F, C, false);
  be.SwiGluBackward(acts_.d_gate_up, acts_.d_h, a.gate_up, N, F);
  be.LinearBackward(acts_.d_norm, g.gate_up, acts_.d_gate_up, a.ln2, w.gate_up, N, C, 2 * F, false);
  be.RmsNormBackward(dres, g.ln2, acts_.d_norm, a.x_mid, w.ln2, a.rstd2, N, C, /*accumulate_dx=*/true);
  // Attention branch: x_mid = x_in + o(attention(rope(qkv(norm1(x_in))))).
  be.LinearBackward(acts_.d_attn, g.o, dres, a.attn, w.o, N, C, C, false);
  be.AttentionBackward(acts_.d_qkv, acts_.d_attn, a.attn, a.lse, a.qkv, shape, block);
  be.Rope(acts_.d_qkv, acts_.rope_table, shape, /*inverse=*/true);
  be.LinearBackward(acts_.d_norm, g.qkv, acts_.d_qkv, a.ln1, w.qkv, N, C, QKV, false);
  be.RmsNormBackward(dres, g.ln1, acts_.d_norm, x_in, w.ln1, a.rstd1, N, C, /*accumulate_dx=*/true);
}

double LlamaModel::Run(const int32_t* tokens, const int32_t* targets, int batch, int seq,
                       double grad_scale, bool backward) {
  EnsureActivations(batch, seq);
  Backend& be = *backend_;
  const int N = batch * seq, C = int(config_.hidden_size), V = int(config_.vocab_size);
  const int L = int(config_.num_hidden_layers);
  // Tensor p's parameters and gradient in the regions in use (UseParamRegion,
  // BeginGradRegion).
  auto param = [&](const ParamInfo& p) { return ParamPtr(p.offset); };
  auto grad = [&](const ParamInfo& p) { return GradPtr(p.offset); };
  const ParamInfo& embed = params_.front();
  const ParamInfo& head = params_.back();
  const ParamInfo& norm = params_[params_.size() - 2];
  const bool ckpt = options_.grad_checkpoint;

  auto layer_begin = [&](int l) { return params_[1 + 9 * size_t(l)].offset; };
  // The parameter regions in the order this Run uses them (the embedding's backward
  // needs no parameters), so that each region's gather can start ahead of its use.
  std::vector<std::pair<size_t, size_t>> regions;
  if (param_gather_) {
    regions.emplace_back(0, embed.numel);
    for (int l = 0; l < L; ++l) regions.emplace_back(layer_begin(l), layer_begin(l + 1));
    regions.emplace_back(norm.offset, num_params_);  // final norm and LM head
    for (int l = L - 1; backward && l >= 0; --l) regions.emplace_back(layer_begin(l), layer_begin(l + 1));
  }
  size_t next_region = 0;
  auto use_next_region = [&] { UseParamRegion(regions, next_region++); };
  // What the scratch slots held came from before the last step: gather anew.
  slot_region_[0] = slot_region_[1] = {0, 0};
  use_next_region();  // the embedding
  be.Embedding(acts_.residual[0], tokens, param(embed), N, C);
  for (int l = 0; l < L; ++l) {
    use_next_region();
    LayerForward(l, acts_.residual[l], acts_.residual[l + 1], acts_.layers[ckpt ? 0 : l]);
  }
  use_next_region();  // final norm and LM head
  be.RmsNorm(acts_.final_norm, acts_.final_rstd, acts_.residual[L], param(norm), N, C,
             config_.rms_norm_eps);
  if (backward) BeginGradRegion(norm.offset);  // final norm and LM head
  const double loss = be.LmHeadCrossEntropy(acts_.final_norm, param(head), targets, N, C, V,
                                            grad_scale, backward ? acts_.d_norm : nullptr,
                                            backward ? grad(head) : nullptr);
  if (!backward) return loss;

  be.RmsNormBackward(acts_.d_residual, grad(norm), acts_.d_norm, acts_.residual[L], param(norm),
                     acts_.final_rstd, N, C, /*accumulate_dx=*/false);
  EndGradRegion(norm.offset, num_params_);
  for (int l = L - 1; l >= 0; --l) {
    LayerActivations& a = acts_.layers[ckpt ? 0 : l];
    const size_t begin = layer_begin(l), end = layer_begin(l + 1);
    use_next_region();
    // The forward left the last layer's activations in the shared set.
    if (ckpt && l != L - 1) LayerForward(l, acts_.residual[l], /*x_out=*/nullptr, a);
    BeginGradRegion(begin);
    LayerBackward(l, acts_.residual[l], acts_.d_residual, a);
    EndGradRegion(begin, end);
  }
  BeginGradRegion(0);
  be.EmbeddingBackward(grad(embed), acts_.d_residual, tokens, N, C);
  EndGradRegion(0, embed.numel);
  return loss;
}

void LlamaModel::Logits(const int32_t* tokens, int batch, int seq, float* out) {
  const std::vector<int32_t> ignored(size_t(batch) * seq, -1);
  Run(tokens, ignored.data(), batch, seq, 1.0, /*backward=*/false);  // fills final_norm
  const size_t n = size_t(batch) * seq, vocab = size_t(config_.vocab_size);
  void* logits = backend_->Allocate(n * vocab);
  backend_->Linear(logits, acts_.final_norm, ParamPtr(params_.back().offset),  // Run left its region in use
                   int(n), int(config_.hidden_size), int(vocab), false);
  backend_->DownloadF32(out, logits, n * vocab);
  backend_->Free(logits);
}

double LlamaModel::ForwardBackward(const int32_t* tokens, const int32_t* targets, int batch,
                                   int seq, double grad_scale) {
  EnsureGrads();
  return Run(tokens, targets, batch, seq, grad_scale, true);
}

double LlamaModel::Forward(const int32_t* tokens, const int32_t* targets, int batch, int seq) {
  return Run(tokens, targets, batch, seq, 1.0, false);
}

}  // namespace llamad
