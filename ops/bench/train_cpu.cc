// CPU training-step benchmark: trains a small LLaMA and prints tokens/s, achieved
// GFLOP/s (6N + causal attention per token) and, measured in the same run, OpenBLAS
// sgemm GFLOP/s at exactly the GEMM shapes of one training step; plus the peak memory
// with and without activation checkpointing.
//
//   bench-train-cpu [--hidden 512] [--layers 8] [--heads 8] [--kv-heads 8] [--ffn 1376]
//                   [--vocab 32000] [--seq 512] [--batch 4] [--steps 3] [--threads 0]
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "backend/cpu/blas.h"
#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "train/trainer.h"

namespace llamad {
namespace {

struct GemmShape {
  bool ta, tb;
  int m, n, k;
  auto operator<=>(const GemmShape&) const = default;
};

// Best-of-N seconds of one sgemm at a shape.
double TimeGemm(const GemmShape& s) {
  const size_t a_size = size_t(s.m) * s.k, b_size = size_t(s.k) * s.n;
  std::vector<float> a(a_size), b(b_size), c(size_t(s.m) * s.n);
  for (size_t i = 0; i < a_size; ++i) a[i] = float(RandomNormal(1, 0, i));
  for (size_t i = 0; i < b_size; ++i) b[i] = float(RandomNormal(1, 1, i));
  const int lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    const double t0 = omp_get_wtime();
    cpu::Gemm(s.ta, s.tb, s.m, s.n, s.k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f, c.data(), s.n);
    best = std::min(best, omp_get_wtime() - t0);
  }
  return best;
}

// The GEMMs of one training step (forward and backward) with their counts, as the
// engine issues them (fused q|k|v and gate|up; LM head in chunks).
std::map<GemmShape, int> StepGemms(const ModelConfig& c, int tokens, size_t lm_chunk_elements) {
  std::map<GemmShape, int> shapes;
  const int C = int(c.hidden_size), F = int(c.intermediate_size), QKV = int(c.qkv_dim());
  const int V = int(c.vocab_size), L = int(c.num_hidden_layers);
  auto linear = [&](int rows, int in, int out, int count) {
    shapes[{false, true, rows, out, in}] += count;   // y = x w^T
    shapes[{false, false, rows, in, out}] += count;  // dx = dy w
    shapes[{true, false, out, in, rows}] += count;   // dw = dy^T x
  };
  linear(tokens, C, QKV, L);
  linear(tokens, C, C, L);
  linear(tokens, C, 2 * F, L);
  linear(tokens, F, C, L);
  const int chunk = LmHeadChunkRows(lm_chunk_elements, V, tokens);
  for (int r0 = 0; r0 < tokens; r0 += chunk) linear(std::min(chunk, tokens - r0), C, V, 1);
  return shapes;
}

struct RunResult {
  double tokens_per_s = 0, gflops = 0;
  size_t peak_bytes = 0;
};

RunResult RunSteps(const JobSpec& spec, const TokenDataset& data, int steps) {
  auto backend = MakeCpuBackend({DType::kF32, 0});
  auto trainer = Trainer::Create(spec, backend.get(), 0);
  if (!trainer.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(trainer.status().message()).c_str());
    std::exit(2);
  }
  WindowSampler sampler(&data, int(spec.training.max_length), 1);
  double seconds = 0;
  for (int s = -1; s < steps; ++s) {  // step -1 warms up: allocations, page faults
    auto step = (*trainer)->Step(sampler);
    if (!step.ok()) {
      std::fprintf(stderr, "bench: %s\n", std::string(step.status().message()).c_str());
      std::exit(1);
    }
    if (s >= 0) seconds += step->step_seconds;
  }
  const double tokens = double(spec.training.batch_size) * spec.training.max_length * steps;
  RunResult r;
  r.tokens_per_s = tokens / seconds;
  r.gflops = r.tokens_per_s * spec.model.TrainingFlopsPerToken(spec.training.max_length) / 1e9;
  r.peak_bytes = backend->peak_allocated_bytes();
  return r;
}

int Main(int argc, char** argv) {
  std::map<std::string, long> opt = {{"hidden", 512}, {"layers", 8},    {"heads", 8},
                                     {"kv-heads", 8}, {"ffn", 1376},    {"vocab", 32000},
                                     {"seq", 512},    {"batch", 4},     {"steps", 3},
                                     {"threads", 0}};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    if (key.rfind("--", 0) != 0 || !opt.count(key.substr(2))) {
      std::fprintf(stderr, "bench: unknown option %s\n", argv[i]);
      return 2;
    }
    opt[key.substr(2)] = std::atol(argv[i + 1]);
  }
  if (opt["threads"] > 0) {
    omp_set_num_threads(int(opt["threads"]));
  }
  JobSpec spec;
  spec.path = "bench";
  ModelConfig& c = spec.model;
  c.name = "bench";
  c.hidden_size = opt["hidden"];
  c.intermediate_size = opt["ffn"];
  c.num_hidden_layers = opt["layers"];
  c.num_attention_heads = opt["heads"];
  c.num_key_value_heads = opt["kv-heads"];
  c.vocab_size = opt["vocab"];
  c.max_position_embeddings = opt["seq"];
  spec.training.max_length = opt["seq"];
  spec.training.batch_size = opt["batch"];
  spec.training.steps = 1000;
  spec.training.lr = 1e-4;
  if (auto s = ValidateJobSpec(spec); !s.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  const int steps = int(opt["steps"]);
  const int tokens = int(spec.training.batch_size * spec.training.max_length);
  std::vector<int32_t> ids(size_t(tokens) * (steps + 2) + 1);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(RandomBits(5, 0, i) % uint64_t(c.vocab_size));
  const TokenDataset data = TokenDataset::FromTokens(std::move(ids));

  std::printf("model: hidden %ld, layers %ld, heads %ld/%ld kv, ffn %ld, vocab %ld; %.1fM parameters\n",
              opt["hidden"], opt["layers"], opt["heads"], opt["kv-heads"], opt["ffn"], opt["vocab"],
              c.NumParameters() / 1e6);
  std::printf("step: batch %ld x seq %ld = %d tokens; %d threads; OpenBLAS %s kernels\n", opt["batch"],
              opt["seq"], tokens, CpuThreads(), BlasCoreName());

  // sgemm at the step's own shapes, FLOP-weighted.
  double gemm_flops = 0, gemm_seconds = 0;
  for (const auto& [shape, count] : StepGemms(c, tokens, CpuBackendOptions{}.lm_head_chunk_elements)) {
    gemm_flops += 2.0 * shape.m * shape.n * shape.k * count;
    gemm_seconds += TimeGemm(shape) * count;
  }
  const double sgemm_gflops = gemm_flops / gemm_seconds / 1e9;

  spec.training.grad_checkpoint = false;
  const RunResult plain = RunSteps(spec, data, steps);
  spec.training.grad_checkpoint = true;
  const RunResult ckpt = RunSteps(spec, data, steps);

  std::printf("\n%-34s %12s %14s %14s %12s\n", "", "tokens/s", "model GFLOP/s", "% of sgemm", "peak memory");
  std::printf("%-34s %12s %14.1f %14s %12s\n", "OpenBLAS sgemm at the step's shapes", "", sgemm_gflops, "100.0", "");
  auto row = [&](const char* name, const RunResult& r) {
    std::printf("%-34s %12.0f %14.1f %14.1f %9.1f MiB\n", name, r.tokens_per_s, r.gflops,
                100 * r.gflops / sgemm_gflops, r.peak_bytes / 1048576.0);
  };
  row("training step", plain);
  row("training step, checkpointing (-g)", ckpt);
  std::printf("\n{\"sgemm_gflops\": %.2f, \"tokens_per_s\": %.1f, \"gflops\": %.2f, \"fraction_of_sgemm\": %.4f, "
              "\"peak_bytes\": %zu, \"ckpt_tokens_per_s\": %.1f, \"ckpt_gflops\": %.2f, \"ckpt_peak_bytes\": %zu}\n",
              sgemm_gflops, plain.tokens_per_s, plain.gflops, plain.gflops / sgemm_gflops, plain.peak_bytes,
              ckpt.tokens_per_s, ckpt.gflops, ckpt.peak_bytes);
  return 0;
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
