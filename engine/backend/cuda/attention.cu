// Causal flash attention with grouped-query heads on tensor cores (mma.sync m16n8k16,
// bf16 in, f32 accumulate): the forward keeps a running max and sum per query row and
// never stores scores; the backward recomputes them in two passes, one over query tiles
// for dQ and one over key tiles for dK and dV, so no gradient is accumulated by atomics
// and results are bit-identical from run to run.
//
// Tiles are 64 queries x 64 keys; a block is 4 warps, each owning 16 rows of its tile.
// Layout (see backend.h): qkv rows hold H query heads, then Hkv key heads, then Hkv value
// heads, each head_dim wide; out rows H heads; lse [B, H, T].
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), lower column in the low
// half of each 32-bit register:
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
#include <cfloat>
#include <cmath>

#include "backend/cuda/cuda_common.cuh"

namespace llamad::cuda {
namespace {

constexpr int kTile = 64;       // queries and keys per tile
constexpr int kWarps = 4;       // 16 rows each
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void Mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t PackRaw(bf16 lo, bf16 hi) {
  __nv_bfloat162 v;
  v.x = lo;
  v.y = hi;
  return *reinterpret_cast<uint32_t*>(&v);
}

// A shared-memory tile of kTile rows of D bf16, rows padded by 8 elements (16 bytes) so
// that the fragment loads of a warp fall in distinct banks.
template <int D>
struct Tile {
  static constexpr int kStride = D + 8;
  bf16* data;
  __device__ bf16* row(int r) const { return data + r * kStride; }
  __device__ uint32_t Word(int r, int c) const {  // two bf16 at (r, c), c even
    return *reinterpret_cast<const uint32_t*>(data + r * kStride + c);
  }
  // A fragment of rows m0.., columns k0..k0+15.
  __device__ void LoadA(uint32_t a[4], int m0, int k0, int g, int t) const {
    a[0] = Word(m0 + g, k0 + 2 * t);
    a[1] = Word(m0 + g + 8, k0 + 2 * t);
    a[2] = Word(m0 + g, k0 + 2 * t + 8);
    a[3] = Word(m0 + g + 8, k0 + 2 * t + 8);
  }
  // B[k][n] = tile[n0 + n][k0 + k]: the tile's rows are the product's columns (Q K^T).
  __device__ void LoadBRows(uint32_t& b0, uint32_t& b1, int n0, int k0, int g, int t) const {
    b0 = Word(n0 + g, k0 + 2 * t);
    b1 = Word(n0 + g, k0 + 2 * t + 8);
  }
  // B[k][n] = tile[k0 + k][n0 + n]: the tile's rows are the reduction (P V).
  __device__ void LoadBCols(uint32_t& b0, uint32_t& b1, int k0, int n0, int g, int t) const {
    const bf16* c = data + n0 + g;
    b0 = PackRaw(c[(k0 + 2 * t) * kStride], c[(k0 + 2 * t + 1) * kStride]);
    b1 = PackRaw(c[(k0 + 2 * t + 8) * kStride], c[(k0 + 2 * t + 9) * kStride]);
  }
};

// Copies rows [r0, r0 + kTile) of a head (column offset `col` in rows of `stride`
// elements) into a tile, zero-filling rows at or past `seq`. 16-byte accesses.
template <int D>
__device__ void LoadTile(const Tile<D>& tile, const bf16* base, size_t stride, int col, int r0,
                         int seq) {
  constexpr int kVecs = D / 8;
  for (int i = threadIdx.x; i < kTile * kVecs; i += kThreads) {
    const int r = i / kVecs, v = i % kVecs;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r0 + r < seq) value = *reinterpret_cast<const uint4*>(base + size_t(r0 + r) * stride + col + v * 8);
    *reinterpret_cast<uint4*>(tile.row(r) + v * 8) = value;
  }
}

// Converts a 16 x 64 block of C fragments (8 n-tiles) into the A fragments of its four
// 16-column slices, rounding to bf16.
__device__ __forceinline__ void CToA(const float c[8][4], uint32_t a[4][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    a[k][0] = Pack(c[2 * k][0], c[2 * k][1]);
    a[k][1] = Pack(c[2 * k][2], c[2 * k][3]);
    a[k][2] = Pack(c[2 * k + 1][0], c[2 * k + 1][1]);
    a[k][3] = Pack(c[2 * k + 1][2], c[2 * k + 1][3]);
  }
}

// s[8][4] = A . tile^T for A (16 x D) in registers and the 64 rows of `tile`: a 16 x 64
// block of scores (Q K^T, dO V^T).
template <int D>
__device__ __forceinline__ void TimesTileRows(float s[8][4], const uint32_t a[D / 16][4],
                                              const Tile<D>& tile, int g, int t) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      uint32_t b0, b1;
      tile.LoadBRows(b0, b1, j * 8, k * 16, g, t);
      Mma(s[j], a[k], b0, b1);
    }
  }
}

// acc (16 x D) += C . tile for a 16 x 64 block C held as C fragments (rounded to bf16)
// and the 64 x D `tile`: P V and dS K.
template <int D>
__device__ __forceinline__ void AccumulateTimesTile(float acc[D / 8][4], const float c[8][4],
                                                    const Tile<D>& tile, int g, int t) {
  uint32_t a[4][4];
  CToA(c, a);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      uint32_t b0, b1;
      tile.LoadBCols(b0, b1, k * 16, n * 8, g, t);
      Mma(acc[n], a[k], b0, b1);
    }
  }
}

struct Dims {
  int B, T, H, Hkv;
  size_t qkv_stride, out_stride;
};

// ---- forward -------------------------------------------------------------------------

template <int D>
__global__ void __launch_bounds__(kThreads) ForwardKernel(bf16* __restrict__ out,
                                                          float* __restrict__ lse,
                                                          const bf16* __restrict__ qkv, Dims d,
                                                          float scale_log2) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile<D> qs{reinterpret_cast<bf16*>(smem)};
  const Tile<D> ks{qs.data + kTile * Tile<D>::kStride};
  const Tile<D> vs{ks.data + kTile * Tile<D>::kStride};

  // Heaviest (last) query tiles first: causal work grows with the tile index.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H, kvh = h / (d.H / d.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;

  LoadTile<D>(qs, rows, d.qkv_stride, h * D, m0, d.T);
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) qs.LoadA(qf[k], warp * 16, k * 16, g, t);

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-FLT_MAX, -FLT_MAX}, row_sum[2] = {0.f, 0.f};
  const int q_row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};

  const int kv_end = min(d.T, m0 + kTile);
  for (int n0 = 0; n0 < kv_end; n0 += kTile) {
    __syncthreads();  // the previous tile is no longer read
    LoadTile<D>(ks, rows, d.qkv_stride, (d.H + kvh) * D, n0, d.T);
    LoadTile<D>(vs, rows, d.qkv_stride, (d.H + d.Hkv + kvh) * D, n0, d.T);
    __syncthreads();

    float s[8][4];
    TimesTileRows<D>(s, qf, ks, g, t);
    // Scale into log2 units and mask the future and the padding.
    float tile_max[2] = {-FLT_MAX, -FLT_MAX};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1), r = e >> 1;
        const bool valid = key <= q_row[r] && key < d.T;
        s[j][e] = valid ? s[j][e] * scale_log2 : -INFINITY;
        tile_max[r] = fmaxf(tile_max[r], s[j][e]);
      }
    }
    float correction[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      correction[r] = exp2f(row_max[r] - new_max);
      row_max[r] = new_max;
    }
    float tile_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        s[j][e] = exp2f(s[j][e] - row_max[r]);  // masked: exp2(-inf) = 0
        tile_sum[r] += s[j][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) row_sum[r] = row_sum[r] * correction[r] + tile_sum[r];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= correction[0];
      o[n][1] *= correction[0];
      o[n][2] *= correction[1];
      o[n][3] *= correction[1];
    }
    AccumulateTimesTile<D>(o, s, vs, g, t);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q_row[r];
    if (q >= d.T) continue;
    const float inv = 1.f / row_sum[r];
    bf16* dst = out + (size_t(b) * d.T + q) * d.out_stride + h * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<__nv_bfloat162*>(dst + n * 8 + 2 * t) =
          __floats2bfloat162_rn(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
    }
    if (t == 0) lse[(size_t(b) * d.H + h) * d.T + q] = (row_max[r] + log2f(row_sum[r])) / kLog2e;
  }
}

// ---- backward ------------------------------------------------------------------------

// delta[b, h, q] = sum_d dout * out: one warp per row.
template <int D>
__global__ void DeltaKernel(float* __restrict__ delta, const bf16* __restrict__ dout,
                            const bf16* __restrict__ out, Dims d) {
  const size_t row = size_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= size_t(d.B) * d.H * d.T) return;
  const int q = int(row % d.T), h = int((row / d.T) % d.H), b = int(row / (size_t(d.T) * d.H));
  const size_t at = (size_t(b) * d.T + q) * d.out_stride + h * D;
  float sum = 0.f;
  for (int c = lane; c < D; c += 32) sum += ToFloat(dout[at + c]) * ToFloat(out[at + c]);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) delta[row] = sum;
}

// dQ for one 64-query tile: loops over the key tiles it attends to.
template <int D>
__global__ void __launch_bounds__(kThreads) BackwardDqKernel(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const bf16* __restrict__ qkv, Dims d, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile<D> qs{reinterpret_cast<bf16*>(smem)};
  const Tile<D> dos{qs.data + kTile * Tile<D>::kStride};
  const Tile<D> ks{dos.data + kTile * Tile<D>::kStride};
  const Tile<D> vs{ks.data + kTile * Tile<D>::kStride};

  const int m0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H, kvh = h / (d.H / d.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;
  const float scale_log2 = scale * kLog2e;

  LoadTile<D>(qs, rows, d.qkv_stride, h * D, m0, d.T);
  LoadTile<D>(dos, dout + size_t(b) * d.T * d.out_stride, d.out_stride, h * D, m0, d.T);
  __syncthreads();
  uint32_t qf[D / 16][4], dof[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    qs.LoadA(qf[k], warp * 16, k * 16, g, t);
    dos.LoadA(dof[k], warp * 16, k * 16, g, t);
  }
  const int q_row[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = q_row[r] < d.T;
    const size_t at = (size_t(b) * d.H + h) * d.T + q_row[r];
    row_lse[r] = in ? lse[at] * kLog2e : 0.f;
    row_delta[r] = in ? delta[at] : 0.f;
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  const int kv_end = min(d.T, m0 + kTile);
  for (int n0 = 0; n0 < kv_end; n0 += kTile) {
    __syncthreads();
    LoadTile<D>(ks, rows, d.qkv_stride, (d.H + kvh) * D, n0, d.T);
    LoadTile<D>(vs, rows, d.qkv_stride, (d.H + d.Hkv + kvh) * D, n0, d.T);
    __syncthreads();
    float s[8][4], dp[8][4];
    TimesTileRows<D>(s, qf, ks, g, t);
    TimesTileRows<D>(dp, dof, vs, g, t);
    // dS = P * (dP - delta), with P recomputed from the saved log-sum-exp.
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1), r = e >> 1;
        const bool valid = key <= q_row[r] && key < d.T && q_row[r] < d.T;
        const float p = valid ? exp2f(s[j][e] * scale_log2 - row_lse[r]) : 0.f;
        s[j][e] = p * (dp[j][e] - row_delta[r]);
      }
    }
    AccumulateTimesTile<D>(dq, s, ks, g, t);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int q = q_row[r];
    if (q >= d.T) continue;
    bf16* dst = dqkv + (size_t(b) * d.T + q) * d.qkv_stride + h * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<__nv_bfloat162*>(dst + n * 8 + 2 * t) =
          __floats2bfloat162_rn(dq[n][2 * r] * scale, dq[n][2 * r + 1] * scale);
    }
  }
}

// dK and dV for one 64-key tile of one kv head: loops over the query heads that share it
// and the query tiles that attend to it. Works on transposed scores (keys are rows).
template <int D>
__global__ void __launch_bounds__(kThreads) BackwardDkvKernel(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const bf16* __restrict__ qkv, Dims d, float scale) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Tile<D> ks{reinterpret_cast<bf16*>(smem)};
  const Tile<D> vs{ks.data + kTile * Tile<D>::kStride};
  const Tile<D> qs{vs.data + kTile * Tile<D>::kStride};
  const Tile<D> dos{qs.data + kTile * Tile<D>::kStride};
  float* lse_s = reinterpret_cast<float*>(dos.data + kTile * Tile<D>::kStride);
  float* delta_s = lse_s + kTile;

  const int n0 = blockIdx.x * kTile;  // first tiles have the most queries after them
  const int bk = blockIdx.y, b = bk / d.Hkv, kvh = bk % d.Hkv, group = d.H / d.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;
  const bf16* dout_rows = dout + size_t(b) * d.T * d.out_stride;
  const float scale_log2 = scale * kLog2e;

  LoadTile<D>(ks, rows, d.qkv_stride, (d.H + kvh) * D, n0, d.T);
  LoadTile<D>(vs, rows, d.qkv_stride, (d.H + d.Hkv + kvh) * D, n0, d.T);
  const int key_row[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  }

  for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
    const size_t stats = (size_t(b) * d.H + h) * d.T;
    for (int m0 = n0; m0 < d.T; m0 += kTile) {
      __syncthreads();
      LoadTile<D>(qs, rows, d.qkv_stride, h * D, m0, d.T);
      LoadTile<D>(dos, dout_rows, d.out_stride, h * D, m0, d.T);
      for (int i = threadIdx.x; i < kTile; i += kThreads) {
        const bool in = m0 + i < d.T;
        lse_s[i] = in ? lse[stats + m0 + i] * kLog2e : 0.f;
        delta_s[i] = in ? delta[stats + m0 + i] : 0.f;
      }
      __syncthreads();
      float s[8][4], dp[8][4];  // [key, query]
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        uint32_t kf[4], vf[4];
        ks.LoadA(kf, warp * 16, k * 16, g, t);
        vs.LoadA(vf, warp * 16, k * 16, g, t);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          uint32_t b0, b1;
          qs.LoadBRows(b0, b1, j * 8, k * 16, g, t);
          Mma(s[j], kf, b0, b1);
          dos.LoadBRows(b0, b1, j * 8, k * 16, g, t);
          Mma(dp[j], vf, b0, b1);
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1), q = m0 + qi, r = e >> 1;
          const bool valid = q >= key_row[r] && q < d.T && key_row[r] < d.T;
          const float p = valid ? exp2f(s[j][e] * scale_log2 - lse_s[qi]) : 0.f;
          s[j][e] = p;                              // P^T
          dp[j][e] = p * (dp[j][e] - delta_s[qi]);  // dS^T
        }
      }
      // dV += P^T dO and dK += dS^T Q in one interleaved loop: at head dim 128 two
      // separate passes spill registers.
      uint32_t pf[4][4], dsf[4][4];
      CToA(s, pf);
      CToA(dp, dsf);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          uint32_t b0, b1;
          dos.LoadBCols(b0, b1, k * 16, n * 8, g, t);
          Mma(dv[n], pf[k], b0, b1);
          qs.LoadBCols(b0, b1, k * 16, n * 8, g, t);
          Mma(dk[n], dsf[k], b0, b1);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_row[r];
    if (key >= d.T) continue;
    bf16* row = dqkv + (size_t(b) * d.T + key) * d.qkv_stride;
    bf16* dk_dst = row + (d.H + kvh) * D;
    bf16* dv_dst = row + (d.H + d.Hkv + kvh) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<__nv_bfloat162*>(dk_dst + n * 8 + 2 * t) =
          __floats2bfloat162_rn(dk[n][2 * r] * scale, dk[n][2 * r + 1] * scale);
      *reinterpret_cast<__nv_bfloat162*>(dv_dst + n * 8 + 2 * t) =
          __floats2bfloat162_rn(dv[n][2 * r], dv[n][2 * r + 1]);
    }
  }
}

Dims MakeDims(const AttentionArgs& a) {
  return {a.batch, a.seq, a.heads, a.kv_heads,
          size_t(a.heads + 2 * a.kv_heads) * a.head_dim, size_t(a.heads) * a.head_dim};
}

template <typename Kernel, typename... Args>
void Launch(Kernel kernel, int tiles_bytes, dim3 grid, cudaStream_t stream, Args... args) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (a cheap host call).
  LLAMAD_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, tiles_bytes));
  kernel<<<grid, kThreads, tiles_bytes, stream>>>(args...);
  LLAMAD_CUDA_LAUNCHED();
}

template <int D>
void Forward(bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a, cudaStream_t s) {
  const Dims d = MakeDims(a);
  const int bytes = 3 * kTile * Tile<D>::kStride * sizeof(bf16);
  const dim3 grid((a.seq + kTile - 1) / kTile, a.batch * a.heads);
  Launch(ForwardKernel<D>, bytes, grid, s, out, lse, qkv, d,
            float(kLog2e / std::sqrt(double(D))));
}

template <int D>
void Backward(bf16* dqkv, float* delta, const bf16* dout, const bf16* out, const float* lse,
              const bf16* qkv, const AttentionArgs& a, cudaStream_t s) {
  const Dims d = MakeDims(a);
  const size_t rows = size_t(a.batch) * a.heads * a.seq;
  DeltaKernel<D><<<unsigned((rows + 7) / 8), 256, 0, s>>>(delta, dout, out, d);
  LLAMAD_CUDA_LAUNCHED();
  const float scale = float(1.0 / std::sqrt(double(D)));
  const int tiles = (a.seq + kTile - 1) / kTile;
  const int bytes = 4 * kTile * Tile<D>::kStride * sizeof(bf16);
  Launch(BackwardDqKernel<D>, bytes, dim3(tiles, a.batch * a.heads), s, dqkv, dout, lse,
            static_cast<const float*>(delta), qkv, d, scale);
  Launch(BackwardDkvKernel<D>, bytes + 2 * kTile * int(sizeof(float)),
            dim3(tiles, a.batch * a.kv_heads), s, dqkv, dout, lse,
            static_cast<const float*>(delta), qkv, d, scale);
}

}  // namespace

bool AttentionSupportsHeadDim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 128;
}

void AttentionForward(bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a,
                      cudaStream_t stream) {
  switch (a.head_dim) {
    case 32: return Forward<32>(out, lse, qkv, a, stream);
    case 64: return Forward<64>(out, lse, qkv, a, stream);
    case 128: return Forward<128>(out, lse, qkv, a, stream);
  }
  Fail("attention: head_dim must be 32, 64 or 128", __FILE__, __LINE__);
}

void AttentionBackward(bf16* dqkv, float* delta, const bf16* dout, const bf16* out,
                       const float* lse, const bf16* qkv, const AttentionArgs& a,
                       cudaStream_t stream) {
  switch (a.head_dim) {
    case 32: return Backward<32>(dqkv, delta, dout, out, lse, qkv, a, stream);
    case 64: return Backward<64>(dqkv, delta, dout, out, lse, qkv, a, stream);
    case 128: return Backward<128>(dqkv, delta, dout, out, lse, qkv, a, stream);
  }
  Fail("attention: head_dim must be 32, 64 or 128", __FILE__, __LINE__);
}

}  // namespace llamad::cuda
