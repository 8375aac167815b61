// Every CPU op: float64 finite-difference checks of its backward, and the float32
// kernels against the float64 ones.
#include <bit>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "backend/cpu/adamw_simd.h"
#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "gradcheck.h"

namespace llamad {
namespace {

using testing::Dot;
using testing::ExpectGradientsMatch;
using testing::FillRandom;

class OpsTest : public ::testing::Test {
 protected:
  OpsTest() : be_(MakeCpuBackend({DType::kF64, 2})) {}
  ~OpsTest() override {
    for (double* p : buffers_) be_->Free(p);
  }
  // A zeroed f64 buffer (host memory on this backend).
  double* Buf(size_t n) {
    auto* p = static_cast<double*>(be_->Allocate(n));
    buffers_.push_back(p);
    return p;
  }
  double* Random(size_t n, uint64_t stream, double std = 1.0) {
    double* p = Buf(n);
    FillRandom(p, n, stream, std);
    return p;
  }
  std::unique_ptr<Backend> be_;
  std::vector<double*> buffers_;
};

TEST_F(OpsTest, LinearGradients) {
  const int n = 5, in = 7, out = 3;
  double *x = Random(n * in, 1), *w = Random(out * in, 2), *r = Random(n * out, 3);
  double *y = Buf(n * out), *dx = Buf(n * in), *dw = Buf(out * in);
  auto loss = [&] {
    be_->Linear(y, x, w, n, in, out, false);
    return Dot(y, r, n * out);
  };
  loss();
  be_->LinearBackward(dx, dw, r, x, w, n, in, out, false);
  ExpectGradientsMatch(loss, {{"x", x, dx, size_t(n * in)}, {"w", w, dw, size_t(out * in)}});
  // Accumulation adds onto what is there.
  std::vector<double> before(dx, dx + n * in);
  be_->LinearBackward(dx, dw, r, x, w, n, in, out, true);
  for (int i = 0; i < n * in; ++i) EXPECT_NEAR(dx[i], 2 * before[i], 1e-12);
  // Forward accumulation.
  loss();  // y from the unperturbed inputs
  std::vector<double> y0(y, y + n * out);
  be_->Linear(y, x, w, n, in, out, true);
  for (int i = 0; i < n * out; ++i) EXPECT_NEAR(y[i], 2 * y0[i], 1e-12);
}

TEST_F(OpsTest, EmbeddingGradients) {
  const int n = 9, dim = 4, vocab = 5;
  const std::vector<int32_t> tokens = {0, 3, 3, 1, 4, 0, 3, 2, 2};
  double *table = Random(vocab * dim, 1), *r = Random(n * dim, 2);
  double *out = Buf(n * dim), *dtable = Buf(vocab * dim);
  auto loss = [&] {
    be_->Embedding(out, tokens.data(), table, n, dim);
    return Dot(out, r, n * dim);
  };
  loss();
  for (int j = 0; j < dim; ++j) EXPECT_EQ(out[2 * dim + j], table[3 * dim + j]);
  be_->EmbeddingBackward(dtable, r, tokens.data(), n, dim);
  ExpectGradientsMatch(loss, {{"table", table, dtable, size_t(vocab * dim)}});
}

TEST_F(OpsTest, RmsNormGradients) {
  const int n = 6, dim = 10;
  double *x = Random(n * dim, 1), *w = Random(dim, 2), *r = Random(n * dim, 3);
  double *out = Buf(n * dim), *rstd = Buf(n), *dx = Buf(n * dim), *dw = Buf(dim);
  auto loss = [&] {
    be_->RmsNorm(out, rstd, x, w, n, dim, 1e-6);
    return Dot(out, r, n * dim);
  };
  loss();
  // Matches the definition on one row.
  double ss = 0;
  for (int j = 0; j < dim; ++j) ss += x[dim + j] * x[dim + j];
  EXPECT_NEAR(out[dim + 3], x[dim + 3] / std::sqrt(ss / dim + 1e-6) * w[3], 1e-12);
  be_->RmsNormBackward(dx, dw, r, x, w, rstd, n, dim, false);
  ExpectGradientsMatch(loss, {{"x", x, dx, size_t(n * dim)}, {"w", w, dw, size_t(dim)}});
}

TEST_F(OpsTest, RopeMatchesRotateHalfAndInverseIsBackward) {
  const AttentionShape s{2, 5, 4, 2, 6};
  const size_t n = size_t(s.batch) * s.seq * s.row_stride();
  double *table = Buf(s.seq * s.head_dim), *qkv = Random(n, 1), *r = Random(n, 2);
  be_->RopeTable(table, s.seq, s.head_dim, 10000.0);
  std::vector<double> original(qkv, qkv + n);
  be_->Rope(qkv, table, s, false);
  // Hugging Face: q * cos + rotate_half(q) * sin, cos/sin of pos * theta^(-2i/d)
  // repeated over the two halves.
  const int half = s.head_dim / 2;
  for (int row = 0; row < s.batch * s.seq; ++row) {
    const int pos = row % s.seq;
    for (int h = 0; h < s.heads + 2 * s.kv_heads; ++h) {
      for (int d = 0; d < s.head_dim; ++d) {
        const size_t base = size_t(row) * s.row_stride() + h * s.head_dim;
        const int i = d % half;
        const double angle = pos * std::pow(10000.0, -2.0 * i / s.head_dim);
        const double rotated = d < half ? -original[base + d + half] : original[base + d - half];
        const double expected = h < s.heads + s.kv_heads
                                    ? original[base + d] * std::cos(angle) + rotated * std::sin(angle)
                                    : original[base + d];  // value heads are not rotated
        EXPECT_NEAR(qkv[base + d], expected, 1e-12) << "row " << row << " head " << h << " d " << d;
      }
    }
  }
  // The inverse rotation undoes it, and it is the backward.
  std::copy(original.begin(), original.end(), qkv);
  auto loss = [&] {
    std::vector<double> copy(qkv, qkv + n);
    be_->Rope(copy.data(), table, s, false);
    return Dot(copy.data(), r, n);
  };
  std::vector<double> grad(r, r + n);
  be_->Rope(grad.data(), table, s, true);
  ExpectGradientsMatch(loss, {{"qkv", qkv, grad.data(), n}});
}

// Direct causal attention with GQA, one score matrix per head: the definition.
std::vector<double> NaiveAttention(const double* qkv, const AttentionShape& s) {
  const int D = s.head_dim, stride = s.row_stride();
  std::vector<double> out(size_t(s.batch) * s.seq * s.heads * D);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      const int g = h / (s.heads / s.kv_heads);
      for (int i = 0; i < s.seq; ++i) {
        std::vector<double> p(i + 1);
        double mx = -1e300, sum = 0;
        for (int j = 0; j <= i; ++j) {
          double dot = 0;
          for (int d = 0; d < D; ++d) {
            dot += qkv[(size_t(b) * s.seq + i) * stride + h * D + d] *
                   qkv[(size_t(b) * s.seq + j) * stride + (s.heads + g) * D + d];
          }
          p[j] = dot / std::sqrt(double(D));
          mx = std::max(mx, p[j]);
        }
        for (auto& v : p) sum += v = std::exp(v - mx);
        for (int d = 0; d < D; ++d) {
          double acc = 0;
          for (int j = 0; j <= i; ++j) {
            acc += p[j] / sum * qkv[(size_t(b) * s.seq + j) * stride + (s.heads + s.kv_heads + g) * D + d];
          }
          out[(size_t(b) * s.seq + i) * s.heads * D + h * D + d] = acc;
        }
      }
    }
  }
  return out;
}

class AttentionTest : public OpsTest, public ::testing::WithParamInterface<int> {};

TEST_P(AttentionTest, MatchesDefinitionAndFiniteDifferences) {
  const int block = GetParam();  // 0 = unfused (one tile spans the sequence)
  const AttentionShape s{2, 11, 4, 2, 6};
  const size_t n_qkv = size_t(s.batch) * s.seq * s.row_stride();
  const size_t n_out = size_t(s.batch) * s.seq * s.heads * s.head_dim;
  const int tile = block > 0 ? block : s.seq;
  double *qkv = Random(n_qkv, 1), *r = Random(n_out, 2);
  double *out = Buf(n_out), *lse = Buf(size_t(s.batch) * s.heads * s.seq), *dqkv = Buf(n_qkv);
  auto loss = [&] {
    be_->Attention(out, lse, qkv, s, tile);
    return Dot(out, r, n_out);
  };
  loss();
  const std::vector<double> expected = NaiveAttention(qkv, s);
  for (size_t i = 0; i < n_out; ++i) ASSERT_NEAR(out[i], expected[i], 1e-12) << i;
  be_->AttentionBackward(dqkv, r, out, lse, qkv, s, tile);
  ExpectGradientsMatch(loss, {{"qkv", qkv, dqkv, n_qkv}}, 1e-6, 2000);
}

// Tiles of 1, 3 (not dividing 11), 4, 16 (larger than the sequence) and unfused.
INSTANTIATE_TEST_SUITE_P(Tiles, AttentionTest, ::testing::Values(1, 3, 4, 16, 0));

TEST_F(OpsTest, SwiGluGradients) {
  const int n = 4, ffn = 9;
  double *gu = Random(n * 2 * ffn, 1, 2.0), *r = Random(n * ffn, 2);
  double *h = Buf(n * ffn), *dgu = Buf(n * 2 * ffn);
  auto loss = [&] {
    be_->SwiGlu(h, gu, n, ffn);
    return Dot(h, r, n * ffn);
  };
  loss();
  const double g = gu[2 * ffn + 1], u = gu[2 * ffn + ffn + 1];
  EXPECT_NEAR(h[ffn + 1], g / (1 + std::exp(-g)) * u, 1e-12);
  be_->SwiGluBackward(dgu, r, gu, n, ffn);
  ExpectGradientsMatch(loss, {{"gate_up", gu, dgu, size_t(n * 2 * ffn)}});
}

TEST_F(OpsTest, LmHeadCrossEntropyGradientsAcrossChunks) {
  // A chunk of 16 rows forces several chunks over 37 rows.
  auto be = MakeCpuBackend({DType::kF64, 2, /*lm_head_chunk_elements=*/16 * 13});
  const int n = 37, dim = 6, vocab = 13;
  std::vector<int32_t> targets(n);
  for (int i = 0; i < n; ++i) targets[i] = i % 5 == 4 ? -1 : (i * 7) % vocab;  // some ignored
  double *x = Random(n * dim, 1), *w = Random(vocab * dim, 2), *dx = Buf(n * dim), *dw = Buf(vocab * dim);
  const double scale = 0.37;
  auto loss = [&] { return scale * be->LmHeadCrossEntropy(x, w, targets.data(), n, dim, vocab, 1, nullptr, nullptr); };
  const double with_grad = be->LmHeadCrossEntropy(x, w, targets.data(), n, dim, vocab, scale, dx, dw);
  // Definition: sum over kept rows of logsumexp(logits) - logit[target].
  double expected = 0;
  for (int i = 0; i < n; ++i) {
    if (targets[i] < 0) continue;
    std::vector<double> logits(vocab);
    double mx = -1e300, sum = 0;
    for (int v = 0; v < vocab; ++v) {
      logits[v] = Dot(x + i * dim, w + v * dim, dim);
      mx = std::max(mx, logits[v]);
    }
    for (double l : logits) sum += std::exp(l - mx);
    expected += std::log(sum) + mx - logits[targets[i]];
  }
  EXPECT_NEAR(with_grad, expected, 1e-10);
  for (int j = 0; j < dim; ++j) EXPECT_EQ(dx[4 * dim + j], 0.0) << "ignored row has no gradient";
  ExpectGradientsMatch(loss, {{"x", x, dx, size_t(n * dim)}, {"w", w, dw, size_t(vocab * dim)}});
}

TEST_F(OpsTest, AdamWMatchesTheFormula) {
  const size_t n = 50;
  double *p = Random(n, 1), *g = Random(n, 2), *m = Buf(n), *v = Buf(n);
  std::vector<double> p_ref(p, p + n), m_ref(n, 0), v_ref(n, 0);
  AdamWStep s{1e-2, 0.9, 0.95, 1e-8, 0.1, 0, 0.5};
  for (int step = 1; step <= 3; ++step) {
    s.step = step;
    be_->AdamW(p, nullptr, g, m, v, n, s);
    for (size_t i = 0; i < n; ++i) {  // PyTorch's AdamW
      const double gi = g[i] * 0.5;
      p_ref[i] *= 1 - s.lr * s.weight_decay;
      m_ref[i] = 0.9 * m_ref[i] + 0.1 * gi;
      v_ref[i] = 0.95 * v_ref[i] + 0.05 * gi * gi;
      const double mhat = m_ref[i] / (1 - std::pow(0.9, step));
      const double vhat = v_ref[i] / (1 - std::pow(0.95, step));
      p_ref[i] -= s.lr * mhat / (std::sqrt(vhat) + 1e-8);
    }
  }
  for (size_t i = 0; i < n; ++i) EXPECT_NEAR(p[i], p_ref[i], 1e-12) << i;
}

TEST_F(OpsTest, SumSquaresAndScale) {
  const size_t n = 10007;
  double* x = Random(n, 1);
  double expected = 0;
  for (size_t i = 0; i < n; ++i) expected += x[i] * x[i];
  EXPECT_NEAR(be_->SumSquares(x, n), expected, 1e-9);
  be_->Scale(x, 2.0, n);
  EXPECT_NEAR(be_->SumSquares(x, n), 4 * expected, 1e-8);
}

TEST_F(OpsTest, AddAccumulatesElementWise) {
  const size_t n = 10007;
  double* y = Random(n, 3);
  double* x = Random(n, 4);
  std::vector<double> before(y, y + n);
  be_->Add(y, x, n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(y[i], before[i] + x[i]) << i;
}

// The float32 kernels agree with the float64 ones on the same inputs.
TEST(OpsF32Test, AttentionAndLmHeadAgreeWithF64) {
  auto f32 = MakeCpuBackend({DType::kF32, 2});
  auto f64 = MakeCpuBackend({DType::kF64, 2});
  const AttentionShape s{2, 70, 4, 1, 16};  // multi-query, 70 is not a multiple of 64
  const size_t n_qkv = size_t(s.batch) * s.seq * s.row_stride();
  const size_t n_out = size_t(s.batch) * s.seq * s.heads * s.head_dim;
  const size_t n_lse = size_t(s.batch) * s.heads * s.seq;
  std::vector<double> qkv(n_qkv), dout(n_out);
  FillRandom(qkv.data(), n_qkv, 1);
  FillRandom(dout.data(), n_out, 2);
  struct Run {
    std::vector<double> out, dqkv;
  };
  auto run = [&](Backend& be) {
    void* q = be.Allocate(n_qkv);
    void* o = be.Allocate(n_out);
    void* l = be.Allocate(n_lse);
    void* d = be.Allocate(n_out);
    void* dq = be.Allocate(n_qkv);
    be.Upload(q, qkv.data(), n_qkv);
    be.Upload(d, dout.data(), n_out);
    be.Attention(o, l, q, s, 64);
    be.AttentionBackward(dq, d, o, l, q, s, 64);
    Run r{std::vector<double>(n_out), std::vector<double>(n_qkv)};
    be.Download(r.out.data(), o, n_out);
    be.Download(r.dqkv.data(), dq, n_qkv);
    for (void* p : {q, o, l, d, dq}) be.Free(p);
    return r;
  };
  const Run a = run(*f32), b = run(*f64);
  for (size_t i = 0; i < n_out; ++i) ASSERT_NEAR(a.out[i], b.out[i], 2e-5) << i;
  for (size_t i = 0; i < n_qkv; ++i) ASSERT_NEAR(a.dqkv[i], b.dqkv[i], 1e-4) << i;
}

}  // namespace
}  // namespace llamad

namespace llamad {
namespace {

// The scalar, AVX2 and AVX-512 AdamW kernels give the same bits (those this CPU runs),
// and agree with a float64 evaluation of the same update.
TEST(CpuAdamWTest, SimdPathsAreBitIdentical) {
  const size_t n = 100003;  // not a multiple of any vector width
  std::vector<float> p0(n), g(n), m0(n), v0(n);
  for (size_t i = 0; i < n; ++i) {
    p0[i] = float(0.05 * RandomNormal(3, 0, i));
    g[i] = float(RandomNormal(3, 1, i));
    m0[i] = float(0.1 * RandomNormal(3, 2, i));
    v0[i] = float(0.01 * std::abs(RandomNormal(3, 3, i)));
  }
  const cpu::AdamWScalars s{0.9f, 0.95f, 1e-8f, 0.5f, 1.3e-3f, 1.7f, 0.9999f};
  std::vector<cpu::SimdLevel> levels = {cpu::SimdLevel::kScalar};
  if (cpu::DetectSimd() != cpu::SimdLevel::kScalar) levels.push_back(cpu::SimdLevel::kAvx2);
  if (cpu::DetectSimd() == cpu::SimdLevel::kAvx512) levels.push_back(cpu::SimdLevel::kAvx512);
  std::vector<float> ref_p;
  for (cpu::SimdLevel level : levels) {
    std::vector<float> p = p0, m = m0, v = v0;
    cpu::AdamWF32(p.data(), g.data(), m.data(), v.data(), n, s, level);
    if (ref_p.empty()) {
      ref_p = p;
      // Against float64 arithmetic on the same inputs.
      double err = 0, norm = 0;
      for (size_t i = 0; i < n; ++i) {
        const double gi = double(g[i]) * s.grad_scale;
        const double mi = double(s.beta1) * m0[i] + (1.0 - double(s.beta1)) * gi;
        const double vi = double(s.beta2) * v0[i] + (1.0 - double(s.beta2)) * gi * gi;
        const double pi = double(p0[i]) * s.decay - double(s.step_size) * mi / (std::sqrt(vi) * s.inv_bias2_sqrt + s.eps);
        err += (pi - p[i]) * (pi - p[i]);
        norm += pi * pi;
      }
      EXPECT_LT(std::sqrt(err / norm), 1e-6);
    } else {
      EXPECT_EQ(0, std::memcmp(p.data(), ref_p.data(), n * sizeof(float))) << cpu::SimdName(level);
    }
  }
  std::printf("AdamW paths checked: %zu (this CPU: %s)\n", levels.size(), cpu::SimdName(cpu::DetectSimd()));
}

std::vector<cpu::SimdLevel> CpuSimdLevels() {
  std::vector<cpu::SimdLevel> levels = {cpu::SimdLevel::kScalar};
  if (cpu::DetectSimd() != cpu::SimdLevel::kScalar) levels.push_back(cpu::SimdLevel::kAvx2);
  if (cpu::DetectSimd() == cpu::SimdLevel::kAvx512) levels.push_back(cpu::SimdLevel::kAvx512);
  return levels;
}

float Bf16Value(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

// bf16 moments: every SIMD path and any split of the range give the same bits (the
// rounding's random bits follow the element's index, not the call); the parameters are
// those of the f32 update (the stored moments are rounded, not the ones used), and each
// stored moment is one of the two bf16 values either side of its f32 value.
TEST(CpuAdamWTest, Bf16MomentsAreTheF32UpdateRoundedAlikeOnEveryPath) {
  const size_t n = 100003, first = (size_t{1} << 32) - 50000;  // the index crosses 2^32 mid-range
  std::vector<float> p0(n), g(n), m32(n), v32(n);
  std::vector<uint16_t> m0(n), v0(n);
  for (size_t i = 0; i < n; ++i) {
    p0[i] = float(0.05 * RandomNormal(4, 0, i));
    g[i] = float(RandomNormal(4, 1, i));
    m32[i] = float(0.1 * RandomNormal(4, 2, i));
    v32[i] = float(0.01 * std::abs(RandomNormal(4, 3, i)));
  }
  cpu::F32ToBf16(m32.data(), m0.data(), n);
  cpu::F32ToBf16(v32.data(), v0.data(), n);
  std::vector<float> mf(n), vf(n);
  cpu::Bf16ToF32(m0.data(), mf.data(), n);
  cpu::Bf16ToF32(v0.data(), vf.data(), n);
  const cpu::AdamWScalars s{0.9f, 0.999f, 1e-8f, 0.5f, 1.3e-3f, 1.7f, 0.9999f};
  const uint32_t seed = cpu::AdamWRoundingSeed(7);
  // The f32 update from the same (bf16-valued) moments.
  std::vector<float> want_p = p0, want_m = mf, want_v = vf;
  cpu::AdamWF32(want_p.data(), g.data(), want_m.data(), want_v.data(), n, s, cpu::SimdLevel::kScalar);
  std::vector<uint16_t> ref_m, ref_v;
  for (cpu::SimdLevel level : CpuSimdLevels()) {
    for (size_t split : {n, size_t{12345}}) {
      std::vector<float> p = p0;
      std::vector<uint16_t> m = m0, v = v0;
      cpu::AdamWBf16Moments(p.data(), g.data(), m.data(), v.data(), split, first, seed, s, level);
      cpu::AdamWBf16Moments(p.data() + split, g.data() + split, m.data() + split, v.data() + split, n - split,
                            first + split, seed, s, level);
      const std::string where = std::string(cpu::SimdName(level)) + ", split at " + std::to_string(split);
      ASSERT_EQ(0, std::memcmp(p.data(), want_p.data(), n * sizeof(float))) << where;
      if (ref_m.empty()) {
        ref_m = m;
        ref_v = v;
        for (size_t i = 0; i < n; ++i) {
          for (auto [stored, exact] : {std::pair{m[i], want_m[i]}, std::pair{v[i], want_v[i]}}) {
            // Truncation is the value below (in magnitude); the one above is the next bf16.
            const uint16_t below = uint16_t(std::bit_cast<uint32_t>(exact) >> 16);
            ASSERT_TRUE(stored == below || stored == uint16_t(below + 1))
                << i << ": " << exact << " stored as " << Bf16Value(stored);
          }
        }
      }
      ASSERT_EQ(0, std::memcmp(m.data(), ref_m.data(), n * sizeof(uint16_t))) << where;
      ASSERT_EQ(0, std::memcmp(v.data(), ref_v.data(), n * sizeof(uint16_t))) << where;
    }
  }
}

// Stochastic rounding keeps the moments' averages unbiased where round-to-nearest stalls:
// v's increments at beta2 = 0.999 are 0.1% of v, below bf16's half step (0.2-0.4%). With
// a constant gradient of 1, v after t steps is 1 - 0.999^t.
TEST(CpuAdamWTest, Bf16MomentsFollowTheF32AverageOverManySteps) {
  const size_t n = 4096;
  const int steps = 3000;
  std::vector<float> p(n, 0.0f), g(n, 1.0f);
  std::vector<uint16_t> m(n, 0), v(n, 0);
  const cpu::AdamWScalars s{0.9f, 0.999f, 1e-8f, 1.0f, 0.0f, 1.0f, 1.0f};
  for (int t = 1; t <= steps; ++t) {
    cpu::AdamWBf16Moments(p.data(), g.data(), m.data(), v.data(), n, 0, cpu::AdamWRoundingSeed(t), s,
                          cpu::DetectSimd());
  }
  double mean_v = 0, mean_m = 0;
  for (size_t i = 0; i < n; ++i) mean_v += Bf16Value(v[i]) / n, mean_m += Bf16Value(m[i]) / n;
  const double want_v = 1.0 - std::pow(0.999, steps);  // 0.9503
  // Round to nearest would stall at v = 0.25, where the increment 0.001 (1 - v) falls
  // below half of bf16's step there (2^-10).
  EXPECT_NEAR(mean_v, want_v, 0.002) << "mean v over " << n << " elements";
  EXPECT_NEAR(mean_m, 1.0, 0.002);
  RecordProperty("mean v", std::to_string(mean_v));
}

}  // namespace
}  // namespace llamad
