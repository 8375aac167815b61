#include "backend/cpu/blas_kernels.h"

#include <unistd.h>

#include <cstdlib>
#include <initializer_list>
#include <cstring>

#include "core/self_executable.h"

extern "C" char* openblas_get_corename(void);

namespace llamad {
namespace {

// 0: generic, 1: AVX2 + FMA kernels, 2: AVX-512 kernels.
int KernelLevel(const char* core) {
  for (const char* name : {"SkylakeX", "Cooperlake", "SapphireRapids"}) {
    if (std::strcmp(core, name) == 0) return 2;
  }
  for (const char* name : {"Haswell", "Zen", "Zen3", "Zen4"}) {
    if (std::strcmp(core, name) == 0) return 1;
  }
  return 0;
}

}  // namespace

const char* BlasCoreName() { return openblas_get_corename(); }

void SelectBlasKernels(char** argv) {
#if defined(__x86_64__)
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr || std::getenv("LLAMAD_BLAS_REEXEC") != nullptr) {
    return;
  }
  __builtin_cpu_init();
  const char* best = nullptr;
  int level = 0;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    best = __builtin_cpu_supports("avx512bf16") ? "COOPERLAKE" : "SKYLAKEX";
    level = 2;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = "HASWELL";
    level = 1;
  }
  if (best == nullptr || KernelLevel(BlasCoreName()) >= level) return;
  setenv("OPENBLAS_CORETYPE", best, 1);
  setenv("LLAMAD_BLAS_REEXEC", "1", 1);
  const std::string self = SelfExecutable();
  execv(self.c_str(), argv);
  // Still here: the exec failed; carry on with the generic kernels.
  unsetenv("OPENBLAS_CORETYPE");
#else
  (void)argv;
#endif
}

}  // namespace llamad
