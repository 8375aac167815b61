// LLAMAD_HOST_DEVICE marks plain functions that CUDA kernels call too (nvcc compiles them
// for both sides); elsewhere it is empty.
#pragma once

#if defined(__CUDACC__)
#define LLAMAD_HOST_DEVICE __host__ __device__
#else
#define LLAMAD_HOST_DEVICE
#endif
