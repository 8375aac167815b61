// cuDNN fused attention (see cudnn_attention.h).
#include "backend/cuda/cudnn_attention.h"

#ifdef LLAMAD_HAVE_CUDNN_FRONTEND

#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>
#include <map>
#include <tuple>

#include <cudnn_frontend.h>

// The frontend resolves every cuDNN call through this handle (dynamic loading).
namespace cudnn_frontend {
void* cudnn_dlhandle = nullptr;
}

namespace llamad::cuda {
namespace {

namespace fe = cudnn_frontend;

// Tensor ids of the graphs' inputs and outputs.
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kdO, kdQ, kdK, kdV };

// cuDNN's fused SDPA with grouped-query heads and a causal mask, forward and backward.
constexpr size_t kMinVersion = 90000;

class CudnnAttentionImpl final : public CudnnAttention {
 public:
  CudnnAttentionImpl(cudnnHandle_t handle, size_t version, cudaStream_t stream)
      : handle_(handle), version_(version), stream_(stream) {}
  ~CudnnAttentionImpl() override {
    graphs_.clear();
    if (workspace_ != nullptr) cudaFree(workspace_);
    fe::detail::destroy_handle(handle_);
  }

  size_t workspace_bytes() const override { return workspace_bytes_; }
  std::string Version() const override {
    return std::to_string(version_ / 10000) + "." + std::to_string(version_ / 100 % 100) + "." +
           std::to_string(version_ % 100);
  }

  bool Forward(void* out, float* lse, const void* qkv, const AttentionArgs& a,
               std::string* why) override {
    const Graph* g = Get(a, /*backward=*/false, why);
    if (g == nullptr) return false;
    const auto* base = static_cast<const uint16_t*>(qkv);  // bf16 elements
    std::unordered_map<int64_t, void*> pack = {
        {kQ, const_cast<uint16_t*>(base)},
        {kK, const_cast<uint16_t*>(base + size_t(a.heads) * a.head_dim)},
        {kV, const_cast<uint16_t*>(base + size_t(a.heads + a.kv_heads) * a.head_dim)},
        {kO, out},
        {kStats, lse}};
    return Execute(*g, pack, why);
  }

  bool Backward(void* dqkv, const void* dout, const void* out, const float* lse, const void* qkv,
                const AttentionArgs& a, std::string* why) override {
    const Graph* g = Get(a, /*backward=*/true, why);
    if (g == nullptr) return false;
    const size_t k_at = size_t(a.heads) * a.head_dim, v_at = size_t(a.heads + a.kv_heads) * a.head_dim;
    auto* base = const_cast<uint16_t*>(static_cast<const uint16_t*>(qkv));
    auto* dbase = static_cast<uint16_t*>(dqkv);
    std::unordered_map<int64_t, void*> pack = {
        {kQ, base},           {kK, base + k_at},   {kV, base + v_at},
        {kO, const_cast<void*>(out)}, {kdO, const_cast<void*>(dout)},
        {kStats, const_cast<float*>(lse)},
        {kdQ, dbase},         {kdK, dbase + k_at}, {kdV, dbase + v_at}};
    return Execute(*g, pack, why);
  }

 private:
  struct Graph {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
  };
  using Key = std::tuple<int, int, int, int, int, bool>;

  // The graph of one shape, built on first use; null (with why) when cuDNN has no engine
  // for it, which is remembered so that the shape is not tried again.
  const Graph* Get(const AttentionArgs& a, bool backward, std::string* why) {
    const Key key{a.batch, a.seq, a.heads, a.kv_heads, a.head_dim, backward};
    auto it = graphs_.find(key);
    if (it == graphs_.end()) {
      Graph g;
      std::string error;
      try {
        error = Build(a, backward, g);
      } catch (const std::exception& e) {
        error = e.what();
      }
      if (!error.empty()) {
        failures_[key] = error;
        g.graph.reset();
      }
      it = graphs_.emplace(key, std::move(g)).first;
    }
    if (it->second.graph == nullptr) {
      *why = failures_[key];
      return nullptr;
    }
    return &it->second;
  }

  // Views of the packed layouts: [B, heads, T, D] with rows `row` elements apart.
  static std::vector<int64_t> Dims(int64_t b, int64_t heads, int64_t t, int64_t d) { return {b, heads, t, d}; }
  static std::vector<int64_t> RowStrides(int64_t t, int64_t d, int64_t row) { return {t * row, d, row, 1}; }

  std::string Build(const AttentionArgs& a, bool backward, Graph& out) {
    const int64_t B = a.batch, T = a.seq, H = a.heads, Hkv = a.kv_heads, D = a.head_dim;
    const int64_t qkv_row = (H + 2 * Hkv) * D, out_row = H * D;
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto tensor = [&](const char* name, int64_t uid, int64_t heads, int64_t row) {
      return graph->tensor(fe::graph::Tensor_attributes()
                               .set_name(name)
                               .set_uid(uid)
                               .set_dim(Dims(B, heads, T, D))
                               .set_stride(RowStrides(T, D, row)));
    };
    auto q = tensor("Q", kQ, H, qkv_row), k = tensor("K", kK, Hkv, qkv_row), v = tensor("V", kV, Hkv, qkv_row);
    const float scale = float(1.0 / std::sqrt(double(D)));
    const std::vector<int64_t> stats_dims = {B, H, T, 1}, stats_strides = {H * T, T, 1, 1};
    if (!backward) {
      auto [o, stats] = graph->sdpa(
          q, k, v,
          fe::graph::SDPA_attributes().set_name("attention").set_generate_stats(true)
              .set_causal_mask(true).set_attn_scale(scale));
      o->set_output(true).set_uid(kO).set_dim(Dims(B, H, T, D)).set_stride(RowStrides(T, D, out_row));
      stats->set_output(true).set_uid(kStats).set_data_type(fe::DataType_t::FLOAT)
          .set_dim(stats_dims).set_stride(stats_strides);
    } else {
      auto o = tensor("O", kO, H, out_row);
      auto dout = tensor("dO", kdO, H, out_row);
      auto stats = graph->tensor(fe::graph::Tensor_attributes()
                                     .set_name("Stats")
                                     .set_uid(kStats)
                                     .set_dim(stats_dims)
                                     .set_stride(stats_strides)
                                     .set_data_type(fe::DataType_t::FLOAT));
      // Deterministic: the same gradients every run, as the own kernels give.
      auto [dq, dk, dv] = graph->sdpa_backward(
          q, k, v, o, dout, stats,
          fe::graph::SDPA_backward_attributes().set_name("attention_backward")
              .set_causal_mask(true).set_attn_scale(scale).set_deterministic_algorithm(true));
      dq->set_output(true).set_uid(kdQ).set_dim(Dims(B, H, T, D)).set_stride(RowStrides(T, D, qkv_row));
      dk->set_output(true).set_uid(kdK).set_dim(Dims(B, Hkv, T, D)).set_stride(RowStrides(T, D, qkv_row));
      dv->set_output(true).set_uid(kdV).set_dim(Dims(B, Hkv, T, D)).set_stride(RowStrides(T, D, qkv_row));
    }
    for (auto step : {std::function<fe::error_t()>([&] { return graph->validate(); }),
                      std::function<fe::error_t()>([&] { return graph->build_operation_graph(handle_); }),
                      std::function<fe::error_t()>([&] { return graph->create_execution_plans({fe::HeurMode_t::A}); }),
                      std::function<fe::error_t()>([&] { return graph->check_support(handle_); }),
                      std::function<fe::error_t()>([&] { return graph->build_plans(handle_); })}) {
      fe::error_t status = step();
      if (!status.is_good()) return "cuDNN: " + status.get_message();
    }
    int64_t workspace = 0;
    if (fe::error_t status = graph->get_workspace_size(workspace); !status.is_good()) {
      return "cuDNN: " + status.get_message();
    }
    out.graph = std::move(graph);
    out.workspace = workspace;
    return "";
  }

  bool Execute(const Graph& g, std::unordered_map<int64_t, void*>& pack, std::string* why) {
    if (size_t(g.workspace) > workspace_bytes_) {
      // The old workspace may still be in use by queued work on the stream.
      if (workspace_ != nullptr) {
        cudaStreamSynchronize(stream_);
        cudaFree(workspace_);
        workspace_ = nullptr;
        workspace_bytes_ = 0;
      }
      if (cudaMalloc(&workspace_, size_t(g.workspace)) != cudaSuccess) {
        cudaGetLastError();
        *why = "cuDNN attention: no GPU memory for its " + std::to_string(g.workspace) + "-byte workspace";
        return false;
      }
      workspace_bytes_ = size_t(g.workspace);
    }
    try {
      fe::error_t status = g.graph->execute(handle_, pack, workspace_);
      if (!status.is_good()) {
        *why = "cuDNN: " + status.get_message();
        return false;
      }
    } catch (const std::exception& e) {
      *why = std::string("cuDNN: ") + e.what();
      return false;
    }
    return true;
  }

  cudnnHandle_t handle_;
  size_t version_;
  cudaStream_t stream_;
  std::map<Key, Graph> graphs_;
  std::map<Key, std::string> failures_;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
};

}  // namespace

bool CudnnAttention::Built() { return true; }

std::unique_ptr<CudnnAttention> CudnnAttention::Create(cudaStream_t stream, std::string* why) {
  if (fe::cudnn_dlhandle == nullptr) {
    for (const char* name : {"libcudnn_graph.so.9", "libcudnn.so.9"}) {
      fe::cudnn_dlhandle = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
      if (fe::cudnn_dlhandle != nullptr) break;
    }
    if (fe::cudnn_dlhandle == nullptr) {
      *why = "cuDNN 9 is not installed (libcudnn_graph.so.9 not found)";
      return nullptr;
    }
  }
  try {
    const size_t version = fe::detail::get_backend_version();
    if (version < kMinVersion) {
      *why = "cuDNN " + std::to_string(version) + " is older than 9.0";
      return nullptr;
    }
    cudnnHandle_t handle = nullptr;
    if (fe::detail::create_handle(&handle) != CUDNN_STATUS_SUCCESS) {
      *why = "cuDNN: cudnnCreate failed";
      return nullptr;
    }
    if (fe::detail::set_stream(handle, stream) != CUDNN_STATUS_SUCCESS) {
      fe::detail::destroy_handle(handle);
      *why = "cuDNN: cudnnSetStream failed";
      return nullptr;
    }
    return std::make_unique<CudnnAttentionImpl>(handle, version, stream);
  } catch (const std::exception& e) {
    *why = std::string("cuDNN: ") + e.what();
    return nullptr;
  }
}

}  // namespace llamad::cuda

#else  // no cuDNN frontend in this build

namespace llamad::cuda {

bool CudnnAttention::Built() { return false; }

std::unique_ptr<CudnnAttention> CudnnAttention::Create(cudaStream_t, std::string* why) {
  *why = "this build has no cuDNN attention (the cuDNN frontend headers were not found)";
  return nullptr;
}

}  // namespace llamad::cuda

#endif
