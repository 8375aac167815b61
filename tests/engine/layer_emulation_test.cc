// The CUDA backend's own kernels other than attention (backend/cuda/layer_kernels.cuh),
// run through their launch code on the CPU emulator (cuda_emulator.h) against the
// float64 CPU backend, with the warps of a block in step and far apart. This checks the
// kernels' indexing, vector widths, block reductions and barriers, shared-memory sizes and
// launch shapes where no GPU is present; their speed, and the GPU's own arithmetic, are
// for the `gpu` tests (cuda_test.cc), whose shapes these follow.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/emulated_gpu.h"

// The kernels call the emulator's intrinsics, so they come after it.
#include "backend/cuda/layer_kernels.cuh"
#include "backend/cpu/cpu_backend.h"

namespace llamad {
namespace {

using cuda::bf16;
using cuda::emulator::Turns;
using testing::Emulate;
using testing::Guarded;
using testing::OnDevice;
using testing::Poisoned;
using testing::RelError;
using testing::RelIncrementError;
using testing::RoundBf16;
using testing::Values;
using Vec = std::vector<double>;

// Bounds on the relative error against float64. bf16 outputs: one rounding to nearest of
// an f32 result, about 1.7e-3 (RMS) measured; a store that truncates gives about 3.3e-3.
// f32 outputs of exact inputs: the f32 arithmetic alone.
constexpr double kBf16Out = 2.5e-3;
constexpr double kF32Out = 1e-5;
// An element of a bf16 output: rounding to nearest is off by at most 2^-8 of the element
// (truncating, by up to 2^-7), the f32 arithmetic by far less.
constexpr double kBf16Element = 1.0 / 256;

// Most of a row's dlogits are softmax probabilities near 1/vocab, far below the row's
// target: a floor from the RMS, which the targets set, would hide large errors in them.
// The f32 softmax is off by a few 2^-24 of the scale; 1e-4 of it covers that.
double DlogitsFloor(float scale) { return 1e-4 * scale; }

// Softmax cross-entropy of rows of logits in float64: each row's loss, and its gradient
// (softmax - onehot) * scale. Rows whose target is negative get 0 and zeros.
struct CrossEntropyReference {
  Vec loss, dlogits;
};
CrossEntropyReference SoftmaxCrossEntropy(const Vec& logits, const std::vector<int32_t>& targets, int vocab,
                                          double scale) {
  CrossEntropyReference ref{Vec(targets.size(), 0.0), Vec(logits.size(), 0.0)};
  for (size_t r = 0; r < targets.size(); ++r) {
    if (targets[r] < 0) continue;
    const double* l = &logits[r * vocab];
    const double max = *std::max_element(l, l + vocab);
    double sum = 0;
    for (int c = 0; c < vocab; ++c) sum += std::exp(l[c] - max);
    const double lse = max + std::log(sum);
    ref.loss[r] = lse - l[targets[r]];
    for (int c = 0; c < vocab; ++c) {
      ref.dlogits[r * vocab + c] = (std::exp(l[c] - lse) - (c == targets[r] ? 1.0 : 0.0)) * scale;
    }
  }
  return ref;
}

class LayerEmulationTest : public testing::SeededTest<::testing::TestWithParam<Turns>> {
 protected:
  std::vector<int32_t> RandomIds(int n, int below) {
    std::uniform_int_distribution<int32_t> id(0, below - 1);
    std::vector<int32_t> ids(n);
    for (auto& t : ids) t = id(rng_);
    return ids;
  }

  // `values` in a CPU backend buffer, and back.
  void* Cpu(const Vec& values) { return cpu_buffers_.Upload(values); }
  Vec Cpu(const void* buffer, size_t n) { return cpu_buffers_.Download(buffer, n); }

  static void ExpectError(const std::string& what, double error, double bound) {
    EXPECT_LE(error, bound) << what;
    std::printf("%s: relative error %.2e\n", what.c_str(), error);
  }
  void ExpectClose(const std::string& what, const Vec& emulated, const Vec& reference, double bound) {
    ExpectError(what, RelError(emulated, reference), bound);
  }
  // Outputs computed element by element in f32 and rounded once to bf16: within kBf16Out
  // overall, and every element within kBf16Element of its reference relative to it plus
  // `floor`, which absorbs the f32 arithmetic's error on elements near zero (by default
  // the reference's RMS). The second catches a wrong element or two that the first dilutes.
  void ExpectBf16Close(const std::string& what, const Vec& emulated, const Vec& reference,
                       std::optional<double> floor = std::nullopt) {
    ExpectClose(what, emulated, reference, kBf16Out);
    if (!floor) {
      double squares = 0;
      for (double r : reference) squares += r * r;
      floor = std::sqrt(squares / double(std::max<size_t>(reference.size(), 1)));
    }
    size_t worst = 0;
    double worst_ratio = 0;
    for (size_t i = 0; i < reference.size(); ++i) {
      const double ratio = std::abs(emulated[i] - reference[i]) / (std::abs(reference[i]) + *floor);
      if (ratio > worst_ratio || std::isnan(ratio)) {
        worst = i;
        worst_ratio = ratio;
        if (std::isnan(ratio)) break;
      }
    }
    EXPECT_LE(worst_ratio, kBf16Element) << what << ": element " << worst << " is " << emulated[worst]
                                         << ", not " << reference[worst];
    std::printf("%s: worst element off by %.2e\n", what.c_str(), worst_ratio);
  }
  // For accumulated outputs: what each side added to `before`.
  void ExpectIncrementClose(const std::string& what, const Vec& emulated, const Vec& reference, const Vec& before,
                            double bound) {
    ExpectError(what + " (increment)", RelIncrementError(emulated, reference, before), bound);
  }

  std::unique_ptr<Backend> cpu_ = MakeCpuBackend({DType::kF64, 2});
  testing::CpuBuffers cpu_buffers_{*cpu_};
  cuda::emulator::Emulator emulator_{{.turns = GetParam()}};
  testing::EmulatedGpu gpu_{emulator_};
};

// Casts, fills, scaling and adds are one float operation and one rounding each: exact.
// n makes the grid-stride kernels' last block partial and SumSquares' 1024 blocks loop
// (GridStrideKernelsLoopPastTheirGrid makes the others loop).
TEST_P(LayerEmulationTest, MemoryOps) {
  const size_t n = 300007;
  // f32 values that bf16 cannot hold, so that the cast rounds.
  Vec values(n);
  std::normal_distribution<double> draw(0.0, 3.0);
  for (double& x : values) x = float(draw(rng_));
  Guarded<float> f = OnDevice<float>(values), back = Poisoned<float>(n);
  Guarded<bf16> b = Poisoned<bf16>(n);
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::Convert(gpu_, b.data(), static_cast<const float*>(f.data()), n);
    cuda::layers::Convert(gpu_, back.data(), static_cast<const bf16*>(b.data()), n);
    cuda::layers::Scale(gpu_, f.data(), n, -0.5f);
    cuda::layers::Scale(gpu_, b.data(), n, 0.37f);
  }));
  const Vec bv = Values(b), backv = Values(back), fv = Values(f);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(backv[i], RoundBf16(values[i])) << i;
    ASSERT_EQ(bv[i], RoundBf16(float(backv[i]) * 0.37f)) << i;
    ASSERT_EQ(fv[i], -0.5 * values[i]) << i;
  }

  Guarded<double> partial = Poisoned<double>(cuda::layers::kSumBlocks);
  for (const bool bf16_input : {false, true}) {
    ASSERT_TRUE(Emulate([&] {
      if (bf16_input) {
        cuda::layers::SumSquaresPartials(gpu_, partial.data(), static_cast<const bf16*>(b.data()), n);
      } else {
        cuda::layers::SumSquaresPartials(gpu_, partial.data(), static_cast<const float*>(f.data()), n);
      }
    }));
    double sum = 0, reference = 0;
    for (double p : Values(partial)) sum += p;
    for (double x : bf16_input ? bv : fv) reference += x * x;
    EXPECT_NEAR(sum, reference, 1e-12 * reference) << (bf16_input ? "bf16" : "f32");
  }

  // y += x and fills in either element type, rounded to it.
  const Vec y0 = Random(n), x0 = Random(n);
  Guarded<float> yf = OnDevice<float>(y0), xf = OnDevice<float>(x0), ff = Poisoned<float>(n);
  Guarded<bf16> yb = OnDevice<bf16>(y0), xb = OnDevice<bf16>(x0), fb = Poisoned<bf16>(n);
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::Add(gpu_, yf.data(), static_cast<const float*>(xf.data()), n);
    cuda::layers::Add(gpu_, yb.data(), static_cast<const bf16*>(xb.data()), n);
    cuda::layers::Fill(gpu_, ff.data(), n, 0.3f);
    cuda::layers::Fill(gpu_, fb.data(), n, 0.3f);
  }));
  const Vec sf = Values(yf), sb = Values(yb), filled_f = Values(ff), filled_b = Values(fb);
  for (size_t i = 0; i < n; ++i) {
    const float exact = float(y0[i]) + float(x0[i]);
    ASSERT_EQ(sf[i], double(exact)) << i;
    ASSERT_EQ(sb[i], RoundBf16(exact)) << i;
    ASSERT_EQ(filled_f[i], double(0.3f)) << i;
    ASSERT_EQ(filled_b[i], RoundBf16(0.3f)) << i;
  }

  // The CPU backend's counter-based normals, from an element past the first.
  Guarded<float> normal = Poisoned<float>(n);
  Guarded<bf16> normal_b = Poisoned<bf16>(n);
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::FillNormal(gpu_, normal.data(), n, 0.02, 7, 3, 1000);
    cuda::layers::FillNormal(gpu_, normal_b.data(), n, 0.02, 7, 3, 1000);
  }));
  void* reference = Cpu(Vec(n, 0.0));
  cpu_->FillNormal(reference, n, 0.02, 7, 3, 1000);
  // The same host arithmetic as the CPU backend's (core/rng.h), so the same bits once
  // rounded to the buffer's type.
  const Vec drawn = Cpu(reference, n), drawn_f = Values(normal), drawn_b = Values(normal_b);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(drawn_f[i], double(float(drawn[i]))) << i;
    ASSERT_EQ(drawn_b[i], RoundBf16(drawn[i])) << i;
  }
}

TEST_P(LayerEmulationTest, Embedding) {
  const int vocab = 50, dim = 200, n = 300;  // many repeated tokens; rows wider than a block
  const std::vector<int32_t> tokens = RandomIds(n, vocab);
  const Vec table = Random(vocab * dim), dout = Random(n * dim), dtable0 = Random(vocab * dim);
  Guarded<bf16> table_d = OnDevice<bf16>(table), out = Poisoned<bf16>(n * dim), dout_d = OnDevice<bf16>(dout);
  Guarded<float> dtable = OnDevice<float>(dtable0);
  const cuda::layers::TokenGroups groups = cuda::layers::GroupRowsByToken(tokens.data(), n);
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::Embedding(gpu_, out.data(), tokens.data(), static_cast<const bf16*>(table_d.data()), n, dim);
    cuda::layers::EmbeddingBackward(gpu_, dtable.data(), static_cast<const bf16*>(dout_d.data()),
                                    groups.packed.data(), groups.distinct, dim);
  }));
  void* out_c = Cpu(Vec(n * dim, 0.0));
  void* dtable_c = Cpu(dtable0);
  cpu_->Embedding(out_c, tokens.data(), Cpu(table), n, dim);
  cpu_->EmbeddingBackward(dtable_c, Cpu(dout), tokens.data(), n, dim);
  EXPECT_EQ(Values(out), Cpu(out_c, n * dim));  // a gather is exact
  ExpectIncrementClose("dtable", Values(dtable), Cpu(dtable_c, vocab * dim), dtable0, 1e-6);
}

// Widths that a multiple of 8 lets the kernels read 16 bytes at a time and one that does
// not; and, with 16-byte reads, twice as many rows as the backward's 512 blocks, so that
// every block sums two rows' dw, each wider than a block's threads.
TEST_P(LayerEmulationTest, RmsNorm) {
  struct Shape {
    int n, dim;
  };
  for (const Shape s : {Shape{33, 1000}, Shape{33, 999}, Shape{1024, 304}}) {
    const std::string at = fmt::format("n {} dim {}: ", s.n, s.dim);
    const size_t size = size_t(s.n) * s.dim;
    const Vec x = Random(size, 2.0), w = Random(s.dim, 0.1, 1.0);
    Guarded<bf16> x_d = OnDevice<bf16>(x), w_d = OnDevice<bf16>(w), out = Poisoned<bf16>(size);
    Guarded<float> rstd = Poisoned<float>(s.n);
    ASSERT_TRUE(Emulate([&] {
      cuda::layers::RmsNorm(gpu_, out.data(), rstd.data(), x_d.data(), w_d.data(), s.n, s.dim, 1e-5f);
    })) << at;
    void* out_c = Cpu(Vec(size, 0.0));
    void* rstd_c = Cpu(Vec(s.n, 0.0));
    cpu_->RmsNorm(out_c, rstd_c, Cpu(x), Cpu(w), s.n, s.dim, 1e-5);
    ExpectBf16Close(at + "out", Values(out), Cpu(out_c, size));
    ExpectClose(at + "rstd", Values(rstd), Cpu(rstd_c, s.n), 1e-6);

    // The backward from the same rstd on both sides, into dx and then added to it, and
    // added to dw. dout leans on x, so that dx's term in mean(dout * w * x), summed over
    // the block, weighs as much as the other.
    const Vec rstd_v = Values(rstd), noise = Random(size), dx0 = Random(size), dw0 = Random(s.dim);
    Vec dout(size);
    for (size_t i = 0; i < size; ++i) dout[i] = RoundBf16(0.5 * x[i] + noise[i]);
    Guarded<bf16> dout_d = OnDevice<bf16>(dout);
    Guarded<float> dw = OnDevice<float>(dw0);
    Guarded<float> partial = Poisoned<float>(size_t(cuda::layers::RmsNormBackwardBlocks(s.n)) * s.dim);
    void* dw_c = Cpu(dw0);
    for (const bool accumulate : {false, true}) {
      const std::string what = at + (accumulate ? "dx accumulated" : "dx");
      Guarded<bf16> dx = accumulate ? OnDevice<bf16>(dx0) : Poisoned<bf16>(size);
      const Vec dw_before = Values(dw);
      ASSERT_TRUE(Emulate([&] {
        cuda::layers::RmsNormBackward(gpu_, dx.data(), dw.data(), partial.data(), dout_d.data(), x_d.data(),
                                      w_d.data(), rstd.data(), s.n, s.dim, accumulate);
      })) << what;
      void* dx_c = Cpu(accumulate ? dx0 : Vec(size, 0.0));
      cpu_->RmsNormBackward(dx_c, dw_c, Cpu(dout), Cpu(x), Cpu(w), Cpu(rstd_v), s.n, s.dim, accumulate);
      ExpectBf16Close(what, Values(dx), Cpu(dx_c, size));
      ExpectIncrementClose(at + "dw", Values(dw), Cpu(dw_c, s.dim), dw_before, kF32Out);
    }
  }
}

// Each rotation from the same input on both sides. theta 100 turns even the last
// frequencies of the last positions by a visible angle.
TEST_P(LayerEmulationTest, Rope) {
  // Head dim 64 rotates column pairs at once; 34 (odd half) one column at a time.
  for (const AttentionShape& s : {AttentionShape{2, 37, 4, 2, 64}, AttentionShape{1, 9, 2, 1, 34}}) {
    for (const double theta : {10000.0, 100.0}) {
      const std::string at = fmt::format("head_dim {} theta {}: ", s.head_dim, theta);
      const size_t table_size = size_t(s.seq) * s.head_dim, size = size_t(s.batch) * s.seq * s.row_stride();
      Guarded<float> table = Poisoned<float>(table_size);
      ASSERT_TRUE(Emulate([&] { cuda::layers::RopeTable(gpu_, table.data(), s.seq, s.head_dim, theta); })) << at;
      void* table_c = Cpu(Vec(table_size, 0.0));
      cpu_->RopeTable(table_c, s.seq, s.head_dim, theta);
      ExpectClose(at + "table", Values(table), Cpu(table_c, table_size), 1e-7);

      Guarded<bf16> qkv = OnDevice<bf16>(Random(size));
      for (const bool inverse : {false, true}) {
        void* qkv_c = Cpu(Values(qkv));
        ASSERT_TRUE(Emulate([&] { cuda::layers::Rope(gpu_, qkv.data(), table.data(), s, inverse); })) << at;
        cpu_->Rope(qkv_c, table_c, s, inverse);
        const std::string what = at + (inverse ? "inverse" : "forward");
        ExpectBf16Close(what, Values(qkv), Cpu(qkv_c, size));
      }
    }
  }
}

TEST_P(LayerEmulationTest, SwiGlu) {
  for (const int ffn : {176, 175}) {
    const std::string at = fmt::format("ffn {}: ", ffn);
    const int n = 45;
    const Vec gate_up = Random(size_t(n) * 2 * ffn, 2.0), dh = Random(size_t(n) * ffn);
    Guarded<bf16> gate_up_d = OnDevice<bf16>(gate_up), dh_d = OnDevice<bf16>(dh);
    Guarded<bf16> h = Poisoned<bf16>(size_t(n) * ffn), dgate_up = Poisoned<bf16>(gate_up.size());
    ASSERT_TRUE(Emulate([&] {
      cuda::layers::SwiGlu(gpu_, h.data(), gate_up_d.data(), n, ffn);
      cuda::layers::SwiGluBackward(gpu_, dgate_up.data(), dh_d.data(), gate_up_d.data(), n, ffn);
    })) << at;
    void* gate_up_c = Cpu(gate_up);
    void* h_c = Cpu(Vec(h.size(), 0.0));
    void* dgate_up_c = Cpu(Vec(gate_up.size(), 0.0));
    cpu_->SwiGlu(h_c, gate_up_c, n, ffn);
    cpu_->SwiGluBackward(dgate_up_c, Cpu(dh), gate_up_c, n, ffn);
    ExpectBf16Close(at + "h", Values(h), Cpu(h_c, h.size()));
    ExpectBf16Close(at + "dgate_up", Values(dgate_up), Cpu(dgate_up_c, gate_up.size()));
  }
}

// The kernel sees f32 logits, as cuBLASLt leaves them; here they are x . w^T in float64
// rounded to float, and its bf16 gradient goes through the same products in float64.
// Against the CPU backend's fused LM head: the loss, dx and dw.
TEST_P(LayerEmulationTest, CrossEntropy) {
  const int n = 70, dim = 128, vocab = 1000;
  const Vec x = Random(n * dim), w = Random(vocab * dim, 0.2);
  std::vector<int32_t> targets = RandomIds(n, vocab);
  for (int i = 3; i < n; i += 7) targets[i] = -1;  // ignored rows
  Vec logits_v(size_t(n) * vocab);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < vocab; ++c) {
      double dot = 0;
      for (int k = 0; k < dim; ++k) dot += x[size_t(r) * dim + k] * w[size_t(c) * dim + k];
      logits_v[size_t(r) * vocab + c] = dot;
    }
  }
  const float scale = 0.37f;
  Guarded<float> logits = OnDevice<float>(logits_v), losses = Poisoned<float>(n), forward_losses = Poisoned<float>(n);
  Guarded<bf16> dlogits = Poisoned<bf16>(logits_v.size());
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::CrossEntropy(gpu_, losses.data(), dlogits.data(), logits.data(), targets.data(), n, vocab, scale);
    cuda::layers::CrossEntropy(gpu_, forward_losses.data(), static_cast<bf16*>(nullptr), logits.data(),
                               targets.data(), n, vocab, 1.f);
  }));
  const Vec loss_rows = Values(losses), g = Values(dlogits);
  EXPECT_EQ(Values(forward_losses), loss_rows) << "the loss without the gradient";
  // Each row's loss and gradient against float64 from the same (f32) logits.
  const CrossEntropyReference ref = SoftmaxCrossEntropy(Values(logits), targets, vocab, scale);
  ExpectClose("losses", loss_rows, ref.loss, 1e-6);
  ExpectBf16Close("dlogits", g, ref.dlogits, DlogitsFloor(scale));
  double loss = 0;
  for (int r = 0; r < n; ++r) {
    if (targets[r] < 0) EXPECT_EQ(loss_rows[r], 0.0) << "ignored row " << r;
    loss += loss_rows[r];
  }
  Vec dx(size_t(n) * dim, 0.0), dw(size_t(vocab) * dim, 0.0);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < vocab; ++c) {
      const double d = g[size_t(r) * vocab + c];
      for (int k = 0; k < dim; ++k) {
        dx[size_t(r) * dim + k] += d * w[size_t(c) * dim + k];
        dw[size_t(c) * dim + k] += d * x[size_t(r) * dim + k];
      }
    }
  }
  void* dx_c = Cpu(Vec(dx.size(), 0.0));
  void* dw_c = Cpu(Vec(dw.size(), 0.0));
  const double reference = cpu_->LmHeadCrossEntropy(Cpu(x), Cpu(w), targets.data(), n, dim, vocab, scale, dx_c, dw_c);
  EXPECT_NEAR(loss, reference, 1e-6 * reference);
  std::printf("loss %.6f against %.6f\n", loss, reference);
  // dlogits is rounded to bf16: its roundings dominate.
  ExpectClose("dx", dx, Cpu(dx_c, dx.size()), kBf16Out);
  ExpectClose("dw", dw, Cpu(dw_c, dw.size()), kBf16Out);
}

// Rows whose largest logit is 100 above the rest, in the columns of each warp in turn:
// exp overflows float unless every row is shifted by its own maximum, over all warps.
// Against log-sum-exp and softmax in float64.
TEST_P(LayerEmulationTest, CrossEntropyOfRowsWithOneLargeLogit) {
  const int rows = 16, vocab = 1000;  // CrossEntropy's blocks have 16 warps
  Vec logits_v(size_t(rows) * vocab);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (double& l : logits_v) l = float(normal(rng_));
  std::vector<int32_t> targets(rows);
  for (int r = 0; r < rows; ++r) {
    const int large = 32 * r + 7;  // a column of warp r
    logits_v[size_t(r) * vocab + large] += 100.0;
    targets[r] = r % 2 == 0 ? large : large + 1;
  }
  const float scale = 0.5f;
  Guarded<float> logits = OnDevice<float>(logits_v), losses = Poisoned<float>(rows);
  Guarded<bf16> dlogits = Poisoned<bf16>(logits_v.size());
  ASSERT_TRUE(Emulate([&] {
    cuda::layers::CrossEntropy(gpu_, losses.data(), dlogits.data(), logits.data(), targets.data(), rows, vocab,
                               scale);
  }));
  const CrossEntropyReference ref = SoftmaxCrossEntropy(Values(logits), targets, vocab, scale);
  ExpectClose("loss", Values(losses), ref.loss, 1e-6);
  ExpectBf16Close("dlogits", Values(dlogits), ref.dlogits, DlogitsFloor(scale));
}

// The CPU's f32 AdamW (what offload.optimizer host runs) gives the very same bits, with
// f32 master weights behind bf16 parameters and with f32 parameters alone.
TEST_P(LayerEmulationTest, AdamWMatchesTheHostUpdateBitForBit) {
  const size_t n = 5000;
  const Vec start = Random(n, 0.05);
  Guarded<bf16> param = OnDevice<bf16>(start);
  Guarded<float> master = OnDevice<float>(start), m = OnDevice<float>(Vec(n, 0.0)), v = OnDevice<float>(Vec(n, 0.0));
  Guarded<float> f32_param = OnDevice<float>(start), f32_m = OnDevice<float>(Vec(n, 0.0)),
                 f32_v = OnDevice<float>(Vec(n, 0.0));
  auto host = MakeCpuBackend({DType::kF32, 2});
  std::vector<float> host_w(start.begin(), start.end()), host_m(n, 0.f), host_v(n, 0.f), host_g(n);
  for (int step = 1; step <= 3; ++step) {
    const Vec grad = Random(n);
    Guarded<float> grad_d = OnDevice<float>(grad);
    const AdamWStep s{1e-2 / step, 0.9, 0.95, 1e-8, 0.1, step, 0.5};
    ASSERT_TRUE(Emulate([&] {
      cuda::layers::AdamW(gpu_, param.data(), master.data(), grad_d.data(), m.data(), v.data(), n, s);
      cuda::layers::AdamW(gpu_, f32_param.data(), static_cast<float*>(nullptr), grad_d.data(), f32_m.data(),
                          f32_v.data(), n, s);
    }));
    std::copy(grad.begin(), grad.end(), host_g.begin());
    host->AdamW(host_w.data(), nullptr, host_g.data(), host_m.data(), host_v.data(), n, s);
  }
  const Vec p = Values(param), w = Values(master), gm = Values(m), gv = Values(v);
  const Vec fp = Values(f32_param), fm = Values(f32_m), fv = Values(f32_v);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(p[i], RoundBf16(w[i])) << "the bf16 parameter is the master weight rounded, " << i;
    ASSERT_EQ(float(w[i]), host_w[i]) << "master " << i;
    ASSERT_EQ(float(gm[i]), host_m[i]) << "exp_avg " << i;
    ASSERT_EQ(float(gv[i]), host_v[i]) << "exp_avg_sq " << i;
    ASSERT_EQ(float(fp[i]), host_w[i]) << "f32 parameter " << i;
    ASSERT_EQ(float(fm[i]), host_m[i]) << "f32 exp_avg " << i;
    ASSERT_EQ(float(fv[i]), host_v[i]) << "f32 exp_avg_sq " << i;
  }
}

// The grid-stride kernels give the same bits on a grid of three blocks, where every
// thread loops over several elements, as on a grid that covers them all.
TEST_P(LayerEmulationTest, GridStrideKernelsLoopPastTheirGrid) {
  const size_t n = 5003;
  const Vec values = Random(n), other = Random(n), grad = Random(n);
  // Each kernel's output, by name.
  using Outputs = std::vector<std::pair<const char*, Vec>>;
  auto run = [&](unsigned max_blocks) {
    testing::EmulatedGpu gpu{emulator_};
    gpu.max_strided_blocks = max_blocks;
    Guarded<float> f = OnDevice<float>(values), back = Poisoned<float>(n), y = OnDevice<float>(other),
                   filled = Poisoned<float>(n), normal = Poisoned<float>(n), master = OnDevice<float>(values),
                   grad_d = OnDevice<float>(grad), m = OnDevice<float>(Vec(n, 0.0)), v = OnDevice<float>(Vec(n, 0.0));
    Guarded<bf16> b = Poisoned<bf16>(n), param = OnDevice<bf16>(values);
    const AdamWStep step{1e-2, 0.9, 0.95, 1e-8, 0.1, 1, 0.5};
    EXPECT_TRUE(Emulate([&] {
      cuda::layers::Convert(gpu, b.data(), static_cast<const float*>(f.data()), n);
      cuda::layers::Convert(gpu, back.data(), static_cast<const bf16*>(b.data()), n);
      cuda::layers::Scale(gpu, f.data(), n, 0.37f);
      cuda::layers::Add(gpu, y.data(), static_cast<const float*>(f.data()), n);
      cuda::layers::Fill(gpu, filled.data(), n, 0.3f);
      cuda::layers::FillNormal(gpu, normal.data(), n, 0.02, 7, 3, 11);
      cuda::layers::AdamW(gpu, param.data(), master.data(), grad_d.data(), m.data(), v.data(), n, step);
    }));
    return Outputs{{"cast", Values(b)},          {"cast back", Values(back)}, {"scaled", Values(f)},
                   {"sum", Values(y)},           {"filled", Values(filled)},  {"normal", Values(normal)},
                   {"param", Values(param)},     {"master", Values(master)},  {"m", Values(m)},
                   {"v", Values(v)}};
  };
  const Outputs looped = run(3), covered = run(cuda::kMaxStridedBlocks);
  for (size_t k = 0; k < looped.size(); ++k) {
    // NaN, where an element was left unwritten, differs from everything.
    EXPECT_TRUE(looped[k].second == covered[k].second) << looped[k].first << " differs on three blocks";
  }
}

// The emulator's own check that the test can fail: RMSNorm's backward launched with one
// float less of shared memory than its row needs writes past the launch's.
TEST_P(LayerEmulationTest, ARowPastTheLaunchsSharedMemoryIsCaught) {
  const int n = 4, dim = 96;
  Guarded<bf16> x = OnDevice<bf16>(Random(n * dim)), w = OnDevice<bf16>(Random(dim));
  Guarded<bf16> dout = OnDevice<bf16>(Random(n * dim));
  Guarded<bf16> dx = Poisoned<bf16>(n * dim);
  Guarded<float> rstd = OnDevice<float>(Vec(n, 1.0)), partial = Poisoned<float>(n * dim);
  try {
    gpu_.Launch(cuda::layers::RmsNormBackwardKernel<8>, dim3(n), 256, dim * 4 - 4, dx.data(), partial.data(),
                static_cast<const bf16*>(dout.data()), static_cast<const bf16*>(x.data()),
                static_cast<const bf16*>(w.data()), static_cast<const float*>(rstd.data()), n, dim, false);
    ADD_FAILURE() << "the emulator did not see the write past the launch's shared memory";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("past the launch's 380 bytes"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Schedules, LayerEmulationTest,
                         ::testing::Values(Turns::kRoundRobin, Turns::kFirstThreadFirst, Turns::kLastThreadFirst),
                         [](const ::testing::TestParamInfo<Turns>& info) {
                           switch (info.param) {
                             case Turns::kRoundRobin: return std::string("WarpsInStep");
                             case Turns::kFirstThreadFirst: return std::string("FirstWarpAhead");
                             case Turns::kLastThreadFirst: return std::string("LastWarpAhead");
                           }
                           return std::string("?");
                         });

}  // namespace
}  // namespace llamad
