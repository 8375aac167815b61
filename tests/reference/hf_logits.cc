// Prints the engine's float32 logits for a Hugging Face model folder, for
// check_transformers.py: hf_logits HF_DIR OUT.bin TOKEN...
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <vector>

#include "backend/cpu/blas_kernels.h"
#include "backend/cpu/cpu_backend.h"
#include "train/checkpointing.h"

int main(int argc, char** argv) {
  llamad::SelectBlasKernels(argv);
  if (argc < 4) {
    std::fprintf(stderr, "usage: hf_logits HF_DIR OUT.bin TOKEN...\n");
    return 2;
  }
  auto config = llamad::ReadHuggingFaceConfig(argv[1]);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  auto backend = llamad::MakeCpuBackend({llamad::DType::kF32, 0});
  llamad::LlamaModel model(*config, backend.get());
  if (auto s = llamad::LoadHuggingFaceWeights(argv[1], model, *backend); !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 2;
  }
  std::vector<int32_t> tokens;
  for (int i = 3; i < argc; ++i) tokens.push_back(std::atoi(argv[i]));
  std::vector<float> logits(tokens.size() * size_t(config->vocab_size));
  model.Logits(tokens.data(), 1, int(tokens.size()), logits.data());
  std::ofstream(argv[2], std::ios::binary).write(reinterpret_cast<const char*>(logits.data()),
                                                 std::streamsize(logits.size() * 4));
  return 0;
}
