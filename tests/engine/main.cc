// Test entry point: the engine's tests run on the same OpenBLAS kernels as llama-train.
#include <gtest/gtest.h>

#include "backend/cpu/blas_kernels.h"

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
