// The CUDA backend (see cuda_backend.h). Element types: activations and parameters
// bf16, everything marked [accum] in backend.h f32. Every op runs on the backend's one
// stream in call order; host-visible results (Download, SumSquares, the loss) wait for it.
#include "backend/cuda/cuda_backend_impl.h"

#include <cublasLt.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cudnn_attention.h"
#include "core/rng.h"

namespace llamad {
namespace cuda {
namespace {

#define LLAMAD_CUBLAS_CHECK(expr)                                                     \
  do {                                                                                \
    cublasStatus_t llamad_st_ = (expr);                                               \
    if (llamad_st_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::llamad::cuda::Fail(cublasLtGetStatusString(llamad_st_), __FILE__, __LINE__);  \
  } while (0)

constexpr unsigned kThreads = 256;

// This file is compiled by nvcc, which is kept away from absl and fmt.
template <typename... Args>
std::string Cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

// ---- element-wise kernels -------------------------------------------------------------

template <typename D, typename S>
__global__ void ConvertKernel(D* dst, const S* src, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = FromFloat<D>(ToFloat(src[i]));
}

template <typename T>
__global__ void FillKernel(T* x, size_t n, float value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = FromFloat<T>(value);
}

template <typename T>
__global__ void ScaleKernel(T* x, size_t n, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = FromFloat<T>(ToFloat(x[i]) * scale);
}

template <typename T>
__global__ void AddKernel(T* y, const T* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] = FromFloat<T>(ToFloat(y[i]) + ToFloat(x[i]));
}

// core/rng.h's counter-based normals on the device: the same uniforms, and the CPU's
// Box-Muller up to the last bit of the device's double-precision log and cos.
template <typename T>
__global__ void FillNormalKernel(T* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint64_t k = first + i;
    const double u1 = RandomUniform(seed, stream, 2 * k), u2 = RandomUniform(seed, stream, 2 * k + 1);
    x[i] = FromFloat<T>(float(std * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2)));
  }
}

// Fixed grid, fixed order: each block sums a fixed strided subset in double.
constexpr unsigned kSumBlocks = 1024;
template <typename T>
__global__ void SumSquaresKernel(double* partial, const T* x, size_t n) {
  __shared__ double scratch[32];
  double s = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const double v = ToFloat(x[i]);
    s += v * v;
  }
  s = BlockSum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void EmbeddingKernel(bf16* out, const int32_t* tokens, const bf16* table, int dim) {
  const size_t row = blockIdx.x;
  const bf16* src = table + size_t(tokens[row]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) out[row * dim + c] = src[c];
}

// One block per distinct token: adds its rows (in order) into its table row.
__global__ void EmbeddingBackwardKernel(float* dtable, const bf16* dout, const int32_t* unique,
                                        const int32_t* starts, const int32_t* rows, int dim) {
  const int u = blockIdx.x;
  float* dst = dtable + size_t(unique[u]) * dim;
  for (int c = threadIdx.x; c < dim; c += blockDim.x) {
    float sum = 0.f;
    for (int k = starts[u]; k < starts[u + 1]; ++k) sum += ToFloat(dout[size_t(rows[k]) * dim + c]);
    dst[c] += sum;
  }
}

// One block per row; each thread reads V consecutive elements at a time.
template <int V>
__global__ void RmsNormKernel(bf16* out, float* rstd, const bf16* x, const bf16* w, int dim,
                              float eps) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const bf16* xr = x + row * dim;
  float s = 0.f;
  for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
    float v[V];
    LoadBf16<V>(xr + c, v);
#pragma unroll
    for (int k = 0; k < V; ++k) s += v[k] * v[k];
  }
  s = BlockSum(s, scratch);
  const float r = rsqrtf(s / float(dim) + eps);
  for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
    float v[V], wv[V];
    LoadBf16<V>(xr + c, v);
    LoadBf16<V>(w + c, wv);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = v[k] * r * wv[k];
    StoreBf16<V>(out + row * dim + c, v);
  }
  if (threadIdx.x == 0) rstd[row] = r;
}

// dx = r * w * g - r^3 * x * mean(g * w * x); each block also sums g * x * r over its rows
// into its own row of `partial` [blocks, dim] (reduced in order by ReduceRowsKernel).
// A thread always owns the same columns, so its part of the block's dw row is its own.
template <int V>
__global__ void RmsNormBackwardKernel(bf16* dx, float* partial, const bf16* dout, const bf16* x,
                                      const bf16* w, const float* rstd, int n, int dim,
                                      bool accumulate) {
  __shared__ float scratch[32];
  extern __shared__ float dw_s[];
  for (int c = threadIdx.x; c < dim; c += blockDim.x) dw_s[c] = 0.f;
  __syncthreads();
  for (int row = blockIdx.x; row < n; row += gridDim.x) {
    const bf16* xr = x + size_t(row) * dim;
    const bf16* gr = dout + size_t(row) * dim;
    bf16* dxr = dx + size_t(row) * dim;
    const float r = rstd[row];
    float dot = 0.f;
    for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V];
      LoadBf16<V>(xr + c, xv);
      LoadBf16<V>(gr + c, gv);
      LoadBf16<V>(w + c, wv);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        dot += gv[k] * wv[k] * xv[k];
        dw_s[c + k] += gv[k] * xv[k] * r;
      }
    }
    dot = BlockSum(dot, scratch);
    const float k3 = r * r * r * dot / float(dim);
    for (int c = threadIdx.x * V; c < dim; c += blockDim.x * V) {
      float xv[V], gv[V], wv[V], out[V];
      LoadBf16<V>(xr + c, xv);
      LoadBf16<V>(gr + c, gv);
      LoadBf16<V>(w + c, wv);
      if (accumulate) LoadBf16<V>(dxr + c, out);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float v = r * wv[k] * gv[k] - k3 * xv[k];
        out[k] = accumulate ? out[k] + v : v;
      }
      StoreBf16<V>(dxr + c, out);
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < dim; c += blockDim.x) partial[size_t(blockIdx.x) * dim + c] = dw_s[c];
}

__global__ void ReduceRowsKernel(float* dst, const float* partial, int rows, int dim) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= dim) return;
  float s = 0.f;
  for (int r = 0; r < rows; ++r) s += partial[size_t(r) * dim + c];
  dst[c] += s;
}

__global__ void RopeTableKernel(float* table, int seq, int head_dim, double theta) {
  const int half = head_dim / 2;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= seq * half) return;
  const int pos = i / half, k = i % half;
  const double angle = pos * pow(theta, -2.0 * k / head_dim);
  table[2 * i] = float(cos(angle));
  table[2 * i + 1] = float(sin(angle));
}

// One thread per (row, rotated head, V consecutive i < D/2): rotates the pairs
// (i, i + D/2) by the position's angles.
template <int V>
__global__ void RopeKernel(bf16* qkv, const float* table, int n, int seq, int rotated, int head_dim,
                           int stride, float sign) {
  const int half = head_dim / 2, groups = half / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * rotated * groups) return;
  const int k = int(i % groups) * V;
  const int h = int((i / groups) % rotated);
  const int row = int(i / (size_t(groups) * rotated));
  const float* cs = table + (size_t(row % seq) * half + k) * 2;  // cos, sin of k, k + 1, ...
  bf16* v = qkv + size_t(row) * stride + size_t(h) * head_dim;
  float x1[V], x2[V];
  LoadBf16<V>(v + k, x1);
  LoadBf16<V>(v + k + half, x2);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float c = cs[2 * j], s = sign * cs[2 * j + 1];
    const float a = x1[j], b = x2[j];
    x1[j] = a * c - b * s;
    x2[j] = b * c + a * s;
  }
  StoreBf16<V>(v + k, x1);
  StoreBf16<V>(v + k + half, x2);
}

// One thread per V consecutive columns of one row: h = silu(gate) * up.
template <int V>
__global__ void SwiGluKernel(bf16* h, const bf16* gate_up, int n, int ffn) {
  const int groups = ffn / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * groups) return;
  const size_t row = i / groups, c = (i % groups) * V;
  float g[V], u[V];
  LoadBf16<V>(gate_up + row * 2 * ffn + c, g);
  LoadBf16<V>(gate_up + row * 2 * ffn + ffn + c, u);
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] = g[k] / (1.f + __expf(-g[k])) * u[k];
  StoreBf16<V>(h + row * ffn + c, g);
}

template <int V>
__global__ void SwiGluBackwardKernel(bf16* dgate_up, const bf16* dh, const bf16* gate_up, int n,
                                     int ffn) {
  const int groups = ffn / V;
  const size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= size_t(n) * groups) return;
  const size_t row = i / groups, c = (i % groups) * V;
  float g[V], u[V], d[V];
  LoadBf16<V>(gate_up + row * 2 * ffn + c, g);
  LoadBf16<V>(gate_up + row * 2 * ffn + ffn + c, u);
  LoadBf16<V>(dh + row * ffn + c, d);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float sig = 1.f / (1.f + __expf(-g[k]));
    const float dgate = d[k] * u[k] * sig * (1.f + g[k] * (1.f - sig));
    u[k] = d[k] * g[k] * sig;  // d up
    g[k] = dgate;
  }
  StoreBf16<V>(dgate_up + row * 2 * ffn + c, g);
  StoreBf16<V>(dgate_up + row * 2 * ffn + ffn + c, u);
}

// One block per row of f32 logits: the row's loss, and (dlogits != null) the gradient
// (softmax - onehot) * grad_scale in bf16. Ignored rows (target < 0) get 0 and zeros.
__global__ void CrossEntropyKernel(float* loss, bf16* dlogits, const float* logits,
                                   const int32_t* targets, int vocab, float grad_scale) {
  __shared__ float scratch[32];
  const size_t row = blockIdx.x;
  const float* l = logits + row * vocab;
  const int target = targets[row];
  if (target < 0) {
    if (dlogits != nullptr)
      for (int c = threadIdx.x; c < vocab; c += blockDim.x) dlogits[row * vocab + c] = FromFloat<bf16>(0.f);
    if (threadIdx.x == 0) loss[row] = 0.f;
    return;
  }
  float m = -INFINITY;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, l[c]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  __shared__ float warp_max[32];
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();
  m = -INFINITY;
  for (int k = 0; k < int(blockDim.x / 32); ++k) m = fmaxf(m, warp_max[k]);
  float s = 0.f;
  for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += __expf(l[c] - m);
  s = BlockSum(s, scratch);
  const float lse = m + logf(s);
  if (threadIdx.x == 0) loss[row] = lse - l[target];
  if (dlogits != nullptr) {
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
      const float p = __expf(l[c] - lse) - (c == target ? 1.f : 0.f);
      dlogits[row * vocab + c] = FromFloat<bf16>(p * grad_scale);
    }
  }
}

// AdamW on f32 master weights (or on the parameters themselves when master is null and
// the parameters are f32), writing the bf16 rounding into param.
template <typename P>
__global__ void AdamWKernel(P* param, float* master, const float* grad, float* m, float* v,
                            size_t n, float b1, float b2, float eps, float grad_scale,
                            float step_size, float inv_bias2_sqrt, float decay) {
  // Each operation rounded on its own (no contraction into fused multiply-adds), in the
  // CPU kernel's order (cpu/adamw_simd.h): the host-offloaded update on the CPU and this
  // one give bit-identical weights.
  const float c1 = __fsub_rn(1.f, b1), c2 = __fsub_rn(1.f, b2);
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = __fmul_rn(grad[i], grad_scale);
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(c1, g));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(c2, g), g));
    m[i] = mi;
    v[i] = vi;
    const float p0 = master != nullptr ? master[i] : ToFloat(param[i]);
    const float denominator = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), inv_bias2_sqrt), eps);
    const float p = __fsub_rn(__fmul_rn(p0, decay), __fdiv_rn(__fmul_rn(step_size, mi), denominator));
    if (master != nullptr) master[i] = p;
    param[i] = FromFloat<P>(p);
  }
}

// ---- cuBLASLt ---------------------------------------------------------------------------

// Column-major GEMM C[m, n] = op(A)[m, k] . op(B)[k, n] + beta * C, bf16 operands, f32
// accumulation, C in bf16 or f32. Descriptors and the chosen algorithm are cached per
// shape, layout and alignment.
class Gemm {
 public:
  explicit Gemm(cudaStream_t stream) : stream_(stream) {
    LLAMAD_CUBLAS_CHECK(cublasLtCreate(&handle_));
    LLAMAD_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspace));
  }
  ~Gemm() {
    for (auto& [key, plan] : plans_) {
      cublasLtMatmulDescDestroy(plan.op);
      cublasLtMatrixLayoutDestroy(plan.a);
      cublasLtMatrixLayoutDestroy(plan.b);
      cublasLtMatrixLayoutDestroy(plan.c);
    }
    cudaFree(workspace_);
    cublasLtDestroy(handle_);
  }

  void Run(bool ta, bool tb, int m, int n, int k, const bf16* A, int lda, const bf16* B, int ldb,
           float beta, void* C, cudaDataType ctype, int ldc) {
    const int align = std::min({Alignment(A), Alignment(B), Alignment(C)});
    const Key key{ta, tb, m, n, k, lda, ldb, ldc, int(ctype), align};
    auto it = plans_.find(key);
    if (it == plans_.end()) it = plans_.emplace(key, MakePlan(key)).first;
    const Plan& p = it->second;
    const float alpha = 1.f;
    LLAMAD_CUBLAS_CHECK(cublasLtMatmul(handle_, p.op, &alpha, A, p.a, B, p.b, &beta, C, p.c, C,
                                       p.c, &p.algo, workspace_, kWorkspace, stream_));
  }

 private:
  static constexpr size_t kWorkspace = size_t{64} << 20;
  using Key = std::tuple<bool, bool, int, int, int, int, int, int, int, int>;
  struct Plan {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
  };

  static int Alignment(const void* p) {
    const uintptr_t v = reinterpret_cast<uintptr_t>(p);
    int a = 256;
    while (a > 2 && v % a != 0) a /= 2;
    return a;
  }

  Plan MakePlan(const Key& key) {
    const auto [ta, tb, m, n, k, lda, ldb, ldc, ctype, align] = key;
    Plan p;
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof(opa)));
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof(opb)));
    LLAMAD_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, ta ? k : m, ta ? m : k, lda));
    LLAMAD_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, tb ? n : k, tb ? k : n, ldb));
    LLAMAD_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, cudaDataType(ctype), m, n, ldc));
    cublasLtMatmulPreference_t pref;
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWorkspace;
    const uint32_t al = uint32_t(align);
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      LLAMAD_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof(al)));
    }
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    LLAMAD_CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1,
                                                       &result, &found));
    cublasLtMatmulPreferenceDestroy(pref);
    if (found == 0) {
      Fail(Cat("cuBLASLt has no algorithm for m=", m, " n=", n, " k=", k, " (alignment ", align,
                  ")").c_str(), __FILE__, __LINE__);
    }
    p.algo = result.algo;
    return p;
  }

  cudaStream_t stream_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  std::map<Key, Plan> plans_;
};

// ---- the backend ----------------------------------------------------------------------

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(const CudaBackendOptions& options) : options_(options) {
    LLAMAD_CUDA_CHECK(cudaSetDevice(options.device));
    LLAMAD_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    gemm_ = std::make_unique<Gemm>(stream_);
    if (options.attention != CudaAttention::kLlamad) {
      std::string why;
      cudnn_ = CudnnAttention::Create(stream_, &why);
      if (cudnn_ == nullptr && options.attention == CudaAttention::kCudnn) {
        Fail(why.c_str(), __FILE__, __LINE__);  // MakeCudaBackend checked this first
      }
    }
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    cudnn_.reset();
    gemm_.reset();
    for (auto& [address, alloc] : allocs_) cudaFree(reinterpret_cast<void*>(address));
    for (void* p : scratch_) cudaFree(p);
    cudaStreamDestroy(stream_);
  }

  std::string_view name() const override { return "cuda"; }
  DType dtype() const override { return DType::kBF16; }
  DType accum_dtype() const override { return DType::kF32; }

  // ---- memory ----
  using Backend::Allocate;
  void* Allocate(size_t numel, DType type) override {
    if (type != DType::kBF16 && type != DType::kF32) {
      Fail(Cat("the CUDA backend has no ", std::string(DTypeName(type)), " buffers").c_str(), __FILE__, __LINE__);
    }
    const size_t bytes = std::max<size_t>(256, (numel * DTypeSize(type) + 255) / 256 * 256);
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      size_t free_bytes = 0, total = 0;
      cudaMemGetInfo(&free_bytes, &total);
      std::fprintf(stderr, "llamad: out of GPU memory allocating %zu bytes (%zu of %zu free, %zu held)\n",
                   bytes, free_bytes, total, allocated_);
      std::abort();
    }
    LLAMAD_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
    allocs_[reinterpret_cast<uintptr_t>(p)] = {bytes, type};
    allocated_ += bytes;
    peak_ = std::max(peak_, allocated_bytes());
    return p;
  }
  void PinHostMemory(void* host, size_t bytes) override {
    if (const cudaError_t err = cudaHostRegister(host, bytes, cudaHostRegisterDefault); err != cudaSuccess) {
      (void)cudaGetLastError();  // stays pageable: slower copies, same results
      // Said once: the copies of that memory no longer overlap the GPU's work.
      static std::once_flag said;
      std::call_once(said, [&] {
        std::fprintf(stderr, "llama-train: pinning %zu bytes of host memory failed (%s); copies of it stay "
                     "pageable and do not overlap the GPU's work\n", bytes, cudaGetErrorString(err));
      });
    }
  }
  void UnpinHostMemory(void* host) override {
    if (cudaHostUnregister(host) != cudaSuccess) (void)cudaGetLastError();
  }
  void Free(void* buffer) override {
    if (buffer == nullptr) return;
    auto it = allocs_.find(reinterpret_cast<uintptr_t>(buffer));
    if (it == allocs_.end()) Fail("Free of a buffer this backend did not allocate", __FILE__, __LINE__);
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    allocated_ -= it->second.bytes;
    allocs_.erase(it);
    LLAMAD_CUDA_CHECK(cudaFree(buffer));
  }
  // cuDNN's attention workspace is its own allocation, but GPU memory all the same.
  size_t allocated_bytes() const override {
    return allocated_ + (cudnn_ != nullptr ? cudnn_->workspace_bytes() : 0);
  }
  size_t peak_allocated_bytes() const override { return peak_; }
  size_t device_memory_bytes() const override {
    size_t free_bytes = 0, total = 0;
    if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return free_bytes;
    (void)cudaGetLastError();  // answered with 0: the next launch check must not see it
    return 0;
  }
  void ResetPeak() override { peak_ = allocated_bytes(); }
  void Synchronize() override { LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_)); }
  DType BufferType(const void* buffer, size_t n) const override { return TypeOf(buffer, n); }
  cudaStream_t stream() const { return stream_; }
  int device() const { return options_.device; }

  void Upload(void* dst, const double* src, size_t n) override {
    std::vector<float> f(src, src + n);
    UploadF32(dst, f.data(), n);
  }
  void Download(double* dst, const void* src, size_t n) override {
    std::vector<float> f(n);
    DownloadF32(f.data(), src, n);
    std::copy(f.begin(), f.end(), dst);
  }
  // Host copies may come from other threads (the host-offloaded optimizer's), whose
  // current device is not necessarily this backend's: a runtime call there would start a
  // context on that other GPU.
  void BindDevice() const {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess || current != options_.device) {
      LLAMAD_CUDA_CHECK(cudaSetDevice(options_.device));
    }
  }
  static constexpr size_t kStagingElements = kCudaStagingElements;

  void UploadF32(void* dst, const float* src, size_t n) override {
    UploadF32Async(dst, src, n);
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));  // src may go away
  }
  void UploadF32Async(void* dst, const float* src, size_t n) override {
    BindDevice();
    if (TypeOf(dst, n) == DType::kF32) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyHostToDevice, stream_));
    } else {
      float* staging = Scratch<float>(staging_, std::min(n, kStagingElements));
      for (size_t done = 0; done < n; done += kStagingElements) {
        const size_t count = std::min(kStagingElements, n - done);
        LLAMAD_CUDA_CHECK(cudaMemcpyAsync(staging, src + done, count * 4, cudaMemcpyHostToDevice, stream_));
        ConvertKernel<<<Blocks(count, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(dst) + done, staging,
                                                                          count);
        LLAMAD_CUDA_LAUNCHED();
      }
    }
  }
  void DownloadF32(float* dst, const void* src, size_t n) override {
    BindDevice();
    if (TypeOf(src, n) == DType::kF32) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyDeviceToHost, stream_));
    } else {
      float* staging = Scratch<float>(staging_, std::min(n, kStagingElements));
      for (size_t done = 0; done < n; done += kStagingElements) {
        const size_t count = std::min(kStagingElements, n - done);
        ConvertKernel<<<Blocks(count, kThreads), kThreads, 0, stream_>>>(
            staging, static_cast<const bf16*>(src) + done, count);
        LLAMAD_CUDA_LAUNCHED();
        LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst + done, staging, count * 4, cudaMemcpyDeviceToHost, stream_));
      }
    }
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  void Copy(void* dst, const void* src, size_t n) override {
    const DType dt = TypeOf(dst, n), st = TypeOf(src, n);
    if (dt == st) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * DTypeSize(dt), cudaMemcpyDeviceToDevice, stream_));
      return;
    }
    if (dt == DType::kBF16) {
      ConvertKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(dst), static_cast<const float*>(src), n);
    } else {
      ConvertKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<float*>(dst), static_cast<const bf16*>(src), n);
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  void Zero(void* x, size_t n) override {
    LLAMAD_CUDA_CHECK(cudaMemsetAsync(x, 0, n * DTypeSize(TypeOf(x, n)), stream_));
  }
  void Add(void* y, const void* x, size_t n) override {
    const DType type = TypeOf(y, n);
    if (TypeOf(x, n) != type) Fail("Add of buffers of different element types", __FILE__, __LINE__);
    if (type == DType::kF32) {
      AddKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<float*>(y), static_cast<const float*>(x), n);
    } else {
      AddKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(y), static_cast<const bf16*>(x), n);
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  void Scale(void* x, double scale, size_t n) override {
    if (TypeOf(x, n) == DType::kF32) {
      ScaleKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<float*>(x), n, float(scale));
    } else {
      ScaleKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(x), n, float(scale));
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  void Fill(void* x, size_t n, double value) override {
    if (TypeOf(x, n) == DType::kF32) {
      FillKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<float*>(x), n, float(value));
    } else {
      FillKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(x), n, float(value));
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  void FillNormal(void* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) override {
    if (TypeOf(x, n) == DType::kF32) {
      FillNormalKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<float*>(x), n, std, seed, stream,
                                                                        first);
    } else {
      FillNormalKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(static_cast<bf16*>(x), n, std, seed, stream,
                                                                       first);
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  double SumSquares(const void* x, size_t n) override {
    double* partial = Scratch<double>(sum_partial_, kSumBlocks);
    if (TypeOf(x, n) == DType::kF32) {
      SumSquaresKernel<<<kSumBlocks, kThreads, 0, stream_>>>(partial, static_cast<const float*>(x), n);
    } else {
      SumSquaresKernel<<<kSumBlocks, kThreads, 0, stream_>>>(partial, static_cast<const bf16*>(x), n);
    }
    LLAMAD_CUDA_LAUNCHED();
    std::vector<double> host(kSumBlocks);
    LLAMAD_CUDA_CHECK(cudaMemcpyAsync(host.data(), partial, kSumBlocks * sizeof(double), cudaMemcpyDeviceToHost, stream_));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    double total = 0;
    for (double s : host) total += s;
    return total;
  }

  // ---- layers ----
  // Row-major y[n, out] = x[n, in] . w[out, in]^T is column-major y' = w'^T x'.
  void Linear(void* y, const void* x, const void* w, int n, int in, int out,
              bool accumulate) override {
    gemm_->Run(true, false, out, n, in, B(w), in, B(x), in, accumulate ? 1.f : 0.f, y,
               CUDA_R_16BF, out);
  }
  void LinearBackward(void* dx, void* dw, const void* dy, const void* x, const void* w, int n,
                      int in, int out, bool accumulate_dx) override {
    if (dx != nullptr) {
      gemm_->Run(false, false, in, n, out, B(w), in, B(dy), out, accumulate_dx ? 1.f : 0.f, dx,
                 CUDA_R_16BF, in);
    }
    gemm_->Run(false, true, in, out, n, B(x), in, B(dy), out, 1.f, dw, CUDA_R_32F, in);
  }

  void Embedding(void* out, const int32_t* tokens, const void* table, int n, int dim) override {
    if (n == 0) return;
    const int32_t* d_tokens = UploadIds(tokens, n, ids_);
    EmbeddingKernel<<<n, 128, 0, stream_>>>(static_cast<bf16*>(out), d_tokens, B(table), dim);
    LLAMAD_CUDA_LAUNCHED();
  }
  void EmbeddingBackward(void* dtable, const void* dout, const int32_t* tokens, int n,
                         int dim) override {
    if (n == 0) return;
    // Rows grouped by token on the host, so that each table row is summed by one block
    // in row order: no atomics, the same result every run.
    std::vector<int32_t> rows(n);
    std::iota(rows.begin(), rows.end(), 0);
    std::stable_sort(rows.begin(), rows.end(), [&](int a, int b) { return tokens[a] < tokens[b]; });
    std::vector<int32_t> unique, starts;
    for (int k = 0; k < n; ++k) {
      if (k == 0 || tokens[rows[k]] != tokens[rows[k - 1]]) {
        unique.push_back(tokens[rows[k]]);
        starts.push_back(k);
      }
    }
    starts.push_back(n);
    std::vector<int32_t> packed;
    packed.reserve(unique.size() + starts.size() + rows.size());
    packed.insert(packed.end(), unique.begin(), unique.end());
    packed.insert(packed.end(), starts.begin(), starts.end());
    packed.insert(packed.end(), rows.begin(), rows.end());
    const int32_t* d = UploadIds(packed.data(), packed.size(), grouping_);
    EmbeddingBackwardKernel<<<unsigned(unique.size()), 128, 0, stream_>>>(
        F(dtable), B(dout), d, d + unique.size(), d + unique.size() + starts.size(), dim);
    LLAMAD_CUDA_LAUNCHED();
  }

  void RmsNorm(void* out, void* rstd, const void* x, const void* w, int n, int dim,
               double eps) override {
    if (n == 0) return;
    if (VectorsFit(8, dim, {out, x, w})) {
      RmsNormKernel<8><<<n, kThreads, 0, stream_>>>(static_cast<bf16*>(out), F(rstd), B(x), B(w), dim, float(eps));
    } else {
      RmsNormKernel<1><<<n, kThreads, 0, stream_>>>(static_cast<bf16*>(out), F(rstd), B(x), B(w), dim, float(eps));
    }
    LLAMAD_CUDA_LAUNCHED();
  }
  void RmsNormBackward(void* dx, void* dw, const void* dout, const void* x, const void* w,
                       const void* rstd, int n, int dim, bool accumulate_dx) override {
    if (n == 0) return;
    const int blocks = std::min(n, 512);
    float* partial = Scratch<float>(norm_partial_, size_t(blocks) * dim);
    const int smem = dim * int(sizeof(float));  // the block's dw row
    auto launch = [&](auto kernel) {
      if (smem > 48 * 1024) {
        LLAMAD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      }
      kernel<<<blocks, kThreads, smem, stream_>>>(static_cast<bf16*>(dx), partial, B(dout), B(x), B(w),
                                                  static_cast<const float*>(rstd), n, dim, accumulate_dx);
      LLAMAD_CUDA_LAUNCHED();
    };
    if (VectorsFit(8, dim, {dx, dout, x, w})) {
      launch(RmsNormBackwardKernel<8>);
    } else {
      launch(RmsNormBackwardKernel<1>);
    }
    ReduceRowsKernel<<<(dim + 255) / 256, 256, 0, stream_>>>(F(dw), partial, blocks, dim);
    LLAMAD_CUDA_LAUNCHED();
  }

  void RopeTable(void* table, int seq, int head_dim, double theta) override {
    const int n = seq * (head_dim / 2);
    RopeTableKernel<<<(n + 255) / 256, 256, 0, stream_>>>(F(table), seq, head_dim, theta);
    LLAMAD_CUDA_LAUNCHED();
  }
  void Rope(void* qkv, const void* table, const AttentionShape& s, bool inverse) override {
    const int rotated = s.heads + s.kv_heads, n = s.batch * s.seq, half = s.head_dim / 2;
    auto launch = [&](auto kernel, int v) {
      const size_t threads = size_t(n) * rotated * (half / v);
      kernel<<<unsigned((threads + 255) / 256), 256, 0, stream_>>>(
          static_cast<bf16*>(qkv), static_cast<const float*>(table), n, s.seq, rotated, s.head_dim,
          s.row_stride(), inverse ? -1.f : 1.f);
      LLAMAD_CUDA_LAUNCHED();
    };
    // Pairs of columns at once where each head's halves and rows stay 4-byte aligned.
    if (half % 2 == 0 && s.row_stride() % 2 == 0 && VectorsFit(2, 2, {qkv})) {
      launch(RopeKernel<2>, 2);
    } else {
      launch(RopeKernel<1>, 1);
    }
  }

  // cuDNN's fused attention where it runs the shape, else the own kernels (whose tile is
  // their own, 64; `block` only matters to the CPU reference). Both give the same
  // log-sum-exp, so a forward of one pairs with a backward of the other.
  void Attention(void* out, void* lse, const void* qkv, const AttentionShape& s,
                 int block) override {
    const AttentionArgs args = Args(s);
    std::string why;
    if (cudnn_ != nullptr && cudnn_->Forward(out, F(lse), qkv, args, &why)) {
      peak_ = std::max(peak_, allocated_bytes());  // the workspace may have grown
      return;
    }
    CudnnFellBack(why);
    AttentionForward(static_cast<bf16*>(out), F(lse), B(qkv), args, stream_);
  }
  void AttentionBackward(void* dqkv, const void* dout, const void* out, const void* lse,
                         const void* qkv, const AttentionShape& s, int block) override {
    const AttentionArgs args = Args(s);
    std::string why;
    if (cudnn_ != nullptr &&
        cudnn_->Backward(dqkv, dout, out, static_cast<const float*>(lse), qkv, args, &why)) {
      peak_ = std::max(peak_, allocated_bytes());
      return;
    }
    CudnnFellBack(why);
    float* delta = Scratch<float>(delta_, size_t(s.batch) * s.heads * s.seq);
    cuda::AttentionBackward(static_cast<bf16*>(dqkv), delta, B(dout), B(out),
                            static_cast<const float*>(lse), B(qkv), args, stream_);
  }

  void SwiGlu(void* h, const void* gate_up, int n, int ffn) override {
    if (VectorsFit(8, ffn, {h, gate_up})) {
      LaunchRows(SwiGluKernel<8>, size_t(n) * ffn / 8, static_cast<bf16*>(h), B(gate_up), n, ffn);
    } else {
      LaunchRows(SwiGluKernel<1>, size_t(n) * ffn, static_cast<bf16*>(h), B(gate_up), n, ffn);
    }
  }
  void SwiGluBackward(void* dgate_up, const void* dh, const void* gate_up, int n, int ffn) override {
    if (VectorsFit(8, ffn, {dgate_up, dh, gate_up})) {
      LaunchRows(SwiGluBackwardKernel<8>, size_t(n) * ffn / 8, static_cast<bf16*>(dgate_up), B(dh),
                 B(gate_up), n, ffn);
    } else {
      LaunchRows(SwiGluBackwardKernel<1>, size_t(n) * ffn, static_cast<bf16*>(dgate_up), B(dh),
                 B(gate_up), n, ffn);
    }
  }

  double LmHeadCrossEntropy(const void* x, const void* w, const int32_t* targets, int n, int dim,
                            int vocab, double grad_scale, void* dx, void* dw) override {
    if (n == 0) return 0.0;
    const int chunk = LmHeadChunkRows(options_.lm_head_chunk_elements, vocab, n);
    float* logits = Scratch<float>(logits_, size_t(chunk) * vocab);
    bf16* dlogits = dx != nullptr ? Scratch<bf16>(dlogits_, size_t(chunk) * vocab) : nullptr;
    float* losses = Scratch<float>(losses_, size_t(n));
    const int32_t* d_targets = UploadIds(targets, n, ids_);
    const bf16* xb = B(x);
    for (int r0 = 0; r0 < n; r0 += chunk) {
      const int rows = std::min(chunk, n - r0);
      const bf16* xc = xb + size_t(r0) * dim;
      gemm_->Run(true, false, vocab, rows, dim, B(w), dim, xc, dim, 0.f, logits, CUDA_R_32F, vocab);
      CrossEntropyKernel<<<rows, 512, 0, stream_>>>(losses + r0, dlogits, logits, d_targets + r0, vocab,
                                                    float(grad_scale));
      LLAMAD_CUDA_LAUNCHED();
      if (dx == nullptr) continue;
      gemm_->Run(false, false, dim, rows, vocab, B(w), dim, dlogits, vocab, 0.f,
                 static_cast<bf16*>(dx) + size_t(r0) * dim, CUDA_R_16BF, dim);
      gemm_->Run(false, true, dim, vocab, rows, xc, dim, dlogits, vocab, 1.f, dw, CUDA_R_32F, dim);
    }
    std::vector<float> host(n);
    LLAMAD_CUDA_CHECK(cudaMemcpyAsync(host.data(), losses, size_t(n) * 4, cudaMemcpyDeviceToHost, stream_));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));
    double sum = 0;
    for (float l : host) sum += l;
    return sum;
  }

  void AdamW(void* param, void* master, const void* grad, void* m, void* v, size_t n,
             const AdamWStep& s) override {
    const float step_size = float(s.lr / (1.0 - std::pow(s.beta1, double(s.step))));
    const float inv_bias2_sqrt = float(1.0 / std::sqrt(1.0 - std::pow(s.beta2, double(s.step))));
    const float decay = float(1.0 - s.lr * s.weight_decay);
    auto launch = [&](auto* p) {
      AdamWKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(
          p, F(master), static_cast<const float*>(grad), F(m), F(v), n, float(s.beta1),
          float(s.beta2), float(s.eps), float(s.grad_scale), step_size, inv_bias2_sqrt, decay);
    };
    if (TypeOf(param, n) == DType::kF32) {
      launch(F(param));
    } else {
      if (master == nullptr) Fail("AdamW on bf16 parameters needs f32 master weights", __FILE__, __LINE__);
      launch(static_cast<bf16*>(param));
    }
    LLAMAD_CUDA_LAUNCHED();
  }

 private:
  struct Alloc {
    size_t bytes;
    DType type;
  };
  struct ScratchBuffer {
    void* data = nullptr;
    size_t bytes = 0;
  };

  // One thread per work item (`threads` of them), 256 to a block.
  template <typename... KernelArgs, typename... Args>
  void LaunchRows(void (*kernel)(KernelArgs...), size_t threads, Args... args) {
    if (threads == 0) return;
    kernel<<<unsigned((threads + 255) / 256), 256, 0, stream_>>>(args...);
    LLAMAD_CUDA_LAUNCHED();
  }

  // After cuDNN declined a shape: an error where cuDNN was asked for, else a note (once
  // per reason) that the own kernels run instead.
  void CudnnFellBack(const std::string& why) {
    if (cudnn_ == nullptr) return;
    if (options_.attention == CudaAttention::kCudnn) {
      Fail(Cat("attention: ", why).c_str(), __FILE__, __LINE__);
    }
    if (fallback_reasons_.insert(why).second) {
      std::fprintf(stderr, "llamad: attention: %s; running llamad's flash kernels instead\n", why.c_str());
    }
  }

  static const bf16* B(const void* p) { return static_cast<const bf16*>(p); }
  static float* F(void* p) { return static_cast<float*>(p); }
  AttentionArgs Args(const AttentionShape& s) const {
    if (!AttentionSupportsHeadDim(s.head_dim))
      Fail(Cat("attention: head_dim ", s.head_dim, " (the CUDA kernels take 32, 64 or 128)").c_str(), __FILE__, __LINE__);
    return {s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, options_.attention_backward_stages};
  }

  // The element type of the allocation holding [p, p + n elements).
  DType TypeOf(const void* p, size_t n) const {
    const uintptr_t v = reinterpret_cast<uintptr_t>(p);
    auto it = allocs_.upper_bound(v);
    if (it == allocs_.begin()) Fail("pointer outside every buffer of this backend", __FILE__, __LINE__);
    --it;
    const Alloc& a = it->second;
    if (v + n * DTypeSize(a.type) > it->first + a.bytes) {
      Fail("range runs past the end of its buffer", __FILE__, __LINE__);
    }
    return a.type;
  }

  // A growing device scratch buffer (not counted as model memory: it is the op's own).
  template <typename T>
  T* Scratch(ScratchBuffer& s, size_t numel) {
    const size_t bytes = std::max<size_t>(numel * sizeof(T), 256);
    if (bytes > s.bytes) {
      LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));
      if (s.data != nullptr) {
        scratch_.erase(std::find(scratch_.begin(), scratch_.end(), s.data));
        LLAMAD_CUDA_CHECK(cudaFree(s.data));
      }
      LLAMAD_CUDA_CHECK(cudaMalloc(&s.data, bytes));
      scratch_.push_back(s.data);
      s.bytes = bytes;
    }
    return static_cast<T*>(s.data);
  }

  // Host ids to a device scratch buffer, ordered on the stream. The source is pageable
  // (the caller's), so the call waits for the stream to drain and the copy to finish:
  // the caller may reuse its array at once. bench-gpu --timeline shows what such waits
  // cost a step.
  const int32_t* UploadIds(const int32_t* host, size_t n, ScratchBuffer& device) {
    int32_t* d = Scratch<int32_t>(device, n);
    LLAMAD_CUDA_CHECK(cudaMemcpyAsync(d, host, n * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(stream_));  // pageable source: wait before returning
    return d;
  }

  CudaBackendOptions options_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Gemm> gemm_;
  std::unique_ptr<CudnnAttention> cudnn_;  // null: the own attention kernels
  std::set<std::string> fallback_reasons_;
  std::map<uintptr_t, Alloc> allocs_;
  std::vector<void*> scratch_;
  size_t allocated_ = 0, peak_ = 0;
  ScratchBuffer staging_, sum_partial_, ids_, grouping_, norm_partial_, delta_, logits_, dlogits_,
      losses_;
};

}  // namespace
}  // namespace cuda

bool CudaBackendBuilt() { return true; }

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

bool CudaDeviceVanished() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) cudaGetLastError();
  return err == cudaErrorNoDevice;
}

std::string CudaDeviceDescription(int device) {
  cudaDeviceProp prop{};
  if (CudaDeviceCount() <= device || cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    return "no CUDA device";
  }
  return cuda::Cat(prop.name, " (sm_", prop.major, prop.minor, ", ", prop.multiProcessorCount,
                " SMs, ", prop.totalGlobalMem >> 20, " MiB)");
}

double CudaPeakBf16Flops(int device) {
  cudaDeviceProp prop{};
  if (CudaDeviceCount() <= device || cudaGetDeviceProperties(&prop, device) != cudaSuccess) return 0;
  const std::string name = prop.name;
  // Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts).
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos ||
      name.find("H800") != std::string::npos || name.find("GH200") != std::string::npos) {
    return name.find("PCIe") != std::string::npos ? 756e12 : 989e12;
  }
  if (name.find("A100") != std::string::npos || name.find("A800") != std::string::npos) return 312e12;
  // Unknown part: measure an 8192^3 GEMM (the best of a few), the same way for every run.
  auto backend = NewCudaBackend({device});
  Backend& be = *backend;
  const int n = 8192;
  void* a = be.Allocate(size_t(n) * n);
  void* b = be.Allocate(size_t(n) * n);
  void* c = be.Allocate(size_t(n) * n);
  be.FillNormal(a, size_t(n) * n, 1.0, 1, 1);
  be.FillNormal(b, size_t(n) * n, 1.0, 1, 2);
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    be.SumSquares(c, 1);  // synchronizes
    const auto t0 = std::chrono::steady_clock::now();
    be.Linear(c, a, b, n, n, n, false);
    be.SumSquares(c, 1);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * double(n) * n / s);
  }
  be.Free(a);
  be.Free(b);
  be.Free(c);
  return best;
}

bool CudnnAttentionAvailable(int device, std::string* why) {
  // The probe's cuDNN handle belongs to the current device: make it the rank's GPU, so a
  // rank never starts a context on another rank's GPU.
  if (cudaSetDevice(device) != cudaSuccess) {
    *why = "cannot select GPU " + std::to_string(device);
    return false;
  }
  return cuda::CudnnAttention::Create(nullptr, why) != nullptr;
}

std::unique_ptr<Backend> NewCudaBackend(const CudaBackendOptions& options) {
  return std::make_unique<cuda::CudaBackend>(options);
}

bool CudaStreamOf(Backend& backend, int* device, void** stream) {
  auto* cuda = dynamic_cast<cuda::CudaBackend*>(&backend);
  if (cuda == nullptr) return false;
  *device = cuda->device();
  *stream = cuda->stream();
  return true;
}

}  // namespace llamad
