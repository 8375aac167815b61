// Writes one float32 forward/backward of a small LLaMA for the numpy reference
// (check_reference.py): PREFIX.json (config, parameter layout, tokens, targets, loss)
// and PREFIX.bin (parameters then gradients, little-endian float32).
//
//   reference_dump PREFIX [--checkpoint] [--unfused]
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "model/llama.h"

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  if (argc < 2) {
    std::fprintf(stderr, "usage: reference_dump PREFIX [--checkpoint] [--unfused]\n");
    return 2;
  }
  const std::string prefix = argv[1];
  llamad::LlamaOptions options;
  options.attention_block = 8;  // several tiles over the sequence of 24
  for (int i = 2; i < argc; ++i) {
    if (std::strcmp(argv[i], "--checkpoint") == 0) options.grad_checkpoint = true;
    if (std::strcmp(argv[i], "--unfused") == 0) options.attention_block = 0;
  }
  llamad::ModelConfig c;
  c.name = "reference";
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.vocab_size = 50;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500.0;  // a small base so that rotations are large at short range
  const int batch = 2, seq = 24;

  auto backend = llamad::MakeCpuBackend({llamad::DType::kF32, 0});
  llamad::LlamaModel model(c, backend.get(), options);
  model.InitWeights(2024);
  // Scale the 0.02 init up so that attention is far from uniform, and move the norm
  // weights off 1, so that every term of the math matters.
  std::vector<float> params(model.num_params());
  backend->DownloadF32(params.data(), model.param_data(), params.size());
  for (const auto& p : model.params()) {
    for (size_t i = 0; i < p.numel; ++i) {
      float& v = params[p.offset + i];
      v = p.shape.size() == 2 ? v * 8 : float(1.0 + 0.2 * llamad::RandomNormal(7, p.offset, i));
    }
  }
  backend->UploadF32(model.param_data(), params.data(), params.size());

  std::vector<int32_t> tokens(batch * seq), targets(batch * seq);
  for (int i = 0; i < batch * seq; ++i) {
    tokens[i] = int32_t(llamad::RandomBits(3, 0, i) % c.vocab_size);
    targets[i] = i % 11 == 5 ? -1 : int32_t(llamad::RandomBits(3, 1, i) % c.vocab_size);
  }
  int count = 0;
  for (int t : targets) count += t >= 0;
  model.ZeroGrads();
  const double loss_sum = model.ForwardBackward(tokens.data(), targets.data(), batch, seq, 1.0 / count);
  std::vector<float> grads(model.num_params());
  backend->DownloadF32(grads.data(), model.grad_data(), grads.size());

  nlohmann::json layout = nlohmann::json::array();
  for (const auto& p : model.params()) {
    layout.push_back({{"name", p.name}, {"shape", p.shape}, {"offset", p.offset}, {"numel", p.numel}});
  }
  nlohmann::json out = {
      {"config",
       {{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
        {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
        {"num_key_value_heads", c.num_key_value_heads}, {"vocab_size", c.vocab_size},
        {"rms_norm_eps", c.rms_norm_eps}, {"rope_theta", c.rope_theta}}},
      {"batch", batch}, {"seq", seq}, {"tokens", tokens}, {"targets", targets},
      {"loss", loss_sum / count}, {"num_params", model.num_params()}, {"params", layout}};
  std::ofstream(prefix + ".json") << out.dump(1);
  std::ofstream bin(prefix + ".bin", std::ios::binary);
  bin.write(reinterpret_cast<const char*>(params.data()), params.size() * sizeof(float));
  bin.write(reinterpret_cast<const char*>(grads.data()), grads.size() * sizeof(float));
  return bin.good() ? 0 : 1;
}
