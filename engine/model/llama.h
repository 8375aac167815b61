// The LLaMA decoder (Hugging Face LlamaForCausalLM math) with an explicit forward and
// backward per layer, on any Backend. Owns its parameters, gradients and activations.
//
// Parameters live in one contiguous buffer in the order of params(); q|k|v projections
// are adjacent so that one GEMM computes all three, and so are gate|up. Gradients (and,
// on a backend with master weights, the master copy) use the same layout in the
// backend's accum_dtype().
#pragma once

#include <algorithm>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/config.h"

namespace llamad {

struct ParamInfo {
  std::string name;             // Hugging Face name, e.g. "model.layers.0.mlp.up_proj.weight".
  std::vector<int64_t> shape;   // [out, in] for linear weights.
  size_t offset = 0;            // Element offset in the parameter (and gradient) buffer.
  size_t numel = 0;
  bool decay = false;           // Weight decay applies (matrices) or not (norm weights).
};

// Parameter tensors in buffer order, for a config.
std::vector<ParamInfo> LlamaParamLayout(const ModelConfig& config);

// Calls f(param, lo, hi) with each tensor's part [lo, hi) (flat elements) of the range
// [begin, end), in layout order: a shard, a chunk or a rank's slice cut at tensors.
template <typename F>
void ForEachTensorPart(const std::vector<ParamInfo>& params, size_t begin, size_t end, F&& f) {
  for (const ParamInfo& p : params) {
    const size_t lo = std::max(p.offset, begin), hi = std::min(p.offset + p.numel, end);
    if (lo < hi) f(p, lo, hi);
  }
}
// Elements of the largest region the backward writes at once (the LM head and final
// norm, one layer, or the embedding): the scratch a ZeRO-2 rank holds besides its shard.
size_t LargestGradientRegion(const ModelConfig& config);
// gemini's partial sharding: the first region boundary (the embedding's end, a layer's
// start, the final norm's) at or after share x the flat elements, the whole count for a
// share of 1. zero3 shards the regions before it; every rank holds those after it whole.
size_t ReplicatedBegin(const ModelConfig& config, double sharded_share);

struct LlamaOptions {
  // Keep only each layer's input during the forward and recompute the rest of the layer
  // in the backward (activation checkpointing per layer).
  bool grad_checkpoint = false;
  // Attention tile size; 0 means the unfused algorithm (one tile spans the sequence).
  int attention_block = 64;
  // ZeRO: the model is built holding only this rank's shard [shard_begin, shard_end) of
  // the flat elements: of the separate master weights, and with shard_parameters of the
  // parameters too (with their region scratch), so that no rank ever holds the whole
  // model. shard_end 0: the whole model.
  size_t shard_begin = 0, shard_end = 0;
  bool shard_parameters = false;
  // gemini's partial sharding (with shard_parameters): the flat elements from
  // replicated_begin on (a region boundary, ReplicatedBegin) are held whole on every
  // rank, in a buffer the layers read in place (replica()); the shard holds only its part
  // before it. The optimizer updates this rank's part of the replica there, and the
  // caller brings the others' parts after each step. SIZE_MAX: none.
  size_t replicated_begin = SIZE_MAX;
};

struct LayerActivations {
  void* ln1 = nullptr;      // [N, C] input norm output
  void* rstd1 = nullptr;    // [N]
  void* qkv = nullptr;      // [N, qkv_dim], q and k rotated
  void* attn = nullptr;     // [N, C] attention output (before o_proj)
  void* lse = nullptr;      // [B, H, T]
  void* x_mid = nullptr;    // [N, C] residual after attention
  void* ln2 = nullptr;      // [N, C]
  void* rstd2 = nullptr;    // [N]
  void* gate_up = nullptr;  // [N, 2F]
  void* h = nullptr;        // [N, F] SwiGLU output
};

// Every activation and backward scratch buffer of one (batch, seq) shape.
struct ActivationBuffers {
  std::vector<void*> residual;           // L + 1 buffers [N, C]: every layer's input
  std::vector<LayerActivations> layers;  // L sets, or 1 shared set with checkpointing
  void* final_norm = nullptr;            // [N, C]
  void* final_rstd = nullptr;            // [N]
  void* rope_table = nullptr;            // [T, D/2, 2]
  // Backward scratch.
  void* d_residual = nullptr;            // [N, C]
  void* d_norm = nullptr;                // [N, C]
  void* d_attn = nullptr;                // [N, C]
  void* d_qkv = nullptr;                 // [N, qkv_dim]
  void* d_h = nullptr;                   // [N, F]
  void* d_gate_up = nullptr;             // [N, 2F]
};

// Lays out the buffers of `acts` for (batch, seq), taking each from alloc(numel, type):
// activations in `dtype`, per-row statistics and the RoPE table in `accum`. Returns the
// total bytes. With an alloc that returns nullptr it only counts (memory planning).
size_t LayoutActivations(const ModelConfig& config, int batch, int seq, bool grad_checkpoint,
                         DType dtype, DType accum, ActivationBuffers& acts,
                         const std::function<void*(size_t, DType)>& alloc);

class LlamaModel {
 public:
  // Allocates parameters and gradients (zeroed) on `backend`, which must outlive it.
  LlamaModel(const ModelConfig& config, Backend* backend, const LlamaOptions& options = {});
  ~LlamaModel();
  LlamaModel(const LlamaModel&) = delete;
  LlamaModel& operator=(const LlamaModel&) = delete;

  const ModelConfig& config() const { return config_; }
  const std::vector<ParamInfo>& params() const { return params_; }
  size_t num_params() const { return num_params_; }
  // The parameters the layers read (backend dtype()).
  void* param_data() { return params_data_; }
  // Gradients and the optimizer's copy of the parameters (accum_dtype()); the master is
  // param_data() itself when the backend keeps no separate master weights. The
  // gradients are allocated, as zeros, at their first use. master_data() holds
  // held_master_range() (all, or a ZeRO rank's shard), and is null once
  // TrimMasterWeights kept none.
  void* grad_data();
  void* master_data() { return master_data_; }
  // The master weight of flat element `offset` (the whole buffer, the shard, or without
  // separate master weights the parameter itself).
  void* master_at(size_t offset);
  // The flat elements whose master weights the model holds: all, or the ZeRO shard (the
  // parameters' shard without separate master weights). Restores and imports write
  // these, then SyncParamsFromMaster.
  std::pair<size_t, size_t> held_master_range() const {
    if (master_data_ != params_data_) return {master_begin_, master_end_};
    // Partly replicated: the shard proper, whose parameters this rank steps (the rest of
    // the replica comes from the others).
    if (replica_ != nullptr) return {options_.shard_begin, options_.shard_end};
    return {param_begin_, param_end_};
  }
  // The parameter of flat element `offset` (the whole buffer, or under ShardParameters
  // the shard, which must hold it, or the replica).
  void* param_at(size_t offset);
  // gemini's partial sharding: the parameters from replicated_begin() on, held whole
  // (null without); replicated_begin() is num_params() without.
  void* replica() { return replica_; }
  size_t replicated_begin() const { return replicated_begin_; }
  // ZeRO-3 with the optimizer in host memory (gemini's offload_param_frac): the shard's
  // parameters from `end` on leave the device; their bf16 values are the host's master
  // weights rounded, which the gathers upload instead. param_at() of them is an error.
  void TrimParamShard(size_t end);
  // The end of the shard's parameters on the device (param_end without TrimParamShard).
  size_t param_held_end() const { return param_held_end_; }
  // Bytes the parameters hold: the whole buffer, or the shard and the region scratch.
  size_t param_bytes() const;
  // The gradient of flat element `offset` (the whole buffer, or under ShardGradients the
  // shard, which must hold it).
  void* grad_at(size_t offset);
  // Bytes the gradients hold: the whole buffer, or the shard and the region scratch.
  size_t grad_bytes() const;
  // Byte offset of element `offset` in param_data(), and in the accum_dtype() buffers.
  size_t param_byte_offset(size_t offset) const;
  size_t accum_byte_offset(size_t offset) const;

  // Seeded initialisation: linear and embedding weights ~ N(0, 0.02^2), norm weights 1.
  // Each tensor draws from its own counter-based stream: bit-identical on any machine,
  // and a shard holds the same values as that part of the whole model. Fills the held
  // master weights (held_master_range) and rounds them into the parameters.
  void InitWeights(uint64_t seed);
  // Rounds the master weights (those held: all, or the shard) into param_data() after
  // they were written (restore, load); nothing to do without separate master weights.
  // Under ZeRO-1/2 the rest of the parameters then come from the other ranks.
  void SyncParamsFromMaster();
  // The optimizer took those of [end, held end) elsewhere (host memory): keeps the
  // others in a buffer of their size (held_master_range() ends at `end`); with none kept
  // the backend's copy is freed and master_data() is null from then on.
  void TrimMasterWeights(size_t end);
  void ZeroGrads();

  // One micro-batch: tokens and targets are [batch, seq] row-major int32 ids in
  // [0, vocab); a negative target is ignored. Adds the gradient of
  // (sum of token losses) * grad_scale into the gradients and returns that loss sum.
  double ForwardBackward(const int32_t* tokens, const int32_t* targets, int batch, int seq,
                         double grad_scale);
  // Called during ForwardBackward with each flat range [begin, end) of the gradient
  // buffer as soon as the backward has finished writing it: the LM head and final norm
  // first, then each layer from the last, then the embedding. Lets data parallelism
  // reduce gradients while the backward goes on. Null: no calls.
  using GradReadyHook = std::function<void(size_t begin, size_t end)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }

  // ZeRO-2: the model keeps the gradient of the flat range [begin, end) only. Each
  // micro-batch's backward computes one region at a time (the LM head and final norm,
  // then each layer from the last, then the embedding) into a scratch buffer the size of
  // the largest region and hands it to `sink`, which must add this rank's part of the
  // sum over ranks into the shard (grad_at) before it returns. ZeroGrads zeroes the shard.
  using GradSink = std::function<void(size_t begin, size_t end, void* grads)>;
  void ShardGradients(size_t begin, size_t end, GradSink sink);
  bool gradients_sharded() const { return grad_sink_ != nullptr; }

  // ZeRO-3, for a model built with LlamaOptions::shard_parameters: before the forward or
  // backward uses a region (as above) the model calls `gather`, which must start filling
  // `dst` with the region's parameters from the ranks that own them and return a
  // function that waits until they are there (or an empty one when they are already): a
  // collective, so every rank runs the same forwards and backwards. With `prefetch` the
  // model keeps a second region scratch and starts each region's gather when the region
  // before it comes into use, so that the gather overlaps that region's compute.
  using ParamWait = std::function<void()>;
  using ParamGather = std::function<ParamWait(size_t begin, size_t end, void* dst)>;
  void GatherParametersWith(ParamGather gather, bool prefetch);
  bool parameters_sharded() const { return param_gather_ != nullptr; }

  // The loss sum only; gradients untouched.
  double Forward(const int32_t* tokens, const int32_t* targets, int batch, int seq);

  // Writes the logits [batch * seq, vocab] (float32, host) of tokens [batch, seq]: the
  // forward without the loss, for checking against other implementations.
  void Logits(const int32_t* tokens, int batch, int seq, float* out);

  // Bytes of activations currently held for the last shape.
  size_t activation_bytes() const { return activation_bytes_; }

 private:
  struct LayerWeights {
    void* ln1; void* qkv; void* o; void* ln2; void* gate_up; void* down;
  };

  void EnsureActivations(int batch, int seq);
  void FreeActivations();
  void EnsureGrads();  // allocates the gradients (the shard, when sharded) as zeros
  // Where the forward reads parameter `offset` and the backward writes its gradient:
  // the whole buffers, or the region scratch under sharding.
  void* ParamPtr(size_t offset) const;
  void* GradPtr(size_t offset) const;
  LayerWeights LayerPointers(int layer, bool grads) const;
  // Under GatherParametersWith: brings regions[k], the k-th region this Run uses, into
  // a scratch (waiting for its gather, started here unless prefetched) and, with
  // prefetch, starts the gather of regions[k + 1] into the other scratch.
  void UseParamRegion(const std::vector<std::pair<size_t, size_t>>& regions, size_t k);
  // Where the backward writes gradients: the whole buffer, or (sharded) the scratch that
  // holds region [begin, end) from now on, zeroed; EndRegion passes it on.
  void BeginGradRegion(size_t begin);
  void EndGradRegion(size_t begin, size_t end);
  // Runs layer `layer` from x_in; writes x_out unless it is null (recomputation).
  void LayerForward(int layer, const void* x_in, void* x_out, LayerActivations& a);
  // dres holds d(x_out) on entry and d(x_in) on return.
  void LayerBackward(int layer, const void* x_in, void* dres, LayerActivations& a);
  double Run(const int32_t* tokens, const int32_t* targets, int batch, int seq, double grad_scale,
             bool backward);

  ModelConfig config_;
  Backend* backend_;
  LlamaOptions options_;
  std::vector<ParamInfo> params_;
  size_t num_params_ = 0;
  void* params_data_ = nullptr;
  void* grads_data_ = nullptr;
  void* master_data_ = nullptr;  // == params_data_ without separate master weights
  size_t master_begin_ = 0, master_end_ = 0;  // the flat elements master_data_ holds
  GradReadyHook grad_ready_;
  // ZeRO-2 (ShardGradients): grads_data_ is then the shard [grad_begin_, grad_end_).
  GradSink grad_sink_;
  size_t grad_begin_ = 0, grad_end_ = 0;
  void* grad_scratch_ = nullptr;
  size_t grad_scratch_elements_ = 0;
  size_t region_begin_ = 0;  // the region the scratch holds
  // ZeRO-3 (shard_parameters): params_data_ is the shard [param_begin_, param_end_); the
  // regions in use are gathered into param_scratch_[param_slot_] (two with prefetch).
  ParamGather param_gather_;
  bool param_prefetch_ = false;
  size_t param_begin_ = 0, param_end_ = 0;
  size_t param_held_end_ = 0;  // TrimParamShard
  void* param_scratch_[2] = {nullptr, nullptr};
  size_t param_scratch_elements_ = 0;
  int param_slot_ = 0;
  size_t param_region_begin_ = 0;
  // The region each scratch slot holds (or is being gathered into it), {0, 0}: none.
  std::pair<size_t, size_t> slot_region_[2] = {{0, 0}, {0, 0}};
  // The region whose gather was started ahead (into the slot not in use), and its wait.
  bool has_prefetch_ = false;
  std::pair<size_t, size_t> prefetched_{0, 0};
  ParamWait prefetch_wait_;
  // gemini's partial sharding: [replicated_begin_, num_params_) held whole here.
  size_t replicated_begin_ = 0;
  void* replica_ = nullptr;

  // Activations for the current (batch, seq).
  int batch_ = 0, seq_ = 0;
  int capacity_batch_ = 0;  // the batch the buffers were laid out for (>= batch_)
  ActivationBuffers acts_;
  std::vector<void*> owned_;  // Every buffer of acts_, for freeing.
  size_t activation_bytes_ = 0;
};

}  // namespace llamad
