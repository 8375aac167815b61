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
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "backend/cuda/cuda_common.cuh"
#include "backend/cuda/cudnn_attention.h"
#include "backend/cuda/gpu_device.cuh"
#include "backend/cuda/layer_kernels.cuh"

namespace llamad {
namespace cuda {
namespace {

#define LLAMAD_CUBLAS_CHECK(expr)                                                     \
  do {                                                                                \
    cublasStatus_t llamad_st_ = (expr);                                               \
    if (llamad_st_ != CUBLAS_STATUS_SUCCESS)                                          \
      ::llamad::cuda::Fail(cublasLtGetStatusString(llamad_st_), __FILE__, __LINE__);  \
  } while (0)

// This file is compiled by nvcc, which is kept away from absl and fmt.
template <typename... Args>
std::string Cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
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
    LLAMAD_CUDA_CHECK(cudaStreamCreateWithFlags(&gpu_.stream, cudaStreamNonBlocking));
    gemm_ = std::make_unique<Gemm>(gpu_.stream);
    if (options.attention != CudaAttention::kLlamad) {
      std::string why;
      cudnn_ = CudnnAttention::Create(gpu_.stream, &why);
      if (cudnn_ == nullptr && options.attention == CudaAttention::kCudnn) {
        Fail(why.c_str(), __FILE__, __LINE__);  // MakeCudaBackend checked this first
      }
    }
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(gpu_.stream);
    cudnn_.reset();
    gemm_.reset();
    for (auto& [address, alloc] : allocs_) cudaFree(reinterpret_cast<void*>(address));
    for (void* p : scratch_) cudaFree(p);
    cudaStreamDestroy(gpu_.stream);
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
    LLAMAD_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, gpu_.stream));
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
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));
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
  void Synchronize() override { LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream)); }
  DType BufferType(const void* buffer, size_t n) const override { return TypeOf(buffer, n); }
  cudaStream_t stream() const { return gpu_.stream; }
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
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));  // src may go away
  }
  void UploadF32Async(void* dst, const float* src, size_t n) override {
    BindDevice();
    if (TypeOf(dst, n) == DType::kF32) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyHostToDevice, gpu_.stream));
    } else {
      float* staging = Scratch<float>(staging_, std::min(n, kStagingElements));
      for (size_t done = 0; done < n; done += kStagingElements) {
        const size_t count = std::min(kStagingElements, n - done);
        LLAMAD_CUDA_CHECK(cudaMemcpyAsync(staging, src + done, count * 4, cudaMemcpyHostToDevice, gpu_.stream));
        layers::Convert(gpu_, static_cast<bf16*>(dst) + done, staging, count);
      }
    }
  }
  void DownloadF32(float* dst, const void* src, size_t n) override {
    BindDevice();
    if (TypeOf(src, n) == DType::kF32) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * 4, cudaMemcpyDeviceToHost, gpu_.stream));
    } else {
      float* staging = Scratch<float>(staging_, std::min(n, kStagingElements));
      for (size_t done = 0; done < n; done += kStagingElements) {
        const size_t count = std::min(kStagingElements, n - done);
        layers::Convert(gpu_, staging, static_cast<const bf16*>(src) + done, count);
        LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst + done, staging, count * 4, cudaMemcpyDeviceToHost, gpu_.stream));
      }
    }
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));
  }
  void Copy(void* dst, const void* src, size_t n) override {
    const DType dt = TypeOf(dst, n), st = TypeOf(src, n);
    if (dt == st) {
      LLAMAD_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * DTypeSize(dt), cudaMemcpyDeviceToDevice, gpu_.stream));
      return;
    }
    if (dt == DType::kBF16) {
      layers::Convert(gpu_, static_cast<bf16*>(dst), static_cast<const float*>(src), n);
    } else {
      layers::Convert(gpu_, static_cast<float*>(dst), static_cast<const bf16*>(src), n);
    }
  }
  void Zero(void* x, size_t n) override {
    LLAMAD_CUDA_CHECK(cudaMemsetAsync(x, 0, n * DTypeSize(TypeOf(x, n)), gpu_.stream));
  }
  void Add(void* y, const void* x, size_t n) override {
    const DType type = TypeOf(y, n);
    if (TypeOf(x, n) != type) Fail("Add of buffers of different element types", __FILE__, __LINE__);
    if (type == DType::kF32) {
      layers::Add(gpu_, static_cast<float*>(y), static_cast<const float*>(x), n);
    } else {
      layers::Add(gpu_, static_cast<bf16*>(y), static_cast<const bf16*>(x), n);
    }
  }
  void Scale(void* x, double scale, size_t n) override {
    if (TypeOf(x, n) == DType::kF32) {
      layers::Scale(gpu_, static_cast<float*>(x), n, float(scale));
    } else {
      layers::Scale(gpu_, static_cast<bf16*>(x), n, float(scale));
    }
  }
  void Fill(void* x, size_t n, double value) override {
    if (TypeOf(x, n) == DType::kF32) {
      layers::Fill(gpu_, static_cast<float*>(x), n, float(value));
    } else {
      layers::Fill(gpu_, static_cast<bf16*>(x), n, float(value));
    }
  }
  void FillNormal(void* x, size_t n, double std, uint64_t seed, uint64_t stream, uint64_t first) override {
    if (TypeOf(x, n) == DType::kF32) {
      layers::FillNormal(gpu_, static_cast<float*>(x), n, std, seed, stream, first);
    } else {
      layers::FillNormal(gpu_, static_cast<bf16*>(x), n, std, seed, stream, first);
    }
  }
  double SumSquares(const void* x, size_t n) override {
    using layers::kSumBlocks;
    double* partial = Scratch<double>(sum_partial_, kSumBlocks);
    if (TypeOf(x, n) == DType::kF32) {
      layers::SumSquaresPartials(gpu_, partial, static_cast<const float*>(x), n);
    } else {
      layers::SumSquaresPartials(gpu_, partial, static_cast<const bf16*>(x), n);
    }
    std::vector<double> host(kSumBlocks);
    LLAMAD_CUDA_CHECK(
        cudaMemcpyAsync(host.data(), partial, kSumBlocks * sizeof(double), cudaMemcpyDeviceToHost, gpu_.stream));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));
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
    layers::Embedding(gpu_, static_cast<bf16*>(out), UploadIds(tokens, n, ids_), B(table), n, dim);
  }
  void EmbeddingBackward(void* dtable, const void* dout, const int32_t* tokens, int n,
                         int dim) override {
    if (n == 0) return;
    const layers::TokenGroups groups = layers::GroupRowsByToken(tokens, n);
    const int32_t* device_groups = UploadIds(groups.packed.data(), groups.packed.size(), grouping_);
    layers::EmbeddingBackward(gpu_, F(dtable), B(dout), device_groups, groups.distinct, dim);
  }

  void RmsNorm(void* out, void* rstd, const void* x, const void* w, int n, int dim,
               double eps) override {
    layers::RmsNorm(gpu_, static_cast<bf16*>(out), F(rstd), B(x), B(w), n, dim, float(eps));
  }
  void RmsNormBackward(void* dx, void* dw, const void* dout, const void* x, const void* w,
                       const void* rstd, int n, int dim, bool accumulate_dx) override {
    if (n == 0) return;
    float* partial = Scratch<float>(norm_partial_, size_t(layers::RmsNormBackwardBlocks(n)) * dim);
    layers::RmsNormBackward(gpu_, static_cast<bf16*>(dx), F(dw), partial, B(dout), B(x), B(w),
                            static_cast<const float*>(rstd), n, dim, accumulate_dx);
  }

  void RopeTable(void* table, int seq, int head_dim, double theta) override {
    layers::RopeTable(gpu_, F(table), seq, head_dim, theta);
  }
  void Rope(void* qkv, const void* table, const AttentionShape& s, bool inverse) override {
    layers::Rope(gpu_, static_cast<bf16*>(qkv), static_cast<const float*>(table), s, inverse);
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
    AttentionForward(static_cast<bf16*>(out), F(lse), B(qkv), args, gpu_.stream);
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
                            static_cast<const float*>(lse), B(qkv), args, gpu_.stream);
  }

  void SwiGlu(void* h, const void* gate_up, int n, int ffn) override {
    layers::SwiGlu(gpu_, static_cast<bf16*>(h), B(gate_up), n, ffn);
  }
  void SwiGluBackward(void* dgate_up, const void* dh, const void* gate_up, int n, int ffn) override {
    layers::SwiGluBackward(gpu_, static_cast<bf16*>(dgate_up), B(dh), B(gate_up), n, ffn);
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
      layers::CrossEntropy(gpu_, losses + r0, dlogits, logits, d_targets + r0, rows, vocab, float(grad_scale));
      if (dx == nullptr) continue;
      gemm_->Run(false, false, dim, rows, vocab, B(w), dim, dlogits, vocab, 0.f,
                 static_cast<bf16*>(dx) + size_t(r0) * dim, CUDA_R_16BF, dim);
      gemm_->Run(false, true, dim, vocab, rows, xc, dim, dlogits, vocab, 1.f, dw, CUDA_R_32F, dim);
    }
    std::vector<float> host(n);
    LLAMAD_CUDA_CHECK(cudaMemcpyAsync(host.data(), losses, size_t(n) * 4, cudaMemcpyDeviceToHost, gpu_.stream));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));
    double sum = 0;
    for (float l : host) sum += l;
    return sum;
  }

  void AdamW(void* param, void* master, const void* grad, void* m, void* v, size_t n,
             const AdamWStep& s) override {
    if (TypeOf(param, n) == DType::kF32) {
      layers::AdamW(gpu_, F(param), F(master), static_cast<const float*>(grad), F(m), F(v), n, s);
    } else {
      if (master == nullptr) Fail("AdamW on bf16 parameters needs f32 master weights", __FILE__, __LINE__);
      layers::AdamW(gpu_, static_cast<bf16*>(param), F(master), static_cast<const float*>(grad), F(m), F(v), n, s);
    }
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
      LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));
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
    LLAMAD_CUDA_CHECK(cudaMemcpyAsync(d, host, n * sizeof(int32_t), cudaMemcpyHostToDevice, gpu_.stream));
    LLAMAD_CUDA_CHECK(cudaStreamSynchronize(gpu_.stream));  // pageable source: wait before returning
    return d;
  }

  CudaBackendOptions options_;
  Gpu gpu_{nullptr};  // the backend's stream, on which every kernel and copy runs
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
