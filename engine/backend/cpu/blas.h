// Thin typed wrappers over CBLAS GEMM (row-major). OpenBLAS's OpenMP build runs a call
// single-threaded when it is made inside an OpenMP parallel region, so kernels may call
// these from their own parallel loops without oversubscribing the cores.
#pragma once

#include <cblas.h>

namespace llamad::cpu {

// c[m, n] = alpha * op(a)[m, k] . op(b)[k, n] + beta * c.
inline void Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a,
                 int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void Gemm(bool trans_a, bool trans_b, int m, int n, int k, double alpha, const double* a,
                 int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace llamad::cpu
