// The lane offsets the attention kernels hand ldmatrix, checked on the host: ldmatrix is
// emulated as the PTX ISA describes it, and what each lane receives must be the operand
// fragment mma.m16n8k16 expects (the layouts the kernels' scalar loads used before).
#include "backend/cuda/ldmatrix_lanes.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <utility>

namespace llamad::cuda {
namespace {

// A 16 x 16 block of distinct values, stored in rows of `kStride` (padded, as in the kernels).
constexpr int kStride = 24;
struct Block {
  std::array<uint16_t, 16 * kStride> v{};
  Block() {
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) v[r * kStride + c] = uint16_t(r * 16 + c);
  }
  uint16_t at(int r, int c) const { return v[r * kStride + c]; }
};

using Pair = std::pair<uint16_t, uint16_t>;  // a register: low half, high half
using Registers = std::array<std::array<Pair, 4>, 32>;

// ldmatrix.sync.aligned.m8n8.x4{.trans}.b16, each lane pointing at `offset(lane)`.
template <typename Offset>
Registers Ldmatrix(const Block& block, Offset offset, bool trans) {
  // Row j of matrix i comes from the address lane 8 i + j gives.
  int row_start[4][8];
  for (int lane = 0; lane < 32; ++lane) {
    const LaneOffset o = offset(lane);
    EXPECT_EQ(o.col % 8, 0) << "a row address must be 16-byte aligned (lane " << lane << ")";
    row_start[lane / 8][lane % 8] = o.row * kStride + o.col;
  }
  auto element = [&](int matrix, int r, int c) { return block.v[row_start[matrix][r] + c]; };
  Registers out;
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      out[lane][i] = trans ? Pair{element(i, 2 * t, g), element(i, 2 * t + 1, g)}
                           : Pair{element(i, g, 2 * t), element(i, g, 2 * t + 1)};
    }
  }
  return out;
}

TEST(LdmatrixLanes, ColumnMajorQuartersGiveTheAFragment) {
  const Block m;
  const Registers got = Ldmatrix(m, ColumnMajorQuarters, false);
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const Pair want[4] = {{m.at(g, 2 * t), m.at(g, 2 * t + 1)},
                          {m.at(g + 8, 2 * t), m.at(g + 8, 2 * t + 1)},
                          {m.at(g, 2 * t + 8), m.at(g, 2 * t + 9)},
                          {m.at(g + 8, 2 * t + 8), m.at(g + 8, 2 * t + 9)}};
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got[lane][i], want[i]) << "lane " << lane << " a" << i;
  }
}

// The B fragments mma.m16n8k16 takes for n-tiles 0 and 1 of a 16 x 16 B (element (k, n)
// from b(k, n)): registers 0, 1 for columns 0..7, then 2, 3 for columns 8..15.
template <typename ElementOfB>
void ExpectTwoBFragments(const Registers& got, ElementOfB b) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int tile = 0; tile < 2; ++tile) {
      const int n = tile * 8 + g;
      const Pair b0{b(2 * t, n), b(2 * t + 1, n)}, b1{b(2 * t + 8, n), b(2 * t + 9, n)};
      EXPECT_EQ(got[lane][2 * tile], b0) << "lane " << lane << " n-tile " << tile << " b0";
      EXPECT_EQ(got[lane][2 * tile + 1], b1) << "lane " << lane << " n-tile " << tile << " b1";
    }
  }
}

// Rows are the product's columns (K in Q K^T): B[k][n] = m[n][k].
TEST(LdmatrixLanes, RowMajorQuartersGiveTwoBFragmentsOfTransposedRows) {
  const Block m;
  ExpectTwoBFragments(Ldmatrix(m, RowMajorQuarters, false), [&](int k, int n) { return m.at(n, k); });
}

// Rows are the product's reduction (V in P V): B[k][n] = m[k][n], read with .trans.
TEST(LdmatrixLanes, TransposedColumnMajorQuartersGiveTwoBFragmentsOfColumns) {
  const Block m;
  ExpectTwoBFragments(Ldmatrix(m, ColumnMajorQuarters, true), [&](int k, int n) { return m.at(k, n); });
}

}  // namespace
}  // namespace llamad::cuda
