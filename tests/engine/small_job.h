// A small model and a learnable token stream, for in-process training tests.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/rng.h"
#include "train/jobspec.h"

namespace llamad::testing {

// `n` token ids below `vocab` with a learnable pattern (the same for every test).
inline std::vector<int32_t> Tokens(size_t n, int vocab) {
  std::vector<int32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = int32_t((i * 7 + i / 13 + RandomBits(1, 0, i) % 3) % vocab);
  return t;
}

// A 2-layer model with vocabulary 40, trained 2 x 2 sequences of 16 per step.
inline JobSpec SmallJob(int64_t steps, const std::string& name = "resume", int64_t warmup_steps = 3) {
  JobSpec spec;
  spec.path = "test";
  spec.name = name;
  spec.model.hidden_size = 32;
  spec.model.intermediate_size = 48;
  spec.model.num_hidden_layers = 2;
  spec.model.num_attention_heads = 4;
  spec.model.num_key_value_heads = 2;
  spec.model.vocab_size = 40;
  spec.model.max_position_embeddings = 64;
  spec.training.max_length = 16;
  spec.training.batch_size = 2;
  spec.training.global_batch_size = 4;
  spec.training.steps = steps;
  spec.training.lr = 3e-3;
  spec.training.warmup_steps = warmup_steps;
  return spec;
}

}  // namespace llamad::testing
