// The shape of one attention call, shared by the backend's two attention
// implementations (attention.cu and cudnn_attention.cc).
#pragma once

namespace llamad::cuda {

struct AttentionArgs {
  int batch, seq, heads, kv_heads, head_dim;
};

}  // namespace llamad::cuda
