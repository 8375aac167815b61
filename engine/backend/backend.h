// The compute backend: memory and the ~20 ops of LLaMA training, forward and backward.
//
// Conventions for every op:
// - Buffers are opaque pointers to memory from Allocate(), or into it. A buffer keeps the
//   element type it was allocated with: dtype() for activations and the parameters the
//   layers read, accum_dtype() for what must keep more precision (see accum_dtype()).
//   The memory ops convert to and from a buffer's own type. Token ids are int32 on the
//   host.
// - Shapes are row-major. A "row" is one token. N = batch * seq tokens.
// - Linear weights use the Hugging Face layout [out, in].
// - `accumulate` parameters say whether a result is added into the output (true) or
//   overwrites it (false). Weight gradients always accumulate.
// - Ops run in order on the calling thread's stream; results are visible to later ops.
// - Not thread-safe: one backend serves one training loop.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/dtype.h"

namespace llamad {

// Shape of a causal self-attention call. The q|k|v input holds, per token row of width
// `row_stride`, H query heads then Hkv key heads then Hkv value heads of `head_dim` each.
struct AttentionShape {
  int batch = 0;
  int seq = 0;
  int heads = 0;        // H
  int kv_heads = 0;     // Hkv, divides H; query head h reads kv head h / (H / Hkv)
  int head_dim = 0;     // D
  int row_stride() const { return (heads + 2 * kv_heads) * head_dim; }
};

// Rows of logits the fused LM head holds at once: as many as fit in chunk_elements, at
// least 16, at most the n rows it is given (16 when n is smaller). Backends and the memory
// planner size the chunk with this one rule.
inline int LmHeadChunkRows(size_t chunk_elements, int vocab, int n) {
  return int(std::clamp<size_t>(chunk_elements / size_t(vocab), 16, size_t(std::max(n, 16))));
}

struct AdamWStep {
  double lr = 0;            // This step's learning rate.
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0;  // Decoupled: p -= lr * weight_decay * p.
  int64_t step = 1;         // 1-based, for bias correction.
  double grad_scale = 1.0;  // Gradients are multiplied by this first (clipping).
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string_view name() const = 0;
  // Element type of activations and of the parameters the layers read.
  virtual DType dtype() const = 0;
  // Element type of weight gradients, master weights, optimizer moments and per-row
  // statistics: rstd, lse and the RoPE table. Op arguments of this type are marked
  // [accum] below. The CPU backend uses dtype() for everything; the CUDA backend bf16
  // activations and parameters with f32 accumulators.
  virtual DType accum_dtype() const { return dtype(); }
  // Whether parameters need a separate master copy in accum_dtype() for the optimizer.
  virtual bool needs_master_weights() const { return accum_dtype() != dtype(); }

  // ---- memory -----------------------------------------------------------------------
  // Returns a zero-filled buffer of `numel` elements of `type` (dtype() or accum_dtype());
  // never null (aborts when out of memory). Free it with Free().
  virtual void* Allocate(size_t numel, DType type) = 0;
  void* Allocate(size_t numel) { return Allocate(numel, dtype()); }
  virtual void Free(void* buffer) = 0;
  // Bytes currently allocated, and the most ever allocated at once.
  virtual size_t allocated_bytes() const = 0;
  virtual size_t peak_allocated_bytes() const = 0;
  virtual void ResetPeak() = 0;
  // The memory this backend's buffers can still come from, when it is its own (what a
  // GPU has free now); 0 when the buffers share host memory with everything else.
  virtual size_t device_memory_bytes() const { return 0; }
  // The element type of the buffer that holds [buffer, buffer + numel) (aborts when
  // that range is not inside one buffer of this backend).
  virtual DType BufferType(const void* buffer, size_t numel) const { return dtype(); }
  // Waits until every op issued so far has finished (a no-op for synchronous backends):
  // for timing, and before reading results through other means than Download.
  virtual void Synchronize() {}
  // Page-locks host memory that UploadF32/DownloadF32 will move often, so that the
  // device copies it at full speed (best effort; a no-op for host backends). Unpin it
  // before freeing it.
  virtual void PinHostMemory(void* host, size_t bytes) {}
  virtual void UnpinHostMemory(void* host) {}
  // Copies between host doubles and a buffer (converting), for tests, init and export.
  virtual void Upload(void* dst, const double* src, size_t numel) = 0;
  virtual void Download(double* dst, const void* src, size_t numel) = 0;
  // Copies between host float32 and a buffer (converting).
  virtual void UploadF32(void* dst, const float* src, size_t numel) = 0;
  // UploadF32 that may return before the copy is done: `src` (page-locked with
  // PinHostMemory, for full speed) must stay as it is until the next Synchronize or
  // Download. For uploads in the middle of the backend's work (a gather's parameters).
  virtual void UploadF32Async(void* dst, const float* src, size_t numel) { UploadF32(dst, src, numel); }
  virtual void DownloadF32(float* dst, const void* src, size_t numel) = 0;
  // Copies, converting from src's element type to dst's (a cast when they differ).
  virtual void Copy(void* dst, const void* src, size_t numel) = 0;
  virtual void Zero(void* buffer, size_t numel) = 0;
  // y[i] += x[i], both of one element type (a rank's share of a reduced gradient).
  virtual void Add(void* y, const void* x, size_t numel) = 0;
  // x[i] *= scale.
  virtual void Scale(void* x, double scale, size_t numel) = 0;
  // Fills with N(0, std^2) samples from the counter-based generator (seed, stream):
  // x[i] is the stream's sample `first + i`, so a part of a tensor filled on its own
  // holds the same values as that part of the whole tensor filled at once.
  virtual void FillNormal(void* x, size_t numel, double std, uint64_t seed, uint64_t stream,
                          uint64_t first = 0) = 0;
  virtual void Fill(void* x, size_t numel, double value) = 0;
  // Sum of squares, accumulated in at least float32 per block and double across blocks.
  virtual double SumSquares(const void* x, size_t numel) = 0;

  // ---- layers -----------------------------------------------------------------------
  // y[n, out] (+)= x[n, in] . w[out, in]^T. Row strides of x and y are `in` and `out`.
  virtual void Linear(void* y, const void* x, const void* w, int n, int in, int out,
                      bool accumulate) = 0;
  // dx[n, in] (+)= dy . w (skipped when dx is null); dw[out, in] [accum] += dy^T . x.
  virtual void LinearBackward(void* dx, void* dw, const void* dy, const void* x, const void* w,
                              int n, int in, int out, bool accumulate_dx) = 0;

  // out[n, :] = table[tokens[n], :]. Ids must be in [0, vocab).
  virtual void Embedding(void* out, const int32_t* tokens, const void* table, int n, int dim) = 0;
  // dtable[tokens[n], :] [accum] += dout[n, :].
  virtual void EmbeddingBackward(void* dtable, const void* dout, const int32_t* tokens, int n,
                                 int dim) = 0;

  // out = x / sqrt(mean(x^2) + eps) * w, per row; rstd[n] [accum] keeps 1 / sqrt(mean + eps).
  virtual void RmsNorm(void* out, void* rstd, const void* x, const void* w, int n, int dim,
                       double eps) = 0;
  // dx (+)= d/dx, dw [accum] += d/dw, given the forward's x and rstd [accum].
  virtual void RmsNormBackward(void* dx, void* dw, const void* dout, const void* x,
                               const void* w, const void* rstd, int n, int dim,
                               bool accumulate_dx) = 0;

  // Fills table[seq, head_dim / 2, 2] [accum] with (cos, sin) of position * theta^(-2i/head_dim).
  virtual void RopeTable(void* table, int seq, int head_dim, double theta) = 0;
  // Rotates the query and key heads of a q|k|v buffer in place with Hugging Face's
  // rotate_half convention (positions 0..seq-1 in each sequence). With `inverse` it
  // applies the transposed rotation, which is the backward of the forward rotation.
  virtual void Rope(void* qkv, const void* table, const AttentionShape& shape, bool inverse) = 0;

  // Causal softmax attention with grouped-query heads, scale 1/sqrt(D).
  // out[n, H * D]; lse[batch, H, seq] [accum] keeps each row's log-sum-exp for the backward.
  // `block` is the tile size: the kernel never holds more than block x block scores
  // per head; block >= seq is the standard, unfused algorithm.
  virtual void Attention(void* out, void* lse, const void* qkv, const AttentionShape& shape,
                         int block) = 0;
  // dqkv (overwritten, same layout as qkv) from dout, the forward's out and lse.
  virtual void AttentionBackward(void* dqkv, const void* dout, const void* out, const void* lse,
                                 const void* qkv, const AttentionShape& shape, int block) = 0;

  // h[n, f] = silu(gate) * up, where each row of gate_up is [gate(f) | up(f)].
  virtual void SwiGlu(void* h, const void* gate_up, int n, int ffn) = 0;
  // dgate_up (overwritten) from dh.
  virtual void SwiGluBackward(void* dgate_up, const void* dh, const void* gate_up, int n,
                              int ffn) = 0;

  // Fused LM head and cross-entropy over n rows of x[n, dim] with w[vocab, dim]: never
  // holds more than a chunk of logits. Rows whose target is negative are ignored.
  // Returns the sum of the per-row losses (natural log). When dx is not null it
  // writes dx = d(loss_sum * grad_scale)/dx and adds the same gradient into dw [accum].
  virtual double LmHeadCrossEntropy(const void* x, const void* w, const int32_t* targets, int n,
                                    int dim, int vocab, double grad_scale, void* dx,
                                    void* dw) = 0;

  // ---- optimizer --------------------------------------------------------------------
  // One AdamW step over `numel` elements. grad, m and v are [accum]. With master weights
  // (needs_master_weights()) the step updates `master` [accum] and writes its rounding
  // into `param`; without, master is null and param is updated in place.
  virtual void AdamW(void* param, void* master, const void* grad, void* m, void* v,
                     size_t numel, const AdamWStep& step) = 0;
};

}  // namespace llamad
