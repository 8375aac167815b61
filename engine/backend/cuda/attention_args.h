// The shape of one attention call, shared by the backend's two attention
// implementations (attention.cu and cudnn_attention.cc).
#pragma once

namespace llamad::cuda {

struct AttentionArgs {
  int batch, seq, heads, kv_heads, head_dim;
  // The own backward kernels' cp.async stages: 0 as many as the GPU's shared memory
  // holds (two, or one at head dim 128 on GPUs with 99 KiB a block), else 1 or 2.
  int backward_stages = 0;
};

}  // namespace llamad::cuda
