// The CUDA backend's own kernels other than attention (attention_kernels.cuh): casts,
// fills, sums, embedding, RMSNorm, RoPE, SwiGLU, the cross-entropy of a chunk of logits
// and AdamW; and the launch code that runs each of them for one Backend op.
//
// The launch code takes where the kernels run as a `Device`, which provides
//   void Launch(kernel, dim3 grid, int threads, int shared_bytes, args...)
//       runs kernel(args...) over the grid with that much dynamic shared memory;
//   unsigned max_strided_blocks   the most blocks a grid-stride kernel is given.
// gpu_device.cuh's is a CUDA stream; the CPU emulator's (tests/engine/cuda_emulator.h)
// runs the same kernels in tests. Pointers are the Device's memory. The CUDA backend
// (cuda_backend.cu) keeps the rest: choosing element types, scratch buffers and copies
// to and from the host. Some kernels are not templates: one translation unit of a
// program includes this header.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/cuda_common.cuh"
#include "core/rng.h"

namespace llamad::cuda::layers {
inline namespace LLAMAD_KERNELS_BUILD {

constexpr unsigned kThreads = 256;

// ---- kernels -----------------------------------------------------------------------

// Calls f(i) for each element i < n of this thread's grid-stride loop: from its index in
// the grid, in steps of the grid's thread count.
template <typename F>
__device__ __forceinline__ void ForEachStrided(size_t n, F f) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += stride) f(i);
}

template <typename D, typename S>
__global__ void ConvertKernel(D* dst, const S* src, size_t n) {
  ForEachStrided(n, [&](size_t i) { dst[i] = FromFloat<D>(ToFloat(src[i])); });
}

template <typename T>
__global__ void FillKernel(T* x, size_t n, float value) {
  ForEachStrided(n, [&](size_t i) { x[i] = FromFloat<T>(value); });
}

template <typename T>
__global__ void ScaleKernel(T* x, size_t n, float scale) {
  ForEachStrided(n, [&](size_t i) { x[i] = FromFloat<T>(ToFloat(x[i]) * scale); });
}

template <typename T>
__global__ void AddKernel(T* y, const T* x, size_t n) {
  ForEachStrided(n, [&](size_t i) { y[i] = FromFloat<T>(ToFloat(y[i]) + ToFloat(x[i])); });
}

// core/rng.h's counter-based normals, as the CPU backend draws them: the same bits up to
// the last bit of the device's double-precision sqrt, log and cos.
template <typename T>
__global__ void FillNormalKernel(T* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) {
  ForEachStrided(n, [&](size_t i) { x[i] = FromFloat<T>(float(std * RandomNormal(seed, stream, first + i))); });
}

// Fixed grid, fixed order: each block sums a fixed strided subset in double.
constexpr unsigned kSumBlocks = 1024;
template <typename T>
__global__ void SumSquaresKernel(double* partial, const T* x, size_t n) {
  __shared__ double scratch[32];
  double s = 0;
  ForEachStrided(n, [&](size_t i) {
    const double v = ToFloat(x[i]);
    s += v * v;
  });
  s = BlockSum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void EmbeddingKernel(bf16* out, const int32_t* tokens, const bf16* table, int dim) {
  const size_t row = blockIdx.x;
  const bf16* src = table + size_t(tokens[row]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) out[row * dim + c] = src[c];
}

// One block per distinct token: adds its rows (in order) into its table row.
__global__ void EmbeddingBackwardKernel(float* dtable, const bf16* dout, const int32_t* unique,
                                        const int32_t* starts, const int32_t* rows, int dim) {
  const int u = blockIdx.x;
  float* dst = dtable + size_t(unique[u]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.f;
    for (int k = starts[u]; k < starts[u + 1]; ++k) sum += ToFloat(dout[size_t(rows[k]) * dim + c]);
    dst[c] += sum;
  }
}

// One block per row; each thread reads V consecutive elements at a time.
template <int V>
__global__ void RmsNormKernel(bf16* out, float* rstd, const bf16* x, const bf16* w, int dim,
                              float eps) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const bf16* xr = x + row * dim;
  float s = 0.f;
  for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
    float v[V];
    LoadBf16<V>(xr + c, v);
#pragma unroll
    for (int k = 0; k < V; ++k) s += v[k] * v[k];
  }
  s = BlockSum(s, scratch);
  const float r = rsqrtf(s / float(dim) + eps);
  for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
    float v[V], wv[V];
    LoadBf16<V>(xr + c, v);
    LoadBf16<V>(w + c, wv);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = v[k] * r * wv[k];
    StoreBf16<V>(out + row * dim + c, v);
  }
  if (threadIdx.x == 0) rstd[row] = r;
}

// dx = r * w * g - r^3 * x * mean(g * w * x); each block also sums g * x * r over its rows
// into its own row of `partial` [blocks, dim] (reduced in order by ReduceRowsKernel).
// A thread always owns the same columns, so its part of the block's dw row is its own.
template <int V>
__global__ void RmsNormBackwardKernel(bf16* dx, float* partial, const bf16* dout, const bf16* x,
                                      const bf16* w, const float* rstd, int n, int dim,
                                      bool accumulate) {
  __shared__ float scratch[32];
  float* dw_s = reinterpret_cast<float*>(DynamicSharedMemory());  // the block's dw row
  for (int c = threadIdx.x; c < dim; c += blockDim.x) dw_s[c] = 0.f;
  __syncthreads();
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const bf16* xr = x + size_t(row) * dim;
    const bf16* gr = dout + size_t(row) * dim;
    bf16* dxr = dx + size_t(row) * dim;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V];
      LoadBf16<V>(xr + c, xv);
      LoadBf16<V>(gr + c, gv);
      LoadBf16<V>(w + c, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        dot += gv[k] * wv[k] * xv[k];
        dw_s[c + k] += gv[k] * xv[k] * r;
      }
    }
    dot = BlockSum(dot, scratch);
    const float k3 = r * r * r * dot / float(dim);
    for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V], out[V];
      LoadBf16<V>(xr + c, xv);
      LoadBf16<V>(gr + c, gv);
      LoadBf16<V>(w + c, wv);
      if (accumulate) LoadBf16<V>(dxr + c, out);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float v = r * wv[k] * gv[k] - k3 * xv[k];
        out[k] = accumulate ? out[k] + v : v;
      }
      StoreBf16<V>(dxr + c, out);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < dim; c += blockDim.x) partial[size_t(blockIdx.x) * dim + c] = dw_s[c];
}

__global__ void ReduceRowsKernel(float* dst, const float* partial, int rows, int dim) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  float s = 0.f;
  for (int r = 0; r < rows; ++r) s += partial[size_t(r) * dim + c];
  dst[c] += s;
}

__global__ void RopeTableKernel(float* table, int seq, int head_dim, double theta) {
  const int half = head_dim / 2;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= seq * half) return;
  const int pos = i / half, k = i % half;
  const double angle = pos * pow(theta, -2.0 * k / head_dim);
  table[2 * i] = float(cos(angle));
  table[2 * i + 1] = float(sin(angle));
}

// One thread per (row, rotated head, V consecutive i < D/2): rotates the pairs
// (i, i + D/2) by the position's angles.
template <int V>
__global__ void RopeKernel(bf16* qkv, const float* table, int n, int seq, int rotated, int head_dim,
                           int stride, float sign) {
  const int half = head_dim / 2, groups = half / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * rotated * groups) return;
  const int k = int(i % groups) * V;
  const int h = int((i / groups) % rotated);
  const int row = int(i / (size_t(groups) * rotated));
  const float* cs = table + (size_t(row % seq) * half + k) * 2;  // cos, sin of k, k + 1, ...
  bf16* v = qkv + size_t(row) * stride + size_t(h) * head_dim;
  float x1[V], x2[V];
  LoadBf16<V>(v + k, x1);
  LoadBf16<V>(v + k + half, x2);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float c = cs[2 * j], s = sign * cs[2 * j + 1];
    const float a = x1[j], b = x2[j];
    x1[j] = a * c - b * s;
    x2[j] = b * c + a * s;
  }
  StoreBf16<V>(v + k, x1);
  StoreBf16<V>(v + k + half, x2);
}

// One thread per V consecutive columns of one row: h = silu(gate) * up.
template <int V>
__global__ void SwiGluKernel(bf16* h, const bf16* gate_up, int n, int ffn) {
  const int groups = ffn / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * groups) return;
  const size_t row = i / groups, c = (i % groups) * V;
  float g[V], u[V];
  LoadBf16<V>(gate_up + row * 2 * ffn + c, g);
  LoadBf16<V>(gate_up + row * 2 * ffn + ffn + c, u);
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = g[k] / (1.f + __expf(-g[k])) * u[k];
  StoreBf16<V>(h + row * ffn + c, g);
}

template <int V>
__global__ void SwiGluBackwardKernel(bf16* dgate_up, const bf16* dh, const bf16* gate_up, int n,
                                     int ffn) {
  const int groups = ffn / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * groups) return;
  const size_t row = i / groups, c = (i % groups) * V;
  float g[V], u[V], d[V];
  LoadBf16<V>(gate_up + row * 2 * ffn + c, g);
  LoadBf16<V>(gate_up + row * 2 * ffn + ffn + c, u);
  LoadBf16<V>(dh + row * ffn + c, d);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float sig = 1.f / (1.f + __expf(-g[k]));
    const float dgate = d[k] * u[k] * sig * (1.f + g[k] * (1.f - sig));
    u[k] = d[k] * g[k] * sig;  // d up
    g[k] = dgate;
  }
  StoreBf16<V>(dgate_up + row * 2 * ffn + c, g);
  StoreBf16<V>(dgate_up + row * 2 * ffn + ffn + c, u);
}

// One block per row of f32 logits: the row's loss, and (dlogits != null) the gradient
// (softmax - onehot) * grad_scale in bf16. Ignored rows (target < 0) get 0 and zeros.
__global__ void CrossEntropyKernel(float* loss, bf16* dlogits, const float* logits,
                                   const int32_t* targets, int vocab, float grad_scale) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const float* l = logits + row * vocab;
  const int target = targets[row];
  if (target < 0) {
    if (dlogits != nullptr)
      for (int c = threadIdx.x; c < vocab; c += blockDim.x) dlogits[row * vocab + c] = FromFloat<bf16>(0.f);
    if (threadIdx.x == 0) loss[row] = 0.f;
    return;
  }
  float m = -INFINITY;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, l[c]);
  m = BlockMax(m, scratch);
  float s = 0.f;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += __expf(l[c] - m);
  s = BlockSum(s, scratch);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - l[target];
  if (dlogits != nullptr) {
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
      const float p = __expf(l[c] - lse) - (c == target ? 1.f : 0.f);
      dlogits[row * vocab + c] = FromFloat<bf16>(p * grad_scale);
    }
  }
}

// AdamW on f32 master weights (or on the parameters themselves when master is null and
// the parameters are f32), writing the bf16 rounding into param.
template <typename P>
__global__ void AdamWKernel(P* param, float* master, const float* grad, float* m, float* v,
                            size_t n, float b1, float b2, float eps, float grad_scale,
                            float step_size, float inv_bias2_sqrt, float decay) {
  // Each operation rounded on its own (no contraction into fused multiply-adds), in the
  // CPU kernel's order (cpu/adamw_simd.h): the host-offloaded update on the CPU and this
  // one give bit-identical weights.
  const float c1 = __fsub_rn(1.f, b1), c2 = __fsub_rn(1.f, b2);
  ForEachStrided(n, [&](size_t i) {
    const float g = __fmul_rn(grad[i], grad_scale);
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(c1, g));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(c2, g), g));
    m[i] = mi;
    v[i] = vi;
    const float p0 = master != nullptr ? master[i] : ToFloat(param[i]);
    const float denominator = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bias2_sqrt), eps);
    const float p = __fsub_rn(__fmul_rn(p0, decay), __fdiv_rn(__fmul_rn(step_size, mi), denominator));
    if (master != nullptr) master[i] = p;
    param[i] = FromFloat<P>(p);
  });
}

// ---- launches --------------------------------------------------------------------------

// One thread per work item (`items` of them), kThreads to a block.
template <typename Device, typename... Params, typename... Args>
void LaunchItems(Device& device, void (*kernel)(Params...), size_t items, Args... args) {
  if (items == 0) return;
  device.Launch(kernel, dim3(unsigned((items + kThreads - 1) / kThreads)), kThreads, 0, args...);
}
// A grid-stride kernel over n elements, on at most device.max_strided_blocks blocks.
template <typename Device, typename... Params, typename... Args>
void LaunchStrided(Device& device, void (*kernel)(Params...), size_t n, Args... args) {
  device.Launch(kernel, dim3(Blocks(n, kThreads, device.max_strided_blocks)), kThreads, 0, args...);
}

template <typename Device, typename D, typename S>
void Convert(Device& device, D* dst, const S* src, size_t n) {
  LaunchStrided(device, ConvertKernel<D, S>, n, dst, src, n);
}
template <typename Device, typename T>
void Fill(Device& device, T* x, size_t n, float value) {
  LaunchStrided(device, FillKernel<T>, n, x, n, value);
}
template <typename Device, typename T>
void Scale(Device& device, T* x, size_t n, float scale) {
  LaunchStrided(device, ScaleKernel<T>, n, x, n, scale);
}
template <typename Device, typename T>
void Add(Device& device, T* y, const T* x, size_t n) {
  LaunchStrided(device, AddKernel<T>, n, y, x, n);
}
template <typename Device, typename T>
void FillNormal(Device& device, T* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) {
  LaunchStrided(device, FillNormalKernel<T>, n, x, n, std, seed, stream, first);
}
// Writes kSumBlocks partial sums, which the host adds in order.
template <typename Device, typename T>
void SumSquaresPartials(Device& device, double* partial, const T* x, size_t n) {
  device.Launch(SumSquaresKernel<T>, dim3(kSumBlocks), kThreads, 0, partial, x, n);
}

template <typename Device>
void Embedding(Device& device, bf16* out, const int32_t* tokens, const bf16* table, int n, int dim) {
  if (n == 0) return;
  device.Launch(EmbeddingKernel, dim3(n), 128, 0, out, tokens, table, dim);
}

// The rows of an embedding's gradient grouped by token on the host, so that each table
// row is summed by one block in row order: no atomics, the same result every run.
// `packed` holds the distinct tokens, where each one's rows start (one more entry, n, at
// the end) and the rows in token order.
struct TokenGroups {
  std::vector<int32_t> packed;
  int distinct = 0;
};
inline TokenGroups GroupRowsByToken(const int32_t* tokens, int n) {
  std::vector<int32_t> rows(n);
  std::iota(rows.begin(), rows.end(), 0);
  std::stable_sort(rows.begin(), rows.end(), [&](int a, int b) { return tokens[a] < tokens[b]; });
  std::vector<int32_t> distinct, starts;
  for (int k = 0; k < n; ++k) {
    if (k == 0 || tokens[rows[k]] != tokens[rows[k - 1]]) {
      distinct.push_back(tokens[rows[k]]);
      starts.push_back(k);
    }
  }
  starts.push_back(n);
  TokenGroups g;
  g.distinct = int(distinct.size());
  g.packed.reserve(distinct.size() + starts.size() + rows.size());
  g.packed.insert(g.packed.end(), distinct.begin(), distinct.end());
  g.packed.insert(g.packed.end(), starts.begin(), starts.end());
  g.packed.insert(g.packed.end(), rows.begin(), rows.end());
  return g;
}
// `groups` is the Device's copy of TokenGroups::packed.
template <typename Device>
void EmbeddingBackward(Device& device, float* dtable, const bf16* dout, const int32_t* groups, int distinct,
                       int dim) {
  if (distinct == 0) return;
  device.Launch(EmbeddingBackwardKernel, dim3(distinct), 128, 0, dtable, dout, groups, groups + distinct,
                groups + 2 * distinct + 1, dim);
}

template <typename Device>
void RmsNorm(Device& device, bf16* out, float* rstd, const bf16* x, const bf16* w, int n, int dim, float eps) {
  if (n == 0) return;
  const auto kernel = VectorsFit(8, dim, {out, x, w}) ? RmsNormKernel<8> : RmsNormKernel<1>;
  device.Launch(kernel, dim3(n), kThreads, 0, out, rstd, x, w, dim, eps);
}
// The backward's blocks: each sums its rows' dw into a row of `partial` [blocks, dim].
inline int RmsNormBackwardBlocks(int n) { return std::min(n, 512); }
template <typename Device>
void RmsNormBackward(Device& device, bf16* dx, float* dw, float* partial, const bf16* dout, const bf16* x,
                     const bf16* w, const float* rstd, int n, int dim, bool accumulate_dx) {
  if (n == 0) return;
  const int blocks = RmsNormBackwardBlocks(n);
  const int shared_bytes = dim * int(sizeof(float));  // the block's dw row
  const auto kernel = VectorsFit(8, dim, {dx, dout, x, w}) ? RmsNormBackwardKernel<8> : RmsNormBackwardKernel<1>;
  device.Launch(kernel, dim3(blocks), kThreads, shared_bytes, dx, partial, dout, x, w, rstd, n, dim, accumulate_dx);
  LaunchItems(device, ReduceRowsKernel, size_t(dim), dw, static_cast<const float*>(partial), blocks, dim);
}

template <typename Device>
void RopeTable(Device& device, float* table, int seq, int head_dim, double theta) {
  LaunchItems(device, RopeTableKernel, size_t(seq) * (head_dim / 2), table, seq, head_dim, theta);
}
template <typename Device>
void Rope(Device& device, bf16* qkv, const float* table, const AttentionShape& s, bool inverse) {
  const int rotated = s.heads + s.kv_heads, n = s.batch * s.seq, half = s.head_dim / 2;
  const float sign = inverse ? -1.f : 1.f;
  // Pairs of columns at once where each head's halves and rows stay 4-byte aligned.
  const int pairs = half % 2 == 0 && s.row_stride() % 2 == 0 && VectorsFit(2, 2, {qkv}) ? 2 : 1;
  LaunchItems(device, pairs == 2 ? RopeKernel<2> : RopeKernel<1>, size_t(n) * rotated * (half / pairs), qkv, table,
              n, s.seq, rotated, s.head_dim, s.row_stride(), sign);
}

template <typename Device>
void SwiGlu(Device& device, bf16* h, const bf16* gate_up, int n, int ffn) {
  const int width = VectorsFit(8, ffn, {h, gate_up}) ? 8 : 1;
  LaunchItems(device, width == 8 ? SwiGluKernel<8> : SwiGluKernel<1>, size_t(n) * ffn / width, h, gate_up, n, ffn);
}
template <typename Device>
void SwiGluBackward(Device& device, bf16* dgate_up, const bf16* dh, const bf16* gate_up, int n, int ffn) {
  const int width = VectorsFit(8, ffn, {dgate_up, dh, gate_up}) ? 8 : 1;
  LaunchItems(device, width == 8 ? SwiGluBackwardKernel<8> : SwiGluBackwardKernel<1>, size_t(n) * ffn / width,
              dgate_up, dh, gate_up, n, ffn);
}

// The loss of each of `rows` rows of f32 logits, and with dlogits the gradient.
template <typename Device>
void CrossEntropy(Device& device, float* losses, bf16* dlogits, const float* logits, const int32_t* targets,
                  int rows, int vocab, float grad_scale) {
  if (rows == 0) return;
  device.Launch(CrossEntropyKernel, dim3(rows), 512, 0, losses, dlogits, logits, targets, vocab, grad_scale);
}

// One AdamW step of n elements; master null where the parameters are the f32 weights.
template <typename Device, typename P>
void AdamW(Device& device, P* param, float* master, const float* grad, float* m, float* v, size_t n,
           const AdamWStep& s) {
  const float step_size = float(s.lr / (1.0 - std::pow(s.beta1, double(s.step))));
  const float inv_bias2_sqrt = float(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step))));
  const float decay = float(1.0 - s.lr * s.weight_decay);
  LaunchStrided(device, AdamWKernel<P>, n, param, master, grad, m, v, n, float(s.beta1), float(s.beta2),
                float(s.eps), float(s.grad_scale), step_size, inv_bias2_sqrt, decay);
}

}  // namespace LLAMAD_KERNELS_BUILD
}  // namespace llamad::cuda::layers
