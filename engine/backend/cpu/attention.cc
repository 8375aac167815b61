// Causal attention in tiles of block x block scores, after FlashAttention-2:
// - forward: per (sequence, head, query block), an online softmax over key blocks up to
//   the diagonal; keeps out and the row log-sum-exp;
// - backward: two race-free passes instead of atomics, which keeps it deterministic:
//   pass A per (sequence, kv head, key block) accumulates dK and dV over the query heads
//   of the group and the query blocks at or below the diagonal; pass B per (sequence,
//   head, query block) accumulates dQ. Both recompute P = exp(S - lse) from the forward.
// Block products go through BLAS; OpenBLAS runs them single-threaded inside the parallel
// loop, so parallelism is over tiles.
#include "backend/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backend/cpu/blas.h"

namespace llamad::cpu {
namespace {

// Geometry shared by the three passes.
struct Geometry {
  explicit Geometry(const AttentionShape& s, int block_size)
      : batch(s.batch), seq(s.seq), heads(s.heads), kv_heads(s.kv_heads), dim(s.head_dim),
        stride(s.row_stride()), out_stride(s.heads * s.head_dim),
        group(s.heads / s.kv_heads), block(std::max(1, std::min(block_size, s.seq))),
        blocks((s.seq + block - 1) / block), scale(1.0 / std::sqrt(double(s.head_dim))) {}
  // Offsets into a q|k|v row, and into the out/dout rows.
  size_t q_offset(int b, int h) const { return size_t(b) * seq * stride + size_t(h) * dim; }
  size_t k_offset(int b, int g) const { return size_t(b) * seq * stride + size_t(heads + g) * dim; }
  size_t v_offset(int b, int g) const {
    return size_t(b) * seq * stride + size_t(heads + kv_heads + g) * dim;
  }
  size_t o_offset(int b, int h) const { return size_t(b) * seq * out_stride + size_t(h) * dim; }
  size_t lse_offset(int b, int h) const { return (size_t(b) * heads + h) * seq; }

  int batch, seq, heads, kv_heads, dim, stride, out_stride, group, block, blocks;
  double scale;
};

// p[r, c] = exp(s[r, c] - lse[r]) for key j0+c <= query i0+r, else 0; in place.
template <typename T>
void ProbabilitiesFromLse(T* s, int ld, int rows, int cols, int i0, int j0, const T* lse) {
  for (int r = 0; r < rows; ++r) {
    T* row = s + size_t(r) * ld;
    const int visible = std::min(cols, i0 + r - j0 + 1);  // keys j <= i
    const T shift = lse[r];
    for (int c = 0; c < visible; ++c) row[c] = std::exp(row[c] - shift);
    for (int c = std::max(visible, 0); c < cols; ++c) row[c] = 0;
  }
}

// ds = p * (dp - delta[r]), in place over dp.
template <typename T>
void SoftmaxBackward(T* dp, const T* p, int ld, int rows, int cols, const T* delta) {
  for (int r = 0; r < rows; ++r) {
    T* drow = dp + size_t(r) * ld;
    const T* prow = p + size_t(r) * ld;
    const T d = delta[r];
#pragma omp simd
    for (int c = 0; c < cols; ++c) drow[c] = prow[c] * (drow[c] - d);
  }
}

}  // namespace

template <typename T>
void AttentionForward(T* out, T* lse, const T* qkv, const AttentionShape& shape, int block) {
  const Geometry g(shape, block);
  const int B = g.block, D = g.dim;
  const int items = g.batch * g.heads * g.blocks;
#pragma omp parallel
  {
    std::vector<T> scores(size_t(B) * B), acc(size_t(B) * D), m(B), l(B);
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < items; ++item) {
      const int qb = item % g.blocks, h = (item / g.blocks) % g.heads, b = item / (g.blocks * g.heads);
      const int kv = h / g.group;
      const int i0 = qb * B, rows = std::min(B, g.seq - i0);
      const T* q = qkv + g.q_offset(b, h) + size_t(i0) * g.stride;
      const T* k = qkv + g.k_offset(b, kv);
      const T* v = qkv + g.v_offset(b, kv);
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int j0 = 0; j0 < i0 + rows; j0 += B) {
        const int cols = std::min(B, i0 + rows - j0);
        Gemm(false, true, rows, cols, D, T(g.scale), q, g.stride, k + size_t(j0) * g.stride, g.stride,
             T(0), scores.data(), B);
        for (int r = 0; r < rows; ++r) {
          T* row = scores.data() + size_t(r) * B;
          const int visible = std::min(cols, i0 + r - j0 + 1);
          T row_max = m[r];
          for (int c = 0; c < visible; ++c) row_max = std::max(row_max, row[c]);
          const T correction = std::exp(m[r] - row_max);  // exp(-inf) = 0 on the first block
          T sum = 0;
          for (int c = 0; c < visible; ++c) sum += row[c] = std::exp(row[c] - row_max);
          for (int c = visible; c < cols; ++c) row[c] = 0;
          l[r] = l[r] * correction + sum;
          m[r] = row_max;
          if (correction != T(1)) {
            T* a = acc.data() + size_t(r) * D;
#pragma omp simd
            for (int d = 0; d < D; ++d) a[d] *= correction;
          }
        }
        Gemm(false, false, rows, D, cols, T(1), scores.data(), B, v + size_t(j0) * g.stride, g.stride,
             T(1), acc.data(), D);
      }
      T* o = out + g.o_offset(b, h) + size_t(i0) * g.out_stride;
      T* lse_row = lse + g.lse_offset(b, h) + i0;
      for (int r = 0; r < rows; ++r) {
        const T inv = T(1) / l[r];
        const T* a = acc.data() + size_t(r) * D;
        T* orow = o + size_t(r) * g.out_stride;
#pragma omp simd
        for (int d = 0; d < D; ++d) orow[d] = a[d] * inv;
        lse_row[r] = m[r] + std::log(l[r]);
      }
    }
  }
}

template <typename T>
void AttentionBackward(T* dqkv, const T* dout, const T* out, const T* lse, const T* qkv,
                       const AttentionShape& shape, int block) {
  const Geometry g(shape, block);
  const int B = g.block, D = g.dim;
  // delta[b, h, t] = sum_d dout * out: the softmax backward's row term.
  std::vector<T> delta(size_t(g.batch) * g.heads * g.seq);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < g.batch; ++b) {
    for (int h = 0; h < g.heads; ++h) {
      for (int t = 0; t < g.seq; ++t) {
        const T* o = out + g.o_offset(b, h) + size_t(t) * g.out_stride;
        const T* d = dout + g.o_offset(b, h) + size_t(t) * g.out_stride;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < D; ++i) sum += o[i] * d[i];
        delta[g.lse_offset(b, h) + t] = sum;
      }
    }
  }

#pragma omp parallel
  {
    std::vector<T> p(size_t(B) * B), dp(size_t(B) * B), acc1(size_t(B) * D), acc2(size_t(B) * D);

    // Pass A: dK and dV per (sequence, kv head, key block).
    const int kv_items = g.batch * g.kv_heads * g.blocks;
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < kv_items; ++item) {
      const int kb = item % g.blocks, kv = (item / g.blocks) % g.kv_heads,
                b = item / (g.blocks * g.kv_heads);
      const int j0 = kb * B, cols = std::min(B, g.seq - j0);
      const T* k = qkv + g.k_offset(b, kv) + size_t(j0) * g.stride;
      const T* v = qkv + g.v_offset(b, kv) + size_t(j0) * g.stride;
      T* dk_acc = acc1.data();
      T* dv_acc = acc2.data();
      std::fill(acc1.begin(), acc1.end(), T(0));
      std::fill(acc2.begin(), acc2.end(), T(0));
      for (int h = kv * g.group; h < (kv + 1) * g.group; ++h) {
        for (int i0 = j0; i0 < g.seq; i0 += B) {
          const int rows = std::min(B, g.seq - i0);
          const T* q = qkv + g.q_offset(b, h) + size_t(i0) * g.stride;
          const T* d_o = dout + g.o_offset(b, h) + size_t(i0) * g.out_stride;
          Gemm(false, true, rows, cols, D, T(g.scale), q, g.stride, k, g.stride, T(0), p.data(), B);
          ProbabilitiesFromLse(p.data(), B, rows, cols, i0, j0, lse + g.lse_offset(b, h) + i0);
          Gemm(true, false, cols, D, rows, T(1), p.data(), B, d_o, g.out_stride, T(1), dv_acc, D);
          Gemm(false, true, rows, cols, D, T(1), d_o, g.out_stride, v, g.stride, T(0), dp.data(), B);
          SoftmaxBackward(dp.data(), p.data(), B, rows, cols, delta.data() + g.lse_offset(b, h) + i0);
          Gemm(true, false, cols, D, rows, T(g.scale), dp.data(), B, q, g.stride, T(1), dk_acc, D);
        }
      }
      T* dk = dqkv + g.k_offset(b, kv) + size_t(j0) * g.stride;
      T* dv = dqkv + g.v_offset(b, kv) + size_t(j0) * g.stride;
      for (int c = 0; c < cols; ++c) {
        std::copy_n(dk_acc + size_t(c) * D, D, dk + size_t(c) * g.stride);
        std::copy_n(dv_acc + size_t(c) * D, D, dv + size_t(c) * g.stride);
      }
    }

    // Pass B: dQ per (sequence, head, query block).
    const int q_items = g.batch * g.heads * g.blocks;
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < q_items; ++item) {
      const int qb = item % g.blocks, h = (item / g.blocks) % g.heads, b = item / (g.blocks * g.heads);
      const int kv = h / g.group;
      const int i0 = qb * B, rows = std::min(B, g.seq - i0);
      const T* q = qkv + g.q_offset(b, h) + size_t(i0) * g.stride;
      const T* d_o = dout + g.o_offset(b, h) + size_t(i0) * g.out_stride;
      T* dq_acc = acc1.data();
      std::fill(acc1.begin(), acc1.end(), T(0));
      for (int j0 = 0; j0 < i0 + rows; j0 += B) {
        const int cols = std::min(B, i0 + rows - j0);
        const T* k = qkv + g.k_offset(b, kv) + size_t(j0) * g.stride;
        const T* v = qkv + g.v_offset(b, kv) + size_t(j0) * g.stride;
        Gemm(false, true, rows, cols, D, T(g.scale), q, g.stride, k, g.stride, T(0), p.data(), B);
        ProbabilitiesFromLse(p.data(), B, rows, cols, i0, j0, lse + g.lse_offset(b, h) + i0);
        Gemm(false, true, rows, cols, D, T(1), d_o, g.out_stride, v, g.stride, T(0), dp.data(), B);
        SoftmaxBackward(dp.data(), p.data(), B, rows, cols, delta.data() + g.lse_offset(b, h) + i0);
        Gemm(false, false, rows, D, cols, T(g.scale), dp.data(), B, k, g.stride, T(1), dq_acc, D);
      }
      T* dq = dqkv + g.q_offset(b, h) + size_t(i0) * g.stride;
      for (int r = 0; r < rows; ++r) std::copy_n(dq_acc + size_t(r) * D, D, dq + size_t(r) * g.stride);
    }
  }
}

template void AttentionForward<float>(float*, float*, const float*, const AttentionShape&, int);
template void AttentionForward<double>(double*, double*, const double*, const AttentionShape&, int);
template void AttentionBackward<float>(float*, const float*, const float*, const float*,
                                       const float*, const AttentionShape&, int);
template void AttentionBackward<double>(double*, const double*, const double*, const double*,
                                        const double*, const AttentionShape&, int);

}  // namespace llamad::cpu
