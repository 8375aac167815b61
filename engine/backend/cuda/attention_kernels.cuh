// Causal flash attention with grouped-query heads on tensor cores (mma.sync m16n8k16,
// bf16 in, f32 accumulate): the forward keeps a running max and sum per query row and
// never stores scores; the backward recomputes them in two passes, one over query tiles
// for dQ and one over key tiles for dK and dV, so no gradient is accumulated by atomics
// and results are bit-identical from run to run.
//
// A block is 4 warps. The forward gives each warp 32 query rows (two 16-row m-tiles), so
// every K and V fragment read from shared memory feeds two products; its key tiles are
// 64 wide, 32 at head dim 128. The backward gives each warp 16 rows of a 64-row tile.
// Operand fragments come from shared memory through ldmatrix (ldmatrix_lanes.h); the next
// tile is copied in with cp.async while the current one computes (two stages, or one
// where shared memory is short); the causal mask is applied only to tiles that cross the
// diagonal or the sequence's end.
//
// Layout (see backend.h): qkv rows hold H query heads, then Hkv key heads, then Hkv value
// heads, each head_dim wide; out rows H heads; lse [B, H, T].
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), lower column in the low
// half of each 32-bit register:
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
//
// On the CPU the tests' emulator (tests/engine/cuda_emulator.h) is included first. The
// launch code at the end takes where the kernels run as a `Device` (see Forward).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <type_traits>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/ldmatrix_lanes.h"
#include "backend/cuda/warp_ops.cuh"

namespace llamad::cuda::flash {
inline namespace LLAMAD_KERNELS_BUILD {

constexpr int kTile = 64;       // keys per tile; queries per tile in the backward
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kForwardRowTiles = 2;  // 16-row m-tiles per warp in the forward
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A shared-memory tile of rows of D bf16, rows padded by 8 elements (16 bytes) so that
// the eight rows one ldmatrix phase reads fall in distinct banks.
template <int D>
struct Tile {
  static constexpr int kStride = D + 8;
  static constexpr int kBytesPerRow = kStride * int(sizeof(bf16));
  bf16* data;
  __device__ bf16* row(int r) const { return data + r * kStride; }
  __device__ Tile next(int rows) const { return {data + rows * kStride}; }
  // The A fragment of rows m0.., columns k0..k0+15.
  __device__ void LoadA(uint32_t a[4], int m0, int k0, int lane) const {
    const LaneOffset o = ColumnMajorQuarters(lane);
    Ldmatrix(a, row(m0 + o.row) + k0 + o.col);
  }
  // B[k][n] = tile[n0 + n][k0 + k], the tile's rows being the product's columns (Q K^T):
  // b[0], b[1] for columns n0..n0+7, b[2], b[3] for n0+8..n0+15.
  __device__ void LoadBRows(uint32_t b[4], int n0, int k0, int lane) const {
    const LaneOffset o = RowMajorQuarters(lane);
    Ldmatrix(b, row(n0 + o.row) + k0 + o.col);
  }
  // B[k][n] = tile[k0 + k][n0 + n], the tile's rows being the reduction (P V): b[0], b[1]
  // for columns n0..n0+7, b[2], b[3] for n0+8..n0+15.
  __device__ void LoadBCols(uint32_t b[4], int k0, int n0, int lane) const {
    const LaneOffset o = ColumnMajorQuarters(lane);
    LdmatrixTrans(b, row(k0 + o.row) + n0 + o.col);
  }
};

// Starts copying rows [r0, r0 + R) of a head (column offset `col` in rows of `stride`
// elements) into a tile; rows at or past `seq` become zeros. The caller commits.
template <int D, int R>
__device__ __forceinline__ void CopyTileAsync(const Tile<D>& tile, const bf16* base, size_t stride,
                                              int col, int r0, int seq) {
  constexpr int kVecs = D / 8;  // 16-byte pieces per row
  static_assert(R * kVecs % kThreads == 0, "every thread copies the same number of pieces");
#pragma unroll
  for (int k = 0; k < R * kVecs / kThreads; ++k) {
    const int i = k * kThreads + threadIdx.x, r = i / kVecs, v = i % kVecs;
    const bool in = r0 + r < seq;
    CopyAsync16(tile.row(r) + v * 8, in ? base + size_t(r0 + r) * stride + col + v * 8 : base, in);
  }
}

// Converts a 16 x 8N block of C fragments (N n-tiles) into the A fragments of its N / 2
// 16-column slices, rounding to bf16.
template <int N = 8>
__device__ __forceinline__ void CToA(const float c[N][4], uint32_t a[N / 2][4]) {
#pragma unroll
  for (int k = 0; k < N / 2; ++k) {
    a[k][0] = Pack(c[2 * k][0], c[2 * k][1]);
    a[k][1] = Pack(c[2 * k][2], c[2 * k][3]);
    a[k][2] = Pack(c[2 * k + 1][0], c[2 * k + 1][1]);
    a[k][3] = Pack(c[2 * k + 1][2], c[2 * k + 1][3]);
  }
}

// The copy pipeline of a loop over tiles 0..count-1 in kStages shared buffers. Tile 0
// was started (and committed) before the loop; stage(i, buffer) starts tile i's copies
// into a buffer. With two stages tile j + 1 copies in while tile j computes; with one
// (where shared memory is short) tile j's copy starts once tile j - 1 is done. Returns the
// buffer tile j is in, complete and visible to every thread. The caller ends each
// iteration with __syncthreads(), so that no copy overwrites a buffer still being read.
template <int kStages, typename Stage>
__device__ __forceinline__ int NextTile(int j, int count, Stage stage) {
  static_assert(kStages == 1 || kStages == 2, "one or two stages");
  if constexpr (kStages == 2) {
    if (j + 1 < count) {
      stage(j + 1, (j + 1) % 2);
      CommitCopies();
      WaitCopies<1>();
    } else {
      WaitCopies<0>();
    }
  } else {
    if (j > 0) {
      stage(j, 0);
      CommitCopies();
    }
    WaitCopies<0>();
  }
  __syncthreads();
  return j % kStages;
}

// s[8][4] = A . tile^T for A (16 x D) in registers and the 64 rows of `tile`: a 16 x 64
// block of scores (Q K^T, dO V^T).
template <int D>
__device__ __forceinline__ void TimesTileRows(float s[8][4], const uint32_t a[D / 16][4],
                                              const Tile<D>& tile, int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      uint32_t b[4];
      tile.LoadBRows(b, j * 8, k * 16, lane);
      Mma(s[j], a[k], b[0], b[1]);
      Mma(s[j + 1], a[k], b[2], b[3]);
    }
  }
}

// acc (16 x D) += C . tile for a 16 x 64 block C held as C fragments (rounded to bf16)
// and the 64 x D `tile`: dS K.
template <int D>
__device__ __forceinline__ void AccumulateTimesTile(float acc[D / 8][4], const float c[8][4],
                                                    const Tile<D>& tile, int lane) {
  uint32_t a[4][4];
  CToA(c, a);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      uint32_t b[4];
      tile.LoadBCols(b, k * 16, n * 8, lane);
      Mma(acc[n], a[k], b[0], b[1]);
      Mma(acc[n + 1], a[k], b[2], b[3]);
    }
  }
}

struct Dims {
  int B, T, H, Hkv;
  size_t qkv_stride, out_stride;
};

// ---- forward -------------------------------------------------------------------------

// The online softmax of one 16-row m-tile's scores `s` against a tile of 8N keys at `n0`:
// scales them into log2 units, masks the future and the padding where `masked`, updates
// the rows' running max and sum, rescales their output `o`, and leaves the unnormalised
// probabilities in `s`. `q_row` is the tile's row g (row g + 8 is its second).
template <int D, int N>
__device__ __forceinline__ void OnlineSoftmax(float s[N][4], float o[D / 8][4], float row_max[2],
                                              float row_sum[2], int q_row, int n0, int t,
                                              int seq, bool masked, float scale_log2) {
  float tile_max[2] = {-FLT_MAX, -FLT_MAX};
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = e >> 1;
      if (masked) {
        const int key = n0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = key <= q_row + 8 * r && key < seq ? s[j][e] * scale_log2 : -INFINITY;
      } else {
        s[j][e] *= scale_log2;
      }
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
  for (int j = 0; j < N; ++j) {
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
}

// Queries per forward block, and keys per forward key tile: 32 at head dim 128, where 64
// would leave the scores too few registers beside the 32 x 128 output rows a warp holds.
constexpr int kForwardRows = kWarps * 16 * kForwardRowTiles;
template <int D>
constexpr int kForwardKeys = D > 64 ? 32 : 64;

template <int D>
__global__ void __launch_bounds__(kThreads) ForwardKernel(bf16* __restrict__ out,
                                                          float* __restrict__ lse,
                                                          const bf16* __restrict__ qkv, Dims d,
                                                          float scale_log2) {
  constexpr int MT = kForwardRowTiles, kRows = kForwardRows, kKeys = kForwardKeys<D>;
  constexpr int N = kKeys / 8;  // n-tiles of scores per m-tile
  constexpr int kTileElements = kKeys * Tile<D>::kStride;
  unsigned char* smem = DynamicSharedMemory();
  // The query tile, then two stages of a key tile and a value tile.
  const Tile<D> qs{reinterpret_cast<bf16*>(smem)};
  bf16* const stages = qs.row(kRows);
  auto k_tile = [&](int stage) { return Tile<D>{stages + 2 * stage * kTileElements}; };
  auto v_tile = [&](int stage) { return Tile<D>{stages + (2 * stage + 1) * kTileElements}; };

  // Heaviest (last) query tiles first: causal work grows with the tile index.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kRows;
  const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H, kvh = h / (d.H / d.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;
  const int k_col = (d.H + kvh) * D, v_col = (d.H + d.Hkv + kvh) * D;
  const int warp_m0 = warp * 16 * MT;  // the warp's first row in the tile
  const int first_q = m0 + warp_m0, last_q = first_q + 16 * MT - 1;
  const int key_tiles = (min(d.T, m0 + kRows) + kKeys - 1) / kKeys;

  auto stage_keys = [&](int tile, int buffer) {
    CopyTileAsync<D, kKeys>(k_tile(buffer), rows, d.qkv_stride, k_col, tile * kKeys, d.T);
    CopyTileAsync<D, kKeys>(v_tile(buffer), rows, d.qkv_stride, v_col, tile * kKeys, d.T);
  };
  CopyTileAsync<D, kRows>(qs, rows, d.qkv_stride, h * D, m0, d.T);
  stage_keys(0, 0);
  CommitCopies();

  float o[MT][D / 8][4];
  float row_max[MT][2], row_sum[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -FLT_MAX;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }

  for (int j = 0; j < key_tiles; ++j) {
    const int n0 = j * kKeys, stage = NextTile<2>(j, key_tiles, stage_keys);
    // Warp-uniform: past its last row every key of the tile is in this warp's future.
    if (n0 <= last_q) {
      const Tile<D> ks = k_tile(stage), vs = v_tile(stage);
      float s[MT][N][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int jn = 0; jn < N; ++jn) s[mt][jn][0] = s[mt][jn][1] = s[mt][jn][2] = s[mt][jn][3] = 0.f;
      }
      // S = Q K^T: each K fragment pair feeds both m-tiles.
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) qs.LoadA(a[mt], warp_m0 + 16 * mt, k * 16, lane);
#pragma unroll
        for (int jn = 0; jn < N; jn += 2) {
          uint32_t bk[4];
          ks.LoadBRows(bk, jn * 8, k * 16, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma(s[mt][jn], a[mt], bk[0], bk[1]);
            Mma(s[mt][jn + 1], a[mt], bk[2], bk[3]);
          }
        }
      }
      const bool masked = n0 + kKeys - 1 > first_q || n0 + kKeys > d.T;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        OnlineSoftmax<D, N>(s[mt], o[mt], row_max[mt], row_sum[mt], first_q + 16 * mt + g, n0, t,
                         d.T, masked, scale_log2);
      }
      // O += P V with P rounded to bf16: each V fragment pair feeds both m-tiles.
      uint32_t p[MT][N / 2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) CToA<N>(s[mt], p[mt]);
#pragma unroll
      for (int k = 0; k < N / 2; ++k) {
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
          uint32_t bv[4];
          vs.LoadBCols(bv, k * 16, n * 8, lane);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            Mma(o[mt][n], p[mt][k], bv[0], bv[1]);
            Mma(o[mt][n + 1], p[mt][k], bv[2], bv[3]);
          }
        }
      }
    }
    __syncthreads();  // the next iteration copies into the stage this one read
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int q = first_q + 16 * mt + g + 8 * r;
      if (q >= d.T) continue;
      const float inv = 1.f / sum;
      bf16* dst = out + (size_t(b) * d.T + q) * d.out_stride + h * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<__nv_bfloat162*>(dst + n * 8 + 2 * t) =
            __floats2bfloat162_rn(o[mt][n][2 * r] * inv, o[mt][n][2 * r + 1] * inv);
      }
      if (t == 0) lse[(size_t(b) * d.H + h) * d.T + q] = (row_max[mt][r] + log2f(sum)) / kLog2e;
    }
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
  sum = WarpReduce(sum, [](float a, float b) { return a + b; });
  if (lane == 0) delta[row] = sum;
}

// dQ for one 64-query tile: loops over the key tiles it attends to.
template <int D, int kStages>
__global__ void __launch_bounds__(kThreads) BackwardDqKernel(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const bf16* __restrict__ qkv, Dims d, float scale) {
  constexpr int kTileElements = kTile * Tile<D>::kStride;
  unsigned char* smem = DynamicSharedMemory();
  // Q and dO, then kStages buffers of a key tile and a value tile.
  const Tile<D> qs{reinterpret_cast<bf16*>(smem)};
  const Tile<D> dos = qs.next(kTile);
  bf16* const stages = dos.row(kTile);
  auto k_tile = [&](int stage) { return Tile<D>{stages + 2 * stage * kTileElements}; };
  auto v_tile = [&](int stage) { return Tile<D>{stages + (2 * stage + 1) * kTileElements}; };

  const int m0 = (gridDim.x - 1 - blockIdx.x) * kTile;
  const int bh = blockIdx.y, b = bh / d.H, h = bh % d.H, kvh = h / (d.H / d.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;
  const int k_col = (d.H + kvh) * D, v_col = (d.H + d.Hkv + kvh) * D;
  const float scale_log2 = scale * kLog2e;
  const int first_q = m0 + warp * 16;
  const int key_tiles = (min(d.T, m0 + kTile) + kTile - 1) / kTile;

  auto stage_keys = [&](int tile, int buffer) {
    CopyTileAsync<D, kTile>(k_tile(buffer), rows, d.qkv_stride, k_col, tile * kTile, d.T);
    CopyTileAsync<D, kTile>(v_tile(buffer), rows, d.qkv_stride, v_col, tile * kTile, d.T);
  };
  CopyTileAsync<D, kTile>(qs, rows, d.qkv_stride, h * D, m0, d.T);
  CopyTileAsync<D, kTile>(dos, dout + size_t(b) * d.T * d.out_stride, d.out_stride, h * D, m0, d.T);
  stage_keys(0, 0);
  CommitCopies();
  const int q_row[2] = {first_q + g, first_q + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = q_row[r] < d.T;
    const size_t at = (size_t(b) * d.H + h) * d.T + q_row[r];
    row_lse[r] = in ? lse[at] * kLog2e : 0.f;
    row_delta[r] = in ? delta[at] : 0.f;
  }
  WaitCopies<0>();
  __syncthreads();
  uint32_t qf[D / 16][4], dof[D / 16][4];
#pragma unroll
  for (int k = 0; k < D / 16; ++k) {
    qs.LoadA(qf[k], warp * 16, k * 16, lane);
    dos.LoadA(dof[k], warp * 16, k * 16, lane);
  }
  float dq[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  for (int j = 0; j < key_tiles; ++j) {
    const int n0 = j * kTile, stage = NextTile<kStages>(j, key_tiles, stage_keys);
    const Tile<D> ks = k_tile(stage), vs = v_tile(stage);
    float s[8][4], dp[8][4];
    TimesTileRows<D>(s, qf, ks, lane);
    TimesTileRows<D>(dp, dof, vs, lane);
    // dS = P * (dP - delta), with P recomputed from the saved log-sum-exp.
    const bool masked = n0 + kTile - 1 > first_q || n0 + kTile > d.T || first_q + 15 >= d.T;
#pragma unroll
    for (int j2 = 0; j2 < 8; ++j2) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j2 * 8 + 2 * t + (e & 1), r = e >> 1;
        const bool valid = !masked || (key <= q_row[r] && key < d.T && q_row[r] < d.T);
        const float p = valid ? exp2f(s[j2][e] * scale_log2 - row_lse[r]) : 0.f;
        s[j2][e] = p * (dp[j2][e] - row_delta[r]);
      }
    }
    AccumulateTimesTile<D>(dq, s, ks, lane);
    __syncthreads();  // the next iteration copies into the stage this one read
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

// Shared memory of the backward kernels. dQ: Q and dO, then kStages buffers of K and V.
// dK/dV: K and V, then kStages buffers of a Q tile, a dO tile and their log-sum-exp and
// delta.
template <int D>
constexpr int DqSharedBytes(int stages) {
  return (2 + 2 * stages) * kTile * Tile<D>::kBytesPerRow;
}
template <int D>
constexpr int DkvSharedBytes(int stages) {
  return (2 + 2 * stages) * kTile * Tile<D>::kBytesPerRow + stages * 2 * kTile * int(sizeof(float));
}

// dK and dV for one 64-key tile of one kv head: loops over the query heads that share it
// and the query tiles that attend to it. Works on transposed scores (keys are rows).
template <int D, int kStages>
__global__ void __launch_bounds__(kThreads) BackwardDkvKernel(
    bf16* __restrict__ dqkv, const bf16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, const bf16* __restrict__ qkv, Dims d, float scale) {
  constexpr int kTileElements = kTile * Tile<D>::kStride;
  unsigned char* smem = DynamicSharedMemory();
  const Tile<D> ks{reinterpret_cast<bf16*>(smem)};
  const Tile<D> vs = ks.next(kTile);
  bf16* const stages = vs.row(kTile);
  auto q_tile = [&](int stage) { return Tile<D>{stages + 2 * stage * kTileElements}; };
  auto do_tile = [&](int stage) { return Tile<D>{stages + (2 * stage + 1) * kTileElements}; };
  float* const stats = reinterpret_cast<float*>(stages + 2 * kStages * kTileElements);
  auto lse_of = [&](int stage) { return stats + 2 * stage * kTile; };
  auto delta_of = [&](int stage) { return stats + (2 * stage + 1) * kTile; };

  const int n0 = blockIdx.x * kTile;  // first tiles have the most queries after them
  const int bk = blockIdx.y, b = bk / d.Hkv, kvh = bk % d.Hkv, group = d.H / d.Hkv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bf16* rows = qkv + size_t(b) * d.T * d.qkv_stride;
  const bf16* dout_rows = dout + size_t(b) * d.T * d.out_stride;
  const float scale_log2 = scale * kLog2e;
  // Work items: every query head of the group against every query tile from n0 on.
  const int query_tiles = (d.T - n0 + kTile - 1) / kTile, items = group * query_tiles;
  auto head_of = [&](int item) { return kvh * group + item / query_tiles; };
  auto m0_of = [&](int item) { return n0 + item % query_tiles * kTile; };
  // Starts loading an item's Q and dO tiles (cp.async) and stores its statistics.
  auto stage_item = [&](int item, int stage) {
    const int h = head_of(item), m0 = m0_of(item);
    CopyTileAsync<D, kTile>(q_tile(stage), rows, d.qkv_stride, h * D, m0, d.T);
    CopyTileAsync<D, kTile>(do_tile(stage), dout_rows, d.out_stride, h * D, m0, d.T);
    const size_t at = (size_t(b) * d.H + h) * d.T + m0;
    for (int i = threadIdx.x; i < kTile; i += kThreads) {
      const bool in = m0 + i < d.T;
      lse_of(stage)[i] = in ? lse[at + i] * kLog2e : 0.f;
      delta_of(stage)[i] = in ? delta[at + i] : 0.f;
    }
  };

  CopyTileAsync<D, kTile>(ks, rows, d.qkv_stride, (d.H + kvh) * D, n0, d.T);
  CopyTileAsync<D, kTile>(vs, rows, d.qkv_stride, (d.H + d.Hkv + kvh) * D, n0, d.T);
  stage_item(0, 0);
  CommitCopies();
  const int key_row[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;
  }

  for (int item = 0; item < items; ++item) {
    const int stage = NextTile<kStages>(item, items, stage_item), m0 = m0_of(item);
    const Tile<D> qs = q_tile(stage), dos = do_tile(stage);
    const float* lse_s = lse_of(stage);
    const float* delta_s = delta_of(stage);
    float s[8][4], dp[8][4];  // [key, query]
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
      uint32_t kf[4], vf[4];
      ks.LoadA(kf, warp * 16, k * 16, lane);
      vs.LoadA(vf, warp * 16, k * 16, lane);
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        uint32_t bq[4], bo[4];
        qs.LoadBRows(bq, j * 8, k * 16, lane);
        Mma(s[j], kf, bq[0], bq[1]);
        Mma(s[j + 1], kf, bq[2], bq[3]);
        dos.LoadBRows(bo, j * 8, k * 16, lane);
        Mma(dp[j], vf, bo[0], bo[1]);
        Mma(dp[j + 1], vf, bo[2], bo[3]);
      }
    }
    // Only the diagonal tile has queries before keys; padding sits at the sequence's end.
    const bool masked = m0 == n0 || m0 + kTile > d.T || n0 + kTile > d.T;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = j * 8 + 2 * t + (e & 1), q = m0 + qi, r = e >> 1;
        const bool valid = !masked || (q >= key_row[r] && q < d.T && key_row[r] < d.T);
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
      for (int n = 0; n < D / 8; n += 2) {
        uint32_t bo[4], bq[4];
        dos.LoadBCols(bo, k * 16, n * 8, lane);
        Mma(dv[n], pf[k], bo[0], bo[1]);
        Mma(dv[n + 1], pf[k], bo[2], bo[3]);
        qs.LoadBCols(bq, k * 16, n * 8, lane);
        Mma(dk[n], dsf[k], bq[0], bq[1]);
        Mma(dk[n + 1], dsf[k], bq[2], bq[3]);
      }
    }
    __syncthreads();  // the next iteration stages into the buffers this one read
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

inline Dims MakeDims(const AttentionArgs& a) {
  return {a.batch, a.seq, a.heads, a.kv_heads,
          size_t(a.heads + 2 * a.kv_heads) * a.head_dim, size_t(a.heads) * a.head_dim};
}

// ---- launches ------------------------------------------------------------------------
//
// The launch code runs the kernels on a `Device`, which provides
//   void Launch(kernel, dim3 grid, int threads, int shared_bytes, args...)
//       runs kernel(args...) over the grid with that much dynamic shared memory;
//   int SharedMemoryLimit()   the dynamic shared memory a block may opt in to;
//   int max_grid_y            the largest grid y.
// gpu_device.cuh's is the GPU; the CPU emulator's runs the same kernels in tests.

// The dynamic shared memory a block may opt in to: 227 KiB on sm_90, 163 KiB on sm_80
// and sm_87, 99 KiB on sm_86, sm_89 and sm_120 (the least of the GPUs we build for).
constexpr int kSmallestSharedMemoryLimit = 99 * 1024;

// A grid's y holds (sequence, head) pairs, at most max_grid_y (65535 on GPUs) of them: a
// larger batch runs in slices of whole sequences. `run(first, count, dims)` launches one
// slice, whose pointers start `first` sequences in (SliceOffsets).
template <typename Run>
void ForBatchSlices(const AttentionArgs& a, int max_grid_y, Run&& run) {
  const int per_slice = std::max(1, max_grid_y / a.heads);  // heads >= kv_heads: both kernels fit
  for (int first = 0; first < a.batch; first += per_slice) {
    AttentionArgs slice = a;
    slice.batch = std::min(per_slice, a.batch - first);
    run(first, slice.batch, MakeDims(slice));
  }
}
// Element offsets of sequence `first` in qkv (and dqkv), in out (and dout), and in the
// per-row statistics (lse, delta).
struct SliceOffsets {
  size_t qkv, out, rows;
};
inline SliceOffsets OffsetsOf(const Dims& d, int first) {
  return {size_t(first) * d.T * d.qkv_stride, size_t(first) * d.T * d.out_stride, size_t(first) * d.H * d.T};
}

template <int D, typename Device>
void Forward(Device& device, bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a) {
  constexpr int kRows = kForwardRows;
  const int bytes = (kRows + 4 * kForwardKeys<D>) * Tile<D>::kBytesPerRow;
  ForBatchSlices(a, device.max_grid_y, [&](int first, int count, const Dims& d) {
    const SliceOffsets at = OffsetsOf(d, first);
    const dim3 grid((a.seq + kRows - 1) / kRows, count * a.heads);
    device.Launch(ForwardKernel<D>, grid, kThreads, bytes, out + at.out, lse + at.rows, qkv + at.qkv, d,
                  float(kLog2e / std::sqrt(double(D))));
  });
}

template <int D, typename Device>
void Backward(Device& device, bf16* dqkv, float* delta, const bf16* dout, const bf16* out, const float* lse,
              const bf16* qkv, const AttentionArgs& a) {
  const Dims d = MakeDims(a);
  const size_t rows = size_t(a.batch) * a.heads * a.seq;
  device.Launch(DeltaKernel<D>, dim3(unsigned((rows + 7) / 8)), 256, 0, delta, dout, out, d);
  const float scale = float(1.0 / std::sqrt(double(D)));
  const int tiles = (a.seq + kTile - 1) / kTile;
  auto launch = [&](auto stages) {
    constexpr int kStages = decltype(stages)::value;
    ForBatchSlices(a, device.max_grid_y, [&](int first, int count, const Dims& sd) {
      const SliceOffsets at = OffsetsOf(sd, first);
      const float* slice_delta = delta + at.rows;
      device.Launch(BackwardDqKernel<D, kStages>, dim3(tiles, count * a.heads), kThreads, DqSharedBytes<D>(kStages),
                    dqkv + at.qkv, dout + at.out, lse + at.rows, slice_delta, qkv + at.qkv, sd, scale);
      device.Launch(BackwardDkvKernel<D, kStages>, dim3(tiles, count * a.kv_heads), kThreads,
                    DkvSharedBytes<D>(kStages), dqkv + at.qkv, dout + at.out, lse + at.rows, slice_delta,
                    qkv + at.qkv, sd, scale);
    });
  };
  // Two stages fit every sm_80+ GPU's shared memory below head dim 128; at 128 they need
  // 103 KiB, more than sm_86/sm_89 (RTX 30/40, A10, L4, L40) give a block.
  if (a.backward_stages == 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (DkvSharedBytes<D>(2) <= kSmallestSharedMemoryLimit) {
    launch(std::integral_constant<int, 2>{});
  } else if (DkvSharedBytes<D>(2) <= device.SharedMemoryLimit()) {
    launch(std::integral_constant<int, 2>{});
  } else if (a.backward_stages == 2) {
    Fail("attention: two backward stages do not fit this GPU's shared memory at head dim 128", __FILE__,
         __LINE__);
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

inline bool SupportsHeadDim(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

// The forward and backward at the head dimension of `a` (one that SupportsHeadDim).
template <typename Device>
void Forward(Device& device, bf16* out, float* lse, const bf16* qkv, const AttentionArgs& a) {
  switch (a.head_dim) {
    case 32: return Forward<32>(device, out, lse, qkv, a);
    case 64: return Forward<64>(device, out, lse, qkv, a);
    case 128: return Forward<128>(device, out, lse, qkv, a);
  }
  Fail("attention: head_dim must be 32, 64 or 128", __FILE__, __LINE__);
}
template <typename Device>
void Backward(Device& device, bf16* dqkv, float* delta, const bf16* dout, const bf16* out, const float* lse,
              const bf16* qkv, const AttentionArgs& a) {
  switch (a.head_dim) {
    case 32: return Backward<32>(device, dqkv, delta, dout, out, lse, qkv, a);
    case 64: return Backward<64>(device, dqkv, delta, dout, out, lse, qkv, a);
    case 128: return Backward<128>(device, dqkv, delta, dout, out, lse, qkv, a);
  }
  Fail("attention: head_dim must be 32, 64 or 128", __FILE__, __LINE__);
}

}  // namespace LLAMAD_KERNELS_BUILD
}  // namespace llamad::cuda::flash
