// Blocked (flash-style) causal attention with grouped-query heads on the CPU.
// See Backend::Attention for the contract. Instantiated for float and double.
#pragma once

#include "backend/backend.h"

namespace llamad::cpu {

template <typename T>
void AttentionForward(T* out, T* lse, const T* qkv, const AttentionShape& shape, int block);

template <typename T>
void AttentionBackward(T* dqkv, const T* dout, const T* out, const T* lse, const T* qkv,
                       const AttentionShape& shape, int block);

}  // namespace llamad::cpu
