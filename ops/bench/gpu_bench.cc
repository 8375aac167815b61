// GPU benchmark of the CUDA backend: the device's two ceilings (device-to-device copy
// bandwidth, an 8192^3 bf16 GEMM), each kernel at the training step's shapes (TFLOP/s
// for matrix work, GB/s for the rest), causal flash attention at head dim 128 and seq
// 4096, and the training step of a model preset (tokens/s, MFU against the dense bf16
// peak, peak memory).
//
//   bench-gpu [--model 1b] [--batch 8] [--seq 2048] [--steps 5] [--warmup 2]
//             [--grad-checkpoint] [--offload-optimizer-host [--host-moments-bf16]]
//             [--json FILE] [--no-step] [--no-kernels] [--timeline]
//
// --timeline: after the timed steps, one more step traced through CUPTI: the GPU's busy
// and idle time within it, its kernels by total time, and its longest idle gaps with the
// host phase and the operations around each.
//
// Inputs are random (never zeros). Times are wall clock around a synchronized loop of
// repetitions after a warm-up; each figure is the median of five such loops.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "backend/cpu/blas_kernels.h"
#include "backend/cuda/cuda_backend.h"
#include "gpu_timeline.h"
#include "model/llama.h"
#include "train/optimizer.h"

namespace llamad {
namespace {

struct Options {
  std::string model = "1b";
  int batch = 8, seq = 2048, steps = 5, warmup = 2;
  std::string json;
  bool step = true, kernels = true, grad_checkpoint = false;
  bool offload_host = false;  // master weights and moments in host memory, AdamW on the CPU
  bool host_moments_bf16 = false;  // those moments as bf16 (offload.host_moments: bf16)
  bool timeline = false;      // one more step, traced through CUPTI (gpu_timeline.h)
};

// Median seconds per call of fn over five synchronized loops of `reps` calls.
double Time(Backend& be, const std::function<void()>& fn, int reps = 10) {
  fn();
  fn();
  be.Synchronize();
  std::vector<double> samples;
  for (int s = 0; s < 5; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) fn();
    be.Synchronize();
    samples.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  std::sort(samples.begin(), samples.end());
  return samples[2];
}

class Bench {
 public:
  // Each row is also written into out["kernels"] and saved at once (a later kernel that
  // aborts keeps the earlier rows).
  Bench(Backend& be, nlohmann::json& out, std::function<void()> save)
      : be_(be), out_(out), save_(std::move(save)) {}
  ~Bench() {
    for (void* p : buffers_) be_.Free(p);
  }
  void* Random(size_t n, double std = 1.0, DType type = DType::kBF16) {
    void* p = be_.Allocate(n, type);
    be_.FillNormal(p, n, std, 99, stream_++);
    buffers_.push_back(p);
    return p;
  }
  void FreeAll() {
    for (void* p : buffers_) be_.Free(p);
    buffers_.clear();
  }
  // Records one row: seconds, and TFLOP/s or GB/s from the work it represents.
  void Row(const std::string& kernel, const std::string& shape, double seconds, double flops,
           double bytes) {
    nlohmann::json r = {{"kernel", kernel}, {"shape", shape}, {"ms", seconds * 1e3}};
    if (flops > 0) r["tflops"] = flops / seconds / 1e12;
    if (bytes > 0) r["gbps"] = bytes / seconds / 1e9;
    std::printf("  %-28s %-34s %9.3f ms  %s\n", kernel.c_str(), shape.c_str(), seconds * 1e3,
                flops > 0 ? fmt::format("{:7.1f} TFLOP/s", flops / seconds / 1e12).c_str()
                          : fmt::format("{:7.0f} GB/s", bytes / seconds / 1e9).c_str());
    std::fflush(stdout);
    out_["kernels"].push_back(r);
    save_();
  }

 private:
  Backend& be_;
  nlohmann::json& out_;
  std::function<void()> save_;
  std::vector<void*> buffers_;
  uint64_t stream_ = 0;
};

std::string Shape(std::initializer_list<long long> dims) {
  std::string s;
  for (long long d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
  return s;
}

void Kernels(Backend& be, const ModelConfig& c, const Options& o, nlohmann::json& out,
             const std::function<void()>& save) {
  out["kernels"] = nlohmann::json::array();
  Bench b(be, out, save);
  std::printf("ceilings\n");
  {
    const size_t n = size_t(1) << 29;  // 1 GiB of bf16
    void* src = b.Random(n);
    void* dst = b.Random(n);
    b.Row("copy (device to device)", "1 GiB", Time(be, [&] { be.Copy(dst, src, n); }), 0, 2.0 * n * 2);
    b.FreeAll();
    const int m = 8192;
    void* x = b.Random(size_t(m) * m);
    void* w = b.Random(size_t(m) * m, 0.01);
    void* y = b.Random(size_t(m) * m);
    b.Row("gemm bf16 (cuBLASLt)", Shape({m, m, m}), Time(be, [&] { be.Linear(y, x, w, m, m, m, false); }),
          2.0 * m * double(m) * m, 0);
    b.FreeAll();
  }

  const int N = o.batch * o.seq, C = int(c.hidden_size), F = int(c.intermediate_size);
  const int QKV = int(c.qkv_dim()), V = int(c.vocab_size);
  std::printf("kernels at the %s step's shapes (%d tokens)\n", c.name.c_str(), N);
  const std::pair<const char*, std::pair<int, int>> linears[] = {
      {"linear qkv", {C, QKV}}, {"linear o", {C, C}}, {"linear gate_up", {C, 2 * F}}, {"linear down", {F, C}}};
  for (const auto& [name, dims] : linears) {
    const auto [in, outd] = dims;
    void* x = b.Random(size_t(N) * in);
    void* w = b.Random(size_t(outd) * in, 0.02);
    void* y = b.Random(size_t(N) * outd);
    void* dx = b.Random(size_t(N) * in);
    void* dw = b.Random(size_t(outd) * in, 1.0, DType::kF32);
    const double flops = 2.0 * N * double(in) * outd;
    b.Row(std::string(name) + " fwd", Shape({N, in, outd}),
          Time(be, [&] { be.Linear(y, x, w, N, in, outd, false); }), flops, 0);
    b.Row(std::string(name) + " bwd", Shape({N, in, outd}),
          Time(be, [&] { be.LinearBackward(dx, dw, y, x, w, N, in, outd, false); }), 2 * flops, 0);
    b.FreeAll();
  }
  {
    void* x = b.Random(size_t(N) * C);
    void* w = b.Random(C, 0.1);
    void* y = b.Random(size_t(N) * C);
    void* rstd = b.Random(N, 1.0, DType::kF32);
    void* dw = b.Random(C, 1.0, DType::kF32);
    be.RmsNorm(y, rstd, x, w, N, C, 1e-5);
    b.Row("rmsnorm fwd", Shape({N, C}), Time(be, [&] { be.RmsNorm(y, rstd, x, w, N, C, 1e-5); }), 0,
          4.0 * N * C);
    b.Row("rmsnorm bwd", Shape({N, C}),
          Time(be, [&] { be.RmsNormBackward(y, dw, x, x, w, rstd, N, C, true); }), 0, 8.0 * N * C);
    b.FreeAll();
  }
  {
    void* gu = b.Random(size_t(N) * 2 * F);
    void* h = b.Random(size_t(N) * F);
    void* dgu = b.Random(size_t(N) * 2 * F);
    b.Row("swiglu fwd", Shape({N, F}), Time(be, [&] { be.SwiGlu(h, gu, N, F); }), 0, 6.0 * N * F);
    b.Row("swiglu bwd", Shape({N, F}), Time(be, [&] { be.SwiGluBackward(dgu, h, gu, N, F); }), 0,
          10.0 * N * F);
    b.FreeAll();
  }
  {
    const AttentionShape s{o.batch, o.seq, int(c.num_attention_heads), int(c.num_key_value_heads),
                           int(c.head_dim())};
    void* qkv = b.Random(size_t(N) * s.row_stride());
    void* table = b.Random(size_t(o.seq) * s.head_dim, 1.0, DType::kF32);
    be.RopeTable(table, o.seq, s.head_dim, 10000.0);
    b.Row("rope", Shape({N, s.heads + s.kv_heads, s.head_dim}),
          Time(be, [&] { be.Rope(qkv, table, s, false); }), 0,
          4.0 * N * (s.heads + s.kv_heads) * s.head_dim);
    b.FreeAll();
  }
  // Causal attention: the step's own shape, and head dim 128 at seq 4096, on each
  // implementation (a backend of its own each).
  const AttentionShape attention_shapes[] = {
      {o.batch, o.seq, int(c.num_attention_heads), int(c.num_key_value_heads), int(c.head_dim())},
      {4, 4096, 16, 16, 128}};
  for (const auto& [impl, label] : {std::pair{CudaAttention::kCudnn, "cudnn"},
                                    std::pair{CudaAttention::kLlamad, "llamad"}}) {
    CudaBackendOptions options;
    options.attention = impl;
    auto impl_backend = MakeCudaBackend(options);
    if (!impl_backend.ok()) {
      std::printf("  attention (%s): not measured: %s\n", label,
                  std::string(impl_backend.status().message()).c_str());
      out["attention_unavailable"][label] = std::string(impl_backend.status().message());
      continue;
    }
    Backend& ab = **impl_backend;
    Bench bench(ab, out, save);
    for (const AttentionShape& s : attention_shapes) {
      const size_t rows = size_t(s.batch) * s.seq;
      void* qkv = bench.Random(rows * s.row_stride());
      void* o_ = bench.Random(rows * s.heads * s.head_dim);
      void* lse = bench.Random(size_t(s.batch) * s.heads * s.seq, 1.0, DType::kF32);
      void* dout = bench.Random(rows * s.heads * s.head_dim);
      void* dqkv = bench.Random(rows * s.row_stride());
      // Causal: half of the 4 * B * H * T^2 * D of the full product pair; backward 2.5x.
      const double fwd = 2.0 * s.batch * s.heads * double(s.seq) * s.seq * s.head_dim;
      const std::string shape = Shape({s.batch, s.seq, s.heads, s.kv_heads, s.head_dim});
      const std::string name = std::string("attention ") + label;
      ab.Attention(o_, lse, qkv, s, 64);  // the backward's inputs come from a forward
      const double tf = Time(ab, [&] { ab.Attention(o_, lse, qkv, s, 64); }, 5);
      bench.Row(name + " fwd", shape, tf, fwd, 0);
      const double tb = Time(ab, [&] { ab.AttentionBackward(dqkv, dout, o_, lse, qkv, s, 64); }, 5);
      bench.Row(name + " bwd", shape, tb, 2.5 * fwd, 0);
      bench.Row(name + " fwd+bwd", shape, tf + tb, 3.5 * fwd, 0);
      bench.FreeAll();
    }
  }
  {
    void* x = b.Random(size_t(N) * C);
    void* w = b.Random(size_t(V) * C, 0.02);
    void* dx = b.Random(size_t(N) * C);
    void* dw = b.Random(size_t(V) * C, 1.0, DType::kF32);
    std::vector<int32_t> targets(N);
    std::mt19937 rng(1);
    for (auto& t : targets) t = int32_t(rng() % V);
    b.Row("lm head + CE fwd+bwd", Shape({N, C, V}), Time(be, [&] {
            be.LmHeadCrossEntropy(x, w, targets.data(), N, C, V, 1.0 / N, dx, dw);
          }, 3),
          6.0 * N * double(C) * V, 0);
    b.FreeAll();
  }
  {
    const size_t n = size_t(256) << 20;
    void* p = b.Random(n, 0.02);
    void* master = b.Random(n, 0.02, DType::kF32);
    void* g = b.Random(n, 1.0, DType::kF32);
    void* m = b.Random(n, 0.0, DType::kF32);
    void* v = b.Random(n, 0.0, DType::kF32);
    be.Fill(m, n, 0.0);
    be.Fill(v, n, 0.0);
    AdamWStep s{1e-4, 0.9, 0.95, 1e-8, 0.1, 1, 1.0};
    b.Row("adamw (f32 master -> bf16)", Shape({static_cast<long long>(n)}),
          Time(be, [&] { be.AdamW(p, master, g, m, v, n, s); }, 5), 0, 30.0 * n);
    b.Row("grad norm (sum of squares)", Shape({static_cast<long long>(n)}), Time(be, [&] { be.SumSquares(g, n); }, 5),
          0, 4.0 * n);
    b.FreeAll();
  }
}

void TrainingStep(Backend& be, const ModelConfig& c, const Options& o, nlohmann::json& out,
                  const std::function<void()>& save) {
  be.ResetPeak();
  LlamaModel model(c, &be, {o.grad_checkpoint, 64});
  model.InitWeights(1);
  AdamWOptimizer optimizer(&model, &be, {});
  if (o.offload_host) {
    AdamWOptimizer::HostTier tier;
    tier.bf16_moments = o.host_moments_bf16;
    if (auto status = optimizer.OffloadToHost(tier); !status.ok()) {
      std::fprintf(stderr, "bench-gpu: %s\n", std::string(status.message()).c_str());
      std::exit(1);
    }
  }
  const int N = o.batch * o.seq;
  std::vector<int32_t> tokens(N), targets(N);
  std::mt19937 rng(7);
  std::vector<double> times, optimizer_times, losses;
  // Fresh random tokens for the next step, the device idle.
  auto next_batch = [&] {
    for (int i = 0; i < N; ++i) {
      tokens[i] = int32_t(rng() % c.vocab_size);
      targets[i] = int32_t(rng() % c.vocab_size);
    }
    be.Synchronize();
  };
  // One step on the batch: Trainer::Step's work (gradients, their norm, the clipped AdamW
  // update). Returns its seconds and the optimizer's; marks the timeline's host phases
  // when there is one.
  auto run_step = [&](GpuTimeline* timeline) {
    auto mark = [&](const char* phase) {
      if (timeline != nullptr) timeline->Mark(phase);
    };
    const auto t0 = std::chrono::steady_clock::now();
    mark("zero grads");
    model.ZeroGrads();
    mark("fwd+bwd");
    const double loss = model.ForwardBackward(tokens.data(), targets.data(), o.batch, o.seq, 1.0 / N) / N;
    mark("grad norm");
    const double norm = std::sqrt(be.SumSquares(model.grad_data(), model.num_params()));
    const auto t1 = std::chrono::steady_clock::now();
    mark("optimizer");
    if (auto status = optimizer.Step(3e-4, norm > 1.0 ? 1.0 / (norm + 1e-6) : 1.0); !status.ok()) {
      std::fprintf(stderr, "bench-gpu: optimizer step: %s\n", std::string(status.message()).c_str());
      std::exit(1);
    }
    be.Synchronize();
    const auto t2 = std::chrono::steady_clock::now();
    losses.push_back(loss);
    return std::pair{std::chrono::duration<double>(t2 - t0).count(), std::chrono::duration<double>(t2 - t1).count()};
  };
  for (int step = 0; step < o.warmup + o.steps; ++step) {
    next_batch();
    const auto [seconds, optimizer_seconds] = run_step(nullptr);
    if (step >= o.warmup) {
      times.push_back(seconds);
      optimizer_times.push_back(optimizer_seconds);
    }
  }
  std::sort(times.begin(), times.end());
  std::sort(optimizer_times.begin(), optimizer_times.end());
  const double median = times[times.size() / 2];
  const double optimizer_median = optimizer_times[optimizer_times.size() / 2];  // AdamW (and its copies)
  const double tokens_per_s = N / median;
  const double flops_per_token = c.TrainingFlopsPerToken(o.seq);
  const double tflops = tokens_per_s * flops_per_token / 1e12;
  const double peak = CudaPeakBf16Flops();
  out["step"] = {{"impl", "llamad"},
                 {"model", c.name},
                 {"params", c.NumParameters()},
                 {"batch", o.batch},
                 {"seq", o.seq},
                 {"grad_checkpoint", o.grad_checkpoint},
                 {"optimizer", o.offload_host ? (o.host_moments_bf16 ? "host-bf16" : "host") : "device"},
                 {"step_s", median},
                 {"optimizer_s", optimizer_median},
                 {"tokens_per_s", tokens_per_s},
                 {"flops_per_token", flops_per_token},
                 {"tflops", tflops},
                 {"mfu", peak > 0 ? tflops * 1e12 / peak : 0},
                 {"peak_tflops", peak / 1e12},
                 {"peak_mem_gib", double(be.peak_allocated_bytes()) / (1 << 30)},
                 {"loss_first", losses.front()},
                 {"loss_last", losses.back()}};
  std::printf("training step: %s (%.2fB parameters), batch %d x seq %d, bf16, %s%s\n"
              "  %.3f s/step (optimizer %.3f s)  %.0f tokens/s  %.1f TFLOP/s  MFU %.1f%% (of %.0f)  "
              "peak memory %.1f GiB  loss %.3f -> %.3f\n",
              c.name.c_str(), c.NumParameters() / 1e9, o.batch, o.seq,
              o.grad_checkpoint ? "activation checkpointing" : "no checkpointing",
              o.offload_host ? (o.host_moments_bf16 ? ", optimizer state in host memory, bf16 moments (AdamW on the CPU)"
                                                    : ", optimizer state in host memory (AdamW on the CPU)")
                             : "",
              median, optimizer_median, tokens_per_s, tflops,
              100 * tflops * 1e12 / peak, peak / 1e12, double(be.peak_allocated_bytes()) / (1 << 30),
              losses.front(), losses.back());
  if (!o.timeline) return;
  // One more step, traced: where the GPU sat idle within it, and what its kernels took.
  // The timed steps' figures are saved and printed first, whatever the tracing does.
  save();
  std::fflush(stdout);
  std::string why;
  next_batch();
  std::unique_ptr<GpuTimeline> timeline = GpuTimeline::Start(&why);
  if (timeline == nullptr) {
    std::printf("  GPU timeline: not recorded (%s)\n", why.c_str());
    out["timeline_error"] = why;
    return;
  }
  const double traced = run_step(timeline.get()).first;
  out["timeline"] = timeline->Stop();
  out["timeline"]["step_s"] = traced;
  std::printf("traced step (not among the timed ones): %.3f s\n", traced);
  PrintGpuActivitySummary(out["timeline"]);
}

int Main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench-gpu: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--model") o.model = next();
    else if (a == "--batch") o.batch = std::atoi(next().c_str());
    else if (a == "--seq") o.seq = std::atoi(next().c_str());
    else if (a == "--steps") o.steps = std::atoi(next().c_str());
    else if (a == "--warmup") o.warmup = std::atoi(next().c_str());
    else if (a == "--json") o.json = next();
    else if (a == "--no-step") o.step = false;
    else if (a == "--no-kernels") o.kernels = false;
    else if (a == "--grad-checkpoint") o.grad_checkpoint = true;
    else if (a == "--offload-optimizer-host") o.offload_host = true;
    else if (a == "--host-moments-bf16") o.host_moments_bf16 = true;
    else if (a == "--timeline") o.timeline = true;
    else {
      std::fprintf(stderr, "bench-gpu: unknown argument '%s'\n", a.c_str());
      return 2;
    }
  }
  if (o.batch <= 0 || o.seq <= 0 || o.steps <= 0 || o.warmup < 0) {
    std::fprintf(stderr, "bench-gpu: --batch, --seq and --steps must be positive\n");
    return 2;
  }
  if (o.host_moments_bf16 && !o.offload_host) {
    std::fprintf(stderr, "bench-gpu: --host-moments-bf16 is the type of the moments --offload-optimizer-host keeps\n");
    return 2;
  }
  auto config = LoadModelConfig(o.model);
  if (!config.ok()) {
    std::fprintf(stderr, "bench-gpu: --model: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  auto backend = MakeCudaBackend();
  if (!backend.ok()) {
    std::fprintf(stderr, "bench-gpu: %s\n", std::string(backend.status().message()).c_str());
    return 1;
  }
  // The model's FLOPs per token and the peak come first, and the file is rewritten after
  // each part, so that a part that fails leaves the others' numbers (and the PyTorch
  // baseline its inputs).
  nlohmann::json out = {{"device", CudaDeviceDescription()},
                        {"model", config->name},
                        {"flops_per_token", config->TrainingFlopsPerToken(o.seq)},
                        {"peak_tflops", CudaPeakBf16Flops() / 1e12}};
  // The step's attention (the default, kAuto): cuDNN's where it runs here.
  std::string why;
  out["step_attention"] = CudnnAttentionAvailable(0, &why) ? "cudnn" : "llamad (" + why + ")";
  auto save = [&] {
    if (!o.json.empty()) std::ofstream(o.json) << out.dump(1) << "\n";
  };
  save();
  std::printf("bench-gpu on %s\n", CudaDeviceDescription().c_str());
  if (o.kernels) Kernels(**backend, *config, o, out, save);
  if (o.step) TrainingStep(**backend, *config, o, out, save);
  save();
  return 0;
}

}  // namespace
}  // namespace llamad

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  return llamad::Main(argc, argv);
}
