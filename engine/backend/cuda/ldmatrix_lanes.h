// Which shared-memory row each lane hands `ldmatrix.x4` so that the four registers it gets
// back are the operand fragments `mma.m16n8k16` wants. Plain C++ (no CUDA headers), so a
// host test can check these offsets against the two instructions' documented layouts.
//
// ldmatrix.x4 loads four 8x8 matrices of 16-bit elements: lane l gives the address of
// row l % 8 of matrix l / 8 (16 bytes), and receives matrix i in register i as the two
// elements (l / 4, 2 (l % 4) + {0, 1}); with .trans, as (2 (l % 4) + {0, 1}, l / 4).
#pragma once

#include "core/host_device.h"

namespace llamad::cuda {

// A lane's row and column offset from the top-left corner of a 16 x 16 block.
struct LaneOffset {
  int row, col;
};

// The block's quarters in the order top-left, bottom-left, top-right, bottom-right.
// Read as is, they are an A fragment (a0..a3). Read with .trans from a block whose rows
// are the product's reduction (V in P V), they are the B fragments (b0, b1) of the
// block's left 8 columns, then those of its right 8 columns.
LLAMAD_HOST_DEVICE constexpr LaneOffset ColumnMajorQuarters(int lane) {
  return {lane % 8 + (lane / 8) % 2 * 8, lane / 16 * 8};
}

// The block's quarters in the order top-left, top-right, bottom-left, bottom-right. Read
// as is from a block whose rows are the product's columns (K in Q K^T), they are the B
// fragments (b0, b1) of the block's top 8 rows, then those of its bottom 8 rows.
LLAMAD_HOST_DEVICE constexpr LaneOffset RowMajorQuarters(int lane) {
  return {lane % 8 + lane / 16 * 8, (lane / 8) % 2 * 8};
}

}  // namespace llamad::cuda
