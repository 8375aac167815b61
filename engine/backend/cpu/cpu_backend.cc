#include "backend/cpu/cpu_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "backend/cpu/adamw_simd.h"
#include "backend/cpu/attention.h"
#include "backend/cpu/blas.h"
#include "core/rng.h"

extern "C" void openblas_set_num_threads(int);

namespace llamad {
namespace {

using cpu::Gemm;

// Sums per-thread partial vectors in thread order: deterministic for a thread count.
template <typename T>
void ReduceInto(T* dst, const std::vector<std::vector<T>>& partials, int dim) {
#pragma omp parallel for schedule(static)
  for (int j = 0; j < dim; ++j) {
    T sum = 0;
    for (const auto& p : partials) sum += p[j];
    dst[j] += sum;
  }
}

// The f32 AdamW kernels' constants for a step (computed in double, as the other types'
// loop does).
cpu::AdamWScalars ScalarsOf(const AdamWStep& s) {
  return {float(s.beta1),
          float(s.beta2),
          float(s.eps),
          float(s.grad_scale),
          float(s.lr / (1.0 - std::pow(s.beta1, double(s.step)))),
          float(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step)))),
          float(1.0 - s.lr * s.weight_decay)};
}

// f(begin, len) over chunks of [0, n) spread over the threads: a static schedule, so the
// chunks and their order do not depend on timing.
template <typename F>
void ForEachAdamWChunk(size_t n, const F& f) {
  constexpr size_t kChunk = size_t{1} << 16;
  const size_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kChunk;
    f(begin, std::min(kChunk, n - begin));
  }
}

template <typename T>
class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(const CpuBackendOptions& options) : options_(options) {}
  ~CpuBackend() override {
    for (auto& [ptr, bytes] : sizes_) std::free(ptr);  // Includes logits_.
  }

  std::string_view name() const override { return "cpu"; }
  DType dtype() const override { return options_.dtype; }
  bool needs_master_weights() const override { return options_.master_weights; }

  using Backend::Allocate;
  void* Allocate(size_t numel, DType type) override {
    if (type != options_.dtype) {
      std::fprintf(stderr, "llamad: the %s CPU backend cannot allocate %s buffers\n",
                   DTypeName(options_.dtype).data(), DTypeName(type).data());
      std::abort();
    }
    const size_t bytes = std::max<size_t>(64, (numel * sizeof(T) + 63) / 64 * 64);
    void* ptr = std::aligned_alloc(64, bytes);
    if (ptr == nullptr) {
      std::fprintf(stderr, "llamad: out of host memory allocating %zu bytes\n", bytes);
      std::abort();
    }
    std::memset(ptr, 0, bytes);
    sizes_[ptr] = bytes;
    allocated_ += bytes;
    peak_ = std::max(peak_, allocated_);
    return ptr;
  }
  void Free(void* buffer) override {
    if (buffer == nullptr) return;
    auto it = sizes_.find(buffer);
    if (it == sizes_.end()) {
      std::fprintf(stderr, "llamad: Free of a buffer this backend did not allocate\n");
      std::abort();
    }
    allocated_ -= it->second;
    sizes_.erase(it);
    std::free(buffer);
  }
  size_t allocated_bytes() const override { return allocated_; }
  size_t peak_allocated_bytes() const override { return peak_; }
  void ResetPeak() override { peak_ = allocated_; }

  void Upload(void* dst, const double* src, size_t n) override { Convert(P(dst), src, n); }
  void Download(double* dst, const void* src, size_t n) override { Convert(dst, C(src), n); }
  void UploadF32(void* dst, const float* src, size_t n) override { Convert(P(dst), src, n); }
  void DownloadF32(float* dst, const void* src, size_t n) override { Convert(dst, C(src), n); }
  void Copy(void* dst, const void* src, size_t n) override { Convert(P(dst), C(src), n); }
  void Zero(void* x, size_t n) override { Fill(x, n, 0.0); }
  void Fill(void* x, size_t n, double value) override {
    T* p = P(x);
    const T v = T(value);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) p[i] = v;
  }
  void Add(void* y, const void* x, size_t n) override {
    T* p = P(y);
    const T* q = C(x);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) p[i] += q[i];
  }
  void Scale(void* x, double scale, size_t n) override {
    T* p = P(x);
    const T s = T(scale);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) p[i] *= s;
  }
  void FillNormal(void* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) override {
    T* p = P(x);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) p[i] = T(std * RandomNormal(seed, stream, first + i));
  }
  double SumSquares(const void* x, size_t n) override {
    const T* p = C(x);
    // Fixed-size blocks summed in order: the result does not depend on the thread count.
    constexpr size_t kBlock = 4096;
    const size_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(blocks);
#pragma omp parallel for schedule(static)
    for (size_t b = 0; b < blocks; ++b) {
      double s = 0;
      const size_t end = std::min(n, (b + 1) * kBlock);
#pragma omp simd reduction(+ : s)
      for (size_t i = b * kBlock; i < end; ++i) s += double(p[i]) * double(p[i]);
      partial[b] = s;
    }
    double total = 0;
    for (double s : partial) total += s;
    return total;
  }

  void Linear(void* y, const void* x, const void* w, int n, int in, int out,
              bool accumulate) override {
    Gemm(false, true, n, out, in, T(1), C(x), in, C(w), in, T(accumulate ? 1 : 0), P(y), out);
  }
  void LinearBackward(void* dx, void* dw, const void* dy, const void* x, const void* w, int n,
                      int in, int out, bool accumulate_dx) override {
    if (dx != nullptr) {
      Gemm(false, false, n, in, out, T(1), C(dy), out, C(w), in, T(accumulate_dx ? 1 : 0), P(dx), in);
    }
    Gemm(true, false, out, in, n, T(1), C(dy), out, C(x), in, T(1), P(dw), in);
  }

  void Embedding(void* out, const int32_t* tokens, const void* table, int n, int dim) override {
    T* o = P(out);
    const T* t = C(table);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) std::memcpy(o + size_t(i) * dim, t + size_t(tokens[i]) * dim, dim * sizeof(T));
  }
  void EmbeddingBackward(void* dtable, const void* dout, const int32_t* tokens, int n,
                         int dim) override {
    T* dt = P(dtable);
    const T* d = C(dout);
    // Each thread owns a slice of columns, so repeated tokens never race and the order
    // of additions is fixed.
#pragma omp parallel
    {
      const int threads = omp_get_num_threads(), id = omp_get_thread_num();
      const int begin = int(int64_t(dim) * id / threads), end = int(int64_t(dim) * (id + 1) / threads);
      for (int i = 0; i < n; ++i) {
        T* row = dt + size_t(tokens[i]) * dim;
        const T* src = d + size_t(i) * dim;
        for (int j = begin; j < end; ++j) row[j] += src[j];
      }
    }
  }

  void RmsNorm(void* out, void* rstd, const void* x, const void* w, int n, int dim,
               double eps) override {
    T* o = P(out);
    T* r = P(rstd);
    const T* xp = C(x);
    const T* wp = C(w);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) {
      const T* row = xp + size_t(i) * dim;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int j = 0; j < dim; ++j) ss += row[j] * row[j];
      const T s = T(1) / std::sqrt(ss / T(dim) + T(eps));
      r[i] = s;
      T* orow = o + size_t(i) * dim;
#pragma omp simd
      for (int j = 0; j < dim; ++j) orow[j] = row[j] * s * wp[j];
    }
  }
  void RmsNormBackward(void* dx, void* dw, const void* dout, const void* x, const void* w,
                       const void* rstd, int n, int dim, bool accumulate_dx) override {
    T* dxp = P(dx);
    const T* g = C(dout);
    const T* xp = C(x);
    const T* wp = C(w);
    const T* r = C(rstd);
    std::vector<std::vector<T>> dw_partial;
#pragma omp parallel
    {
#pragma omp single
      dw_partial.assign(omp_get_num_threads(), std::vector<T>(dim, T(0)));
      std::vector<T>& dw_local = dw_partial[omp_get_thread_num()];
#pragma omp for schedule(static)
      for (int i = 0; i < n; ++i) {
        const T* grow = g + size_t(i) * dim;
        const T* xrow = xp + size_t(i) * dim;
        const T s = r[i];
        T dot = 0;  // sum_j w_j g_j x_j
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < dim; ++j) dot += wp[j] * grow[j] * xrow[j];
        const T k = dot * s * s * s / T(dim);
        T* drow = dxp + size_t(i) * dim;
        if (accumulate_dx) {
#pragma omp simd
          for (int j = 0; j < dim; ++j) drow[j] += s * wp[j] * grow[j] - k * xrow[j];
        } else {
#pragma omp simd
          for (int j = 0; j < dim; ++j) drow[j] = s * wp[j] * grow[j] - k * xrow[j];
        }
#pragma omp simd
        for (int j = 0; j < dim; ++j) dw_local[j] += grow[j] * xrow[j] * s;
      }
    }
    ReduceInto(P(dw), dw_partial, dim);
  }

  void RopeTable(void* table, int seq, int head_dim, double theta) override {
    T* t = P(table);
    const int half = head_dim / 2;
    for (int pos = 0; pos < seq; ++pos) {
      for (int i = 0; i < half; ++i) {
        const double angle = pos * std::pow(theta, -2.0 * i / head_dim);
        t[(size_t(pos) * half + i) * 2] = T(std::cos(angle));
        t[(size_t(pos) * half + i) * 2 + 1] = T(std::sin(angle));
      }
    }
  }
  void Rope(void* qkv, const void* table, const AttentionShape& s, bool inverse) override {
    T* x = P(qkv);
    const T* t = C(table);
    const int half = s.head_dim / 2, rotated = s.heads + s.kv_heads, stride = s.row_stride();
    const T sign = inverse ? T(-1) : T(1);
    const int n = s.batch * s.seq;
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n; ++row) {
      const T* cs = t + size_t(row % s.seq) * half * 2;
      for (int h = 0; h < rotated; ++h) {
        T* v = x + size_t(row) * stride + size_t(h) * s.head_dim;
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const T c = cs[2 * i], sn = sign * cs[2 * i + 1];
          const T x1 = v[i], x2 = v[i + half];
          v[i] = x1 * c - x2 * sn;
          v[i + half] = x2 * c + x1 * sn;
        }
      }
    }
  }

  void Attention(void* out, void* lse, const void* qkv, const AttentionShape& shape,
                 int block) override {
    cpu::AttentionForward(P(out), P(lse), C(qkv), shape, block);
  }
  void AttentionBackward(void* dqkv, const void* dout, const void* out, const void* lse,
                         const void* qkv, const AttentionShape& shape, int block) override {
    cpu::AttentionBackward(P(dqkv), C(dout), C(out), C(lse), C(qkv), shape, block);
  }

  void SwiGlu(void* h, const void* gate_up, int n, int ffn) override {
    T* hp = P(h);
    const T* gu = C(gate_up);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) {
      const T* gate = gu + size_t(i) * 2 * ffn;
      const T* up = gate + ffn;
      T* out = hp + size_t(i) * ffn;
#pragma omp simd
      for (int j = 0; j < ffn; ++j) out[j] = gate[j] / (T(1) + std::exp(-gate[j])) * up[j];
    }
  }
  void SwiGluBackward(void* dgate_up, const void* dh, const void* gate_up, int n,
                      int ffn) override {
    T* dgu = P(dgate_up);
    const T* d = C(dh);
    const T* gu = C(gate_up);
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; ++i) {
      const T* gate = gu + size_t(i) * 2 * ffn;
      const T* up = gate + ffn;
      const T* drow = d + size_t(i) * ffn;
      T* dgate = dgu + size_t(i) * 2 * ffn;
      T* dup = dgate + ffn;
#pragma omp simd
      for (int j = 0; j < ffn; ++j) {
        const T sig = T(1) / (T(1) + std::exp(-gate[j]));
        const T silu = gate[j] * sig;
        dup[j] = drow[j] * silu;
        dgate[j] = drow[j] * up[j] * sig * (T(1) + gate[j] * (T(1) - sig));
      }
    }
  }

  double LmHeadCrossEntropy(const void* x, const void* w, const int32_t* targets, int n, int dim,
                            int vocab, double grad_scale, void* dx, void* dw) override {
    const T* xp = C(x);
    const T* wp = C(w);
    const int chunk = LmHeadChunkRows(options_.lm_head_chunk_elements, vocab, n);
    if (logits_capacity_ < size_t(chunk) * vocab) {
      Free(logits_);
      logits_capacity_ = size_t(chunk) * vocab;
      logits_ = P(Allocate(logits_capacity_));
    }
    std::vector<double> row_loss(n, 0.0);
    const bool backward = dx != nullptr;
    for (int r0 = 0; r0 < n; r0 += chunk) {
      const int rows = std::min(chunk, n - r0);
      T* logits = logits_;
      Gemm(false, true, rows, vocab, dim, T(1), xp + size_t(r0) * dim, dim, wp, dim, T(0), logits, vocab);
#pragma omp parallel for schedule(static)
      for (int r = 0; r < rows; ++r) {
        T* row = logits + size_t(r) * vocab;
        const int target = targets[r0 + r];
        if (target < 0) {
          if (backward) std::fill_n(row, vocab, T(0));
          continue;
        }
        T row_max = -std::numeric_limits<T>::infinity();
        for (int v = 0; v < vocab; ++v) row_max = std::max(row_max, row[v]);
        T sum = 0;
        // The target's logit is read before the row is overwritten with probabilities.
        const T target_logit = row[target];
        if (backward) {
          for (int v = 0; v < vocab; ++v) sum += row[v] = std::exp(row[v] - row_max);
        } else {
#pragma omp simd reduction(+ : sum)
          for (int v = 0; v < vocab; ++v) sum += std::exp(row[v] - row_max);
        }
        row_loss[r0 + r] = double(std::log(sum) + row_max - target_logit);
        if (backward) {
          const T scale = T(grad_scale) / sum;
#pragma omp simd
          for (int v = 0; v < vocab; ++v) row[v] *= scale;
          row[target] -= T(grad_scale);
        }
      }
      if (backward) {
        Gemm(false, false, rows, dim, vocab, T(1), logits, vocab, wp, dim, T(0), P(dx) + size_t(r0) * dim, dim);
        Gemm(true, false, vocab, dim, rows, T(1), logits, vocab, xp + size_t(r0) * dim, dim, T(1), P(dw), dim);
      }
    }
    double total = 0;
    for (double l : row_loss) total += l;
    return total;
  }

  void AdamW(void* param, void* master, const void* grad, void* m, void* v, size_t n,
             const AdamWStep& s) override {
    if ((master != nullptr) != options_.master_weights) {
      std::fprintf(stderr, "llamad: the CPU backend %s master weights\n",
                   options_.master_weights ? "needs" : "keeps no");
      std::abort();
    }
    // With master weights the step updates them, and the parameters take a copy.
    T* p = P(master != nullptr ? master : param);
    StepAdamW(p, grad, m, v, n, s);
    if (master != nullptr) Copy(param, master, n);
  }

 private:
  void StepAdamW(T* p, const void* grad, void* m, void* v, size_t n, const AdamWStep& s) {
    const T* g = C(grad);
    T* mp = P(m);
    T* vp = P(v);
    if constexpr (std::is_same_v<T, float>) {
      // The SIMD kernel (same operations, same order: identical results).
      const cpu::AdamWScalars scalars = ScalarsOf(s);
      const cpu::SimdLevel level = cpu::DetectSimd();
      ForEachAdamWChunk(n, [&](size_t begin, size_t len) {
        cpu::AdamWF32(p + begin, g + begin, mp + begin, vp + begin, len, scalars, level);
      });
      return;
    }
    const T b1 = T(s.beta1), b2 = T(s.beta2), eps = T(s.eps), gs = T(s.grad_scale);
    const T step_size = T(s.lr / (1.0 - std::pow(s.beta1, double(s.step))));
    const T inv_bias2_sqrt = T(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step))));
    const T decay = T(1.0 - s.lr * s.weight_decay);
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; ++i) {
      const T gi = g[i] * gs;
      const T mi = b1 * mp[i] + (T(1) - b1) * gi;
      const T vi = b2 * vp[i] + (T(1) - b2) * gi * gi;
      mp[i] = mi;
      vp[i] = vi;
      p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_bias2_sqrt + eps);
    }
  }

  static T* P(void* p) { return static_cast<T*>(p); }
  static const T* C(const void* p) { return static_cast<const T*>(p); }
  template <typename D, typename S>
  static void Convert(D* dst, const S* src, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) dst[i] = D(src[i]);
  }

  CpuBackendOptions options_;
  std::unordered_map<void*, size_t> sizes_;
  size_t allocated_ = 0;
  size_t peak_ = 0;
  // The fused LM head's chunk of logits, kept across calls (counted in the peak).
  T* logits_ = nullptr;
  size_t logits_capacity_ = 0;
};

}  // namespace

int CpuThreads() { return omp_get_max_threads(); }

void AdamWBf16MomentsOnThreads(float* p, const float* grad, uint16_t* m, uint16_t* v, size_t n, size_t first,
                               const AdamWStep& s) {
  const cpu::AdamWScalars scalars = ScalarsOf(s);
  const cpu::SimdLevel level = cpu::DetectSimd();
  const uint32_t seed = cpu::AdamWRoundingSeed(s.step);
  ForEachAdamWChunk(n, [&](size_t begin, size_t len) {
    cpu::AdamWBf16Moments(p + begin, grad + begin, m + begin, v + begin, len, first + begin, seed, scalars, level);
  });
}

std::unique_ptr<Backend> MakeCpuBackend(const CpuBackendOptions& options) {
  if (options.threads > 0) {
    omp_set_num_threads(options.threads);
    openblas_set_num_threads(options.threads);
  }
  switch (options.dtype) {
    case DType::kF32: return std::make_unique<CpuBackend<float>>(options);
    case DType::kF64: return std::make_unique<CpuBackend<double>>(options);
    case DType::kBF16: break;
  }
  std::fprintf(stderr, "llamad: the CPU backend computes in f32 or f64, not %s\n",
               std::string(DTypeName(options.dtype)).c_str());
  std::abort();
}

}  // namespace llamad

namespace llamad {

double MeasureSgemmFlops(int m, int n, int k, double min_seconds) {
  std::vector<float> a(size_t(m) * k), b(size_t(n) * k), c(size_t(m) * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(RandomNormal(1, 0, i));
  for (size_t i = 0; i < b.size(); ++i) b[i] = float(RandomNormal(1, 1, i));
  const double flops = 2.0 * m * n * k;
  double best = 0, total = 0;
  cpu::Gemm(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n);  // warm up
  for (int rep = 0; rep < 1000 && (total < min_seconds || rep < 3); ++rep) {
    const double t0 = omp_get_wtime();
    cpu::Gemm(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n);
    const double dt = omp_get_wtime() - t0;
    total += dt;
    best = std::max(best, flops / dt);
  }
  return best;
}

}  // namespace llamad
