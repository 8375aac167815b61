// The own flash attention kernels' source (backend/cuda/attention_kernels.cuh), run on
// the CPU emulator (cuda_emulator.h) against the float64 CPU backend: forward and
// backward, at every head dimension, with both backward pipelines, batches split into
// grid slices, and the asynchronous copies landing both as early and as late as CUDA
// allows. This checks the kernels' indexing, fragment layouts, masking, copy pipeline
// and shared-memory sizes where no GPU is present; their speed, and the GPU's own
// arithmetic, are for the `gpu` tests.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "engine/emulated_gpu.h"

// The kernels call the emulator's intrinsics, so they come after it.
#include "backend/cuda/attention_kernels.cuh"
#include "backend/cpu/cpu_backend.h"

namespace llamad {
namespace {

using cuda::bf16;
using testing::EmulatedGpu;
using testing::Guarded;
using testing::OnDevice;
using testing::Poisoned;
using testing::RelError;
using testing::Values;
using Vec = std::vector<double>;

std::string Describe(const AttentionShape& s) {
  return "B" + std::to_string(s.batch) + " T" + std::to_string(s.seq) + " H" + std::to_string(s.heads) + " Hkv" +
         std::to_string(s.kv_heads) + " D" + std::to_string(s.head_dim);
}

struct Case {
  AttentionShape shape;
  int backward_stages = 0;  // 0: as the shared memory allows
  int shared_limit = int(cuda::emulator::Emulator::kSharedBytes);
  int max_grid_y = cuda::kMaxGridY;
  cuda::emulator::Options options;
};

// The emulated kernels' outputs, as floats.
struct Result {
  Vec out, lse, dqkv;
};

class AttentionEmulationTest : public testing::SeededTest<> {
 protected:
  // Runs the forward and the backward of `c` on the emulator (the backward from `dout`).
  Result Emulate(const Case& c, const Vec& qkv_values, const Vec& dout_values) {
    const AttentionShape& s = c.shape;
    const size_t rows = size_t(s.batch) * s.seq, stats = size_t(s.batch) * s.heads * s.seq;
    Guarded<bf16> qkv = OnDevice<bf16>(qkv_values), dout = OnDevice<bf16>(dout_values);
    Guarded<bf16> out = Poisoned<bf16>(rows * s.heads * s.head_dim), dqkv = Poisoned<bf16>(qkv.size());
    Guarded<float> lse = Poisoned<float>(stats), delta = Poisoned<float>(stats);

    cuda::emulator::Emulator emulator(c.options);
    emulator.AllowReads(qkv.data(), qkv.size() * sizeof(bf16));
    emulator.AllowReads(dout.data(), dout.size() * sizeof(bf16));
    EmulatedGpu gpu{emulator, c.max_grid_y, c.shared_limit};
    cuda::AttentionArgs args{s.batch, s.seq, s.heads, s.kv_heads, s.head_dim, c.backward_stages};
    cuda::flash::Forward(gpu, out.data(), lse.data(), qkv.data(), args);
    cuda::flash::Backward(gpu, dqkv.data(), delta.data(), dout.data(), out.data(), lse.data(), qkv.data(), args);
    EXPECT_TRUE(delta.GuardsIntact()) << "a kernel wrote outside its output";
    return {Values(out), Values(lse), Values(dqkv)};
  }

  struct Inputs {
    Vec qkv, dout;
  };
  Inputs Draw(const AttentionShape& s) {
    const size_t rows = size_t(s.batch) * s.seq;
    return {Random(rows * s.row_stride()), Random(rows * s.heads * s.head_dim)};
  }

  // Emulate, with a kernel's broken rule as a test failure (and an empty result).
  Result TryEmulate(const Case& c, const Inputs& in) {
    Result r;
    testing::Emulate([&] { r = Emulate(c, in.qkv, in.dout); });
    return r;
  }

  // The emulated result against the CPU backend in float64. The emulator rounds to bf16
  // where the kernels do and sums exactly, so its errors are the bf16 roundings alone
  // (about 2e-3 measured): the bounds are twice that, tighter than a GPU's (cuda_test.cc).
  void ExpectMatchesCpu(const AttentionShape& s, const Inputs& in, const Result& r) {
    if (r.out.empty()) return;  // the run failed
    auto cpu = MakeCpuBackend({DType::kF64, 0});
    testing::CpuBuffers buffers(*cpu);
    void* qkv = buffers.Upload(in.qkv);
    void* out = buffers.Upload(r.out);
    void* lse = buffers.Upload(r.lse);
    cpu->Attention(out, lse, qkv, s, s.seq);
    const double out_error = RelError(r.out, buffers.Download(out, r.out.size()));
    const double lse_error = RelError(r.lse, buffers.Download(lse, r.lse.size()));
    EXPECT_LE(out_error, 4e-3) << "out";
    EXPECT_LE(lse_error, 1e-6) << "lse";
    std::string errors = fmt::format("out {:.2e}, lse {:.2e}", out_error, lse_error);
    // The backward from the emulated (rounded) output on both sides, as on the GPU.
    void* dqkv = buffers.Upload(Vec(in.qkv.size(), 0.0));
    cpu->AttentionBackward(dqkv, buffers.Upload(in.dout), buffers.Upload(r.out), buffers.Upload(r.lse), qkv, s,
                           s.seq);
    const Vec ref = buffers.Download(dqkv, in.qkv.size());
    const auto emulated = testing::QkvParts(r.dqkv, s), reference = testing::QkvParts(ref, s);
    for (int part = 0; part < 3; ++part) {
      const char* name = testing::kQkvGradientNames[part];
      const double error = RelError(emulated[part], reference[part]);
      EXPECT_LE(error, 5e-3) << name;
      errors += fmt::format(", {} {:.2e}", name, error);
    }
    std::printf("%s: relative errors %s\n", Describe(s).c_str(), errors.c_str());
  }

  // Checks `c` against the CPU and returns its result.
  Result Check(const Case& c, const Inputs& in) {
    const Result r = TryEmulate(c, in);
    ExpectMatchesCpu(c.shape, in, r);
    return r;
  }
};

bool SameBits(const Result& a, const Result& b) {
  auto same = [](const Vec& x, const Vec& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0;
  };
  return same(a.out, b.out) && same(a.lse, b.lse) && same(a.dqkv, b.dqkv);
}

// The shapes of the GPU tests that reach every kind of tile edge.
const AttentionShape kShapes[] = {
    {2, 130, 4, 2, 64},   // partial last tile, GQA 2
    {1, 200, 4, 1, 128},  // partial 32-key and 128-query tiles, GQA 4
    {2, 70, 8, 4, 32},    // the tiny preset's heads
    {1, 17, 4, 4, 64},    // shorter than one tile, MHA
};

TEST_F(AttentionEmulationTest, MatchesTheCpuBackend) {
  std::vector<AttentionShape> shapes(std::begin(kShapes), std::end(kShapes));
  shapes.push_back({1, 256, 2, 1, 128});  // whole tiles only, head dim 128
  shapes.push_back({1, 300, 2, 1, 32});   // several blocks and key tiles
  shapes.push_back({1, 385, 8, 2, 64});   // GQA 4, one row past a tile
  for (const AttentionShape& s : shapes) {
    SCOPED_TRACE(Describe(s));
    Check({s}, Draw(s));
  }
}

// The copy pipeline is right only if no thread reads a buffer before its copies are
// waited for and no copy lands in a buffer a warp still reads. Copies landing as late as
// CUDA allows, with the warps in step, show the first (a read finds NaN); copies landing
// as early as it allows, with one warp far ahead of the others, show the second (other
// bits).
TEST_F(AttentionEmulationTest, EverySchedulingGivesTheSameBits) {
  for (const AttentionShape& s : {kShapes[0], kShapes[1]}) {
    for (int stages : {1, 2}) {
      SCOPED_TRACE(Describe(s) + ", backward stages " + std::to_string(stages));
      const Inputs in = Draw(s);
      Case late{s, stages};
      const Result r = Check(late, in);
      for (cuda::emulator::Turns turns : {cuda::emulator::Turns::kFirstThreadFirst,
                                          cuda::emulator::Turns::kLastThreadFirst}) {
        Case c = late;
        c.options = {.copies_land_when_issued = true, .turns = turns};
        EXPECT_TRUE(SameBits(TryEmulate(c, in), r))
            << "copies landing when issued, with the "
            << (turns == cuda::emulator::Turns::kFirstThreadFirst ? "first" : "last")
            << " warp running ahead, changed the result";
      }
    }
  }
}

// One and two backward stages differ only in when copies are issued: the same bits.
TEST_F(AttentionEmulationTest, OneAndTwoBackwardStagesGiveTheSameBits) {
  for (const AttentionShape& s : {kShapes[0], kShapes[2]}) {
    SCOPED_TRACE(Describe(s));
    const Inputs in = Draw(s);
    const Result two = Check({s, 2}, in);
    EXPECT_TRUE(SameBits(TryEmulate({s, 1}, in), two));
  }
}

// At head dim 128 on a GPU with 99 KiB of shared memory a block (sm_86, sm_89) the
// backward takes one stage by itself; the launches fit.
TEST_F(AttentionEmulationTest, SmallSharedMemoryTakesOneBackwardStage) {
  const AttentionShape s = kShapes[1];
  Case c{s};
  c.shared_limit = 99 * 1024;
  Check(c, Draw(s));
}

// A batch whose (sequence, head) pairs pass the grid's limit runs in slices; shrinking
// the limit to 5 makes every sequence its own slice.
TEST_F(AttentionEmulationTest, BatchesPastTheGridLimitRunInSlices) {
  const AttentionShape s{3, 70, 4, 2, 32};
  const Inputs in = Draw(s);
  Case sliced{s};
  sliced.max_grid_y = 5;
  const Result r = Check(sliced, in);
  EXPECT_TRUE(SameBits(TryEmulate({s}, in), r)) << "slices gave other bits than one launch";
}

}  // namespace
}  // namespace llamad
