#include "engine/cuda_emulator.h"

#include <fmt/format.h>

#include <boost/context/fiber.hpp>
#include <boost/context/pooled_fixedsize_stack.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <stdexcept>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace llamad::cuda::emulator {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  bool in;
};

enum class Op { kMma, kLdmatrix, kLdmatrixTrans, kShuffle };
const char* NameOf(Op op) {
  switch (op) {
    case Op::kMma: return "mma";
    case Op::kLdmatrix: return "ldmatrix";
    case Op::kLdmatrixTrans: return "ldmatrix.trans";
    case Op::kShuffle: return "shfl.xor";
  }
  return "?";
}

// What one lane brings to a warp collective, and what it gets back.
struct LaneIn {
  Op op;
  const unsigned char* row;  // ldmatrix
  uint32_t a[4], b0, b1;     // mma
  float c[4];                // mma
  double value;              // shuffle (a float or a double)
  unsigned mask;
  int lane_mask;
};
struct LaneOut {
  uint32_t r[4];
  float c[4];
  double value;
};

// A warp's collectives alternate between two slots: a lane can only reach collective
// k + 2 once every lane has reached k + 1, so by then all have read their result of k.
struct Slot {
  int arrived = 0;
  uint64_t generation = 0;
  LaneIn in[32];
  LaneOut out[32];
};

struct Thread {
  boost::context::fiber fiber;      // the thread, seen from the scheduler
  boost::context::fiber scheduler;  // the scheduler, seen from the thread
  bool done = false;
  const char* waiting_at = nullptr;  // where the thread waits for others, if it does
  const uint64_t* wait_on = nullptr;  // it waits until this generation counter moves on
  uint64_t wait_value = 0;
  uint64_t collectives = 0;
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;
};

// The block that runs, for the intrinsics.
struct Block {
  const Options* options;
  const std::vector<std::pair<const unsigned char*, size_t>>* readable;
  unsigned char* shared;
  size_t shared_bytes;
  uint3 index;
  std::vector<Thread>* threads;
  std::vector<Slot> slots;  // two a warp
  int current = -1;
  int barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  std::string error;
};
Block* g_block = nullptr;

Thread& Self() { return (*g_block->threads)[g_block->current]; }

std::string Where(int thread) {
  return fmt::format("block ({},{},{}) thread {}", g_block->index.x, g_block->index.y, g_block->index.z, thread);
}

void Yield() {
  Thread& self = Self();
  self.scheduler = std::move(self.scheduler).resume();
}

// Waits until `generation` moves past `value` (the scheduler resumes the thread only then).
void WaitFor(const char* place, const uint64_t& generation, uint64_t value) {
  Thread& self = Self();
  self.waiting_at = place;
  self.wait_on = &generation;
  self.wait_value = value;
  Yield();
  self.wait_on = nullptr;
  self.waiting_at = nullptr;
}

// Ends the run with `what`: the scheduler never resumes this fiber.
[[noreturn]] void Fail(const std::string& what) {
  if (g_block->error.empty()) g_block->error = Where(g_block->current) + ": " + what;
  for (;;) Yield();
}

void Perform(const Copy& c) {
  if (c.in) {
    std::memcpy(c.dst, c.src, 16);
  } else {
    std::memset(c.dst, 0, 16);
  }
}

void CheckShared(const void* p, const char* what) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < g_block->shared || b + 16 > g_block->shared + g_block->shared_bytes) {
    Fail(fmt::format("{} at byte {} of shared memory, outside the launch's {} bytes", what,
                     b - g_block->shared, g_block->shared_bytes));
  }
  if (reinterpret_cast<uintptr_t>(b) % 16 != 0) Fail(fmt::format("{} at a shared address not 16-byte aligned", what));
}

uint16_t Bits(const unsigned char* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t PackBits(uint16_t lo, uint16_t hi) { return uint32_t(lo) | uint32_t(hi) << 16; }
float Low(uint32_t r) {
  uint16_t h = uint16_t(r & 0xffffu);
  __nv_bfloat16 v;
  std::memcpy(&v, &h, 2);
  return __bfloat162float(v);
}
float High(uint32_t r) { return Low(r >> 16); }

// The results of a collective every lane of a warp reached, from the PTX ISA's layouts.
void Compute(Slot& s) {
  const Op op = s.in[0].op;
  for (int l = 1; l < 32; ++l) {
    if (s.in[l].op != op || (op == Op::kShuffle && s.in[l].lane_mask != s.in[0].lane_mask)) {
      auto at = [](const LaneIn& in) {
        return in.op == Op::kShuffle ? fmt::format("shfl.xor {}", in.lane_mask) : std::string(NameOf(in.op));
      };
      Fail(fmt::format("the lanes of a warp diverged: lane 0 is at {}, lane {} at {}", at(s.in[0]), l, at(s.in[l])));
    }
  }
  switch (op) {
    case Op::kShuffle:
      for (int l = 0; l < 32; ++l) {
        if (s.in[l].mask != 0xffffffffu) Fail("shfl.xor with a partial mask");
        s.out[l].value = s.in[l ^ s.in[0].lane_mask].value;
      }
      break;
    case Op::kLdmatrix:
    case Op::kLdmatrixTrans:
      // x4: lanes 8i..8i+7 name the rows of matrix i (8 elements each). Lane l gets, in
      // register i, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1; transposed, rows
      // 2 (l % 4) and 2 (l % 4) + 1 of column l / 4. The first element in the low half.
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
          auto at = [&](int row, int col) { return Bits(s.in[8 * i + row].row + 2 * col); };
          s.out[l].r[i] = op == Op::kLdmatrix ? PackBits(at(g, 2 * t), at(g, 2 * t + 1))
                                              : PackBits(at(2 * t, g), at(2 * t + 1, g));
        }
      }
      break;
    case Op::kMma: {
      // m16n8k16, A row-major and B column-major fragments (g = l / 4, t = l % 4):
      // A: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
      // B: b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g);
      // C and D: c0, c1 (g, 2t..2t+1), c2, c3 (g+8, 2t..2t+1).
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const LaneIn& in = s.in[l];
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int i = 0; i < 4; ++i) {
          A[rows[i]][cols[i]] = Low(in.a[i]);
          A[rows[i]][cols[i] + 1] = High(in.a[i]);
        }
        B[2 * t][g] = Low(in.b0);
        B[2 * t + 1][g] = High(in.b0);
        B[2 * t + 8][g] = Low(in.b1);
        B[2 * t + 9][g] = High(in.b1);
        C[g][2 * t] = in.c[0];
        C[g][2 * t + 1] = in.c[1];
        C[g + 8][2 * t] = in.c[2];
        C[g + 8][2 * t + 1] = in.c[3];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 4; ++e) {
          const int m = g + 8 * (e / 2), n = 2 * t + e % 2;
          double sum = C[m][n];
          for (int k = 0; k < 16; ++k) sum += double(A[m][k]) * B[k][n];
          s.out[l].c[e] = float(sum);
        }
      }
      break;
    }
  }
}

LaneOut Collective(LaneIn in) {
  Block& b = *g_block;
  Thread& self = Self();
  const int x = b.current, lane = x % 32;
  Slot& s = b.slots[x / 32 * 2 + self.collectives++ % 2];
  const uint64_t generation = s.generation;
  s.in[lane] = in;
  if (++s.arrived == 32) {
    Compute(s);
    s.arrived = 0;
    ++s.generation;
  } else {
    WaitFor(NameOf(in.op), s.generation, generation);
  }
  return s.out[lane];
}

// Where the threads of a block that cannot go on wait: the first warp whose lanes wait at
// different places, else the block's counts.
std::string Deadlock(const std::vector<Thread>& threads) {
  auto place = [](const Thread& t) { return std::string(t.done ? "exit" : t.waiting_at); };
  std::map<std::string, int> block;
  for (size_t w = 0; w < threads.size() / 32; ++w) {
    std::map<std::string, int> warp;
    for (size_t l = 0; l < 32; ++l) ++warp[place(threads[w * 32 + l])];
    if (warp.size() > 1) {
      std::string where;
      for (const auto& [at, lanes] : warp) where += fmt::format("{}{} lanes at {}", where.empty() ? "" : ", ", lanes, at);
      return fmt::format("the lanes of warp {} diverged and wait forever: {}", w, where);
    }
    for (const auto& [at, lanes] : warp) block[at] += lanes;
  }
  std::string where;
  for (const auto& [at, n] : block) where += fmt::format("{}{} threads at {}", where.empty() ? "" : ", ", n, at);
  return "the threads wait forever: " + where;
}

}  // namespace

Emulator::Emulator(Options options) : shared_(kSharedBytes), options_(options) {}

void Emulator::AllowReads(const void* p, size_t bytes) {
  readable_.emplace_back(static_cast<const unsigned char*>(p), bytes);
}

void Emulator::Run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& thread) {
  const int n = int(block.x * block.y * block.z);
  if (n % 32 != 0 || n > 1024) throw std::runtime_error(fmt::format("a block of {} threads", n));
  if (shared_bytes > shared_.size()) {
    throw std::runtime_error(fmt::format("{} bytes of shared memory, more than the emulator's {}", shared_bytes,
                                         shared_.size()));
  }
  std::vector<Thread> threads(n);
  // Stacks come back to the pool when a block's fibers end: a launch of many blocks
  // allocates one block's worth.
  boost::context::pooled_fixedsize_stack stacks(kStackBytes, n);
  gridDim = grid;
  blockDim = block;
  // Poisoned once a launch: past its own bytes, each block must leave it so.
  std::memset(shared_.data(), 0xff, shared_.size());
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b;
        b.options = &options_;
        b.readable = &readable_;
        b.shared = shared_.data();
        b.shared_bytes = shared_bytes;
        b.index = {x, y, z};
        b.threads = &threads;
        b.slots.resize(n / 32 * 2);
        // What a block may use starts unwritten; past it, the poison must stay.
        std::memset(shared_.data(), 0xff, shared_bytes);
        for (Thread& t : threads) {
          t = Thread{};
          t.fiber = boost::context::fiber(std::allocator_arg, stacks,
                                          [&t, &thread](boost::context::fiber&& scheduler) {
                                            t.scheduler = std::move(scheduler);
                                            thread();
                                            t.done = true;
                                            return std::move(t.scheduler);
                                          });
        }
        g_block = &b;
        blockIdx = b.index;
        // Picks the thread to run next: one that has not exited and does not wait for a
        // counter that has not moved, in the order the options ask for.
        auto runnable = [&](int i) {
          const Thread& t = threads[i];
          return !t.done && !(t.wait_on && *t.wait_on == t.wait_value);
        };
        auto next = [&](int last) {
          for (int k = 0; k < n; ++k) {
            int i = k;
            if (options_.turns == Turns::kRoundRobin) i = (last + 1 + k) % n;
            if (options_.turns == Turns::kLastThreadFirst) i = n - 1 - k;
            if (runnable(i)) return i;
          }
          return -1;
        };
        for (int i = next(n - 1); i >= 0 && b.error.empty(); i = next(i)) {
          b.current = i;
          threadIdx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
          threads[i].fiber = std::move(threads[i].fiber).resume();
        }
        if (b.error.empty() && std::any_of(threads.begin(), threads.end(), [](const Thread& t) { return !t.done; })) {
          b.error = fmt::format("block ({},{},{}): {}", x, y, z, Deadlock(threads));
        }
        g_block = nullptr;
        if (!b.error.empty()) throw std::runtime_error(b.error);
        if (std::memcmp(shared_.data() + shared_bytes, poison_.data(), shared_.size() - shared_bytes) != 0) {
          const auto past = std::mismatch(shared_.begin() + shared_bytes, shared_.end(), poison_.begin()).first;
          throw std::runtime_error(fmt::format("block ({},{},{}) wrote byte {} of shared memory, past the launch's {} "
                                               "bytes", x, y, z, past - shared_.begin(), shared_bytes));
        }
      }
    }
  }
}

}  // namespace llamad::cuda::emulator

using llamad::cuda::emulator::g_block;

void __syncthreads() {
  using namespace llamad::cuda::emulator;
  Block& b = *g_block;
  const uint64_t generation = b.barrier_generation;
  if (++b.barrier_arrived == int(b.threads->size())) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
  } else {
    WaitFor("__syncthreads", b.barrier_generation, generation);
  }
}

double __shfl_xor_sync(unsigned mask, double value, int lane_mask) {
  using namespace llamad::cuda::emulator;
  LaneIn in{};
  in.op = Op::kShuffle;
  in.mask = mask;
  in.value = value;
  in.lane_mask = lane_mask;
  return Collective(in).value;
}
float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  return float(__shfl_xor_sync(mask, double(value), lane_mask));
}

float __fadd_rn(float a, float b) { return a + b; }
float __fsub_rn(float a, float b) { return a - b; }
float __fmul_rn(float a, float b) { return a * b; }
float __fdiv_rn(float a, float b) { return a / b; }
float __fsqrt_rn(float a) { return std::sqrt(a); }
float rsqrtf(float a) { return 1.f / std::sqrt(a); }
// glibc's math.h declares __expf (an internal name) without the library exporting it.
extern "C" float __expf(float x) noexcept { return std::exp(x); }

namespace llamad::cuda {

using namespace emulator;

unsigned char* DynamicSharedMemory() { return g_block->shared; }

void Mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  LaneIn in{};
  in.op = Op::kMma;
  for (int i = 0; i < 4; ++i) {
    in.a[i] = a[i];
    in.c[i] = c[i];
  }
  in.b0 = b0;
  in.b1 = b1;
  const LaneOut out = Collective(in);
  for (int i = 0; i < 4; ++i) c[i] = out.c[i];
}

namespace {
void Load(Op op, uint32_t r[4], const __nv_bfloat16* row) {
  CheckShared(row, NameOf(op));
  LaneIn in{};
  in.op = op;
  in.row = reinterpret_cast<const unsigned char*>(row);
  const LaneOut out = Collective(in);
  for (int i = 0; i < 4; ++i) r[i] = out.r[i];
}
}  // namespace

void Ldmatrix(uint32_t r[4], const __nv_bfloat16* row) { Load(Op::kLdmatrix, r, row); }
void LdmatrixTrans(uint32_t r[4], const __nv_bfloat16* row) { Load(Op::kLdmatrixTrans, r, row); }

void CopyAsync16(void* dst, const void* src, bool in) {
  CheckShared(dst, "cp.async");
  if (in) {
    const auto* s = static_cast<const unsigned char*>(src);
    bool readable = false;
    for (const auto& [p, bytes] : *g_block->readable) readable |= s >= p && s + 16 <= p + bytes;
    if (!readable) emulator::Fail("cp.async reads outside the kernel's inputs");
    if (reinterpret_cast<uintptr_t>(s) % 16 != 0) emulator::Fail("cp.async from a global address not 16-byte aligned");
  }
  const Copy copy{dst, src, in};
  if (g_block->options->copies_land_when_issued) {
    Perform(copy);
  } else {
    Self().uncommitted.push_back(copy);
  }
}

void CommitCopies() {
  Thread& self = Self();
  self.groups.push_back(std::move(self.uncommitted));
  self.uncommitted.clear();
}

void WaitCopiesFor(int pending) {
  Thread& self = Self();
  while (int(self.groups.size()) > pending) {
    for (const Copy& c : self.groups.front()) Perform(c);
    self.groups.pop_front();
  }
}

}  // namespace llamad::cuda
