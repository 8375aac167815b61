// Causal grouped-query attention through cuDNN's fused SDPA kernels (the cuDNN frontend's
// graph API), the CUDA backend's alternative to its own flash kernels (attention.cu)
// where cuDNN is installed and faster. Same layouts and the same log-sum-exp as
// attention.cu, so either implementation's forward pairs with the other's backward.
//
// cuDNN is loaded at run time (dlopen of libcudnn_graph.so.9): a binary built with this
// path runs where cuDNN is absent, and falls back to the own kernels there.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>

#include "backend/cuda/attention_args.h"

namespace llamad::cuda {

class CudnnAttention {
 public:
  // Whether this build has the cuDNN path at all (the frontend headers were present).
  static bool Built();
  // Loads cuDNN and makes a handle on `stream`; null, with the reason in `why`, when
  // cuDNN cannot be loaded or is older than the fused attention needs.
  static std::unique_ptr<CudnnAttention> Create(cudaStream_t stream, std::string* why);
  virtual ~CudnnAttention() = default;

  // The cuDNN version in use, e.g. "9.19.0".
  virtual std::string Version() const = 0;
  // Device memory of the workspace held now (grown to the largest graph run so far).
  virtual size_t workspace_bytes() const = 0;

  // Each returns false, with the reason, when cuDNN has no engine for the shape (the
  // caller then runs its own kernel); nothing has been written in that case. Pointers
  // are device memory, laid out as in attention.cu: qkv [B, T, (H + 2 Hkv) D], out and
  // dout [B, T, H D], lse [B, H, T] f32 in natural-log units.
  virtual bool Forward(void* out, float* lse, const void* qkv, const AttentionArgs& a,
                       std::string* why) = 0;
  virtual bool Backward(void* dqkv, const void* dout, const void* out, const float* lse,
                        const void* qkv, const AttentionArgs& a, std::string* why) = 0;
};

}  // namespace llamad::cuda
