// The communicator's building blocks in one process: ranks are threads joined by real
// Gloo over loopback. Bucketed background all-reduce, the reduce-and-add of sharded
// gradients, the gather of sharded parameters, and the choice of what GPU ranks reduce
// over (NCCL needs a GPU each: on a host backend every choice but an explicit nccl keeps
// Gloo).
#include <gtest/gtest.h>
#include <pthread.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "comm/background_all_reduce.h"
#include "comm/backend_collectives.h"
#include "comm/communicator.h"
#include "comm/nccl_communicator.h"
#include "core/exit_codes.h"
#include "core/exit_unless_done.h"

namespace llamad {
namespace {
namespace fs = std::filesystem;

// Runs body(rank, communicator) on `world` threads joined by Gloo through a fresh folder.
void OnRanks(int world, const std::function<void(int, Communicator&)>& body) {
  const fs::path store = fs::temp_directory_path() /
                         ("llamad-comm-test-" + std::to_string(::getpid()) + "-" +
                          ::testing::UnitTest::GetInstance()->current_test_info()->name());
  fs::remove_all(store);
  fs::create_directories(store);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      auto comm = MakeGlooCommunicator(rank, world, store.string(), std::chrono::seconds(30));
      ASSERT_TRUE(comm.ok()) << comm.status();
      body(rank, **comm);
    });
  }
  for (auto& t : threads) t.join();
  fs::remove_all(store);
}

float Value(int rank, size_t i) { return float(rank + 1) * 0.5f + float(i % 97); }

// A region of zero2/3: elements [kRegionBegin, kRegionEnd) of kRegionN that kRegionRanks
// ranks own in EvenSlices (4, 3 and 3 elements), so that it spans all three unevenly.
constexpr int kRegionRanks = 3;
constexpr size_t kRegionN = 10, kRegionBegin = 2, kRegionEnd = 9;

// Ranges handed over from the back of the buffer to the front, as the backward finishes
// them, are merged into buckets and summed: every element exactly once.
TEST(CommTest, BackgroundAllReduceSumsEveryRangeOnce) {
  constexpr int kWorld = 3;
  constexpr size_t kN = 10000;
  OnRanks(kWorld, [](int rank, Communicator& comm) {
    std::vector<float> data(kN);
    for (size_t i = 0; i < kN; ++i) data[i] = Value(rank, i);
    BackgroundAllReduce reducer(&comm, data.data(), /*bucket_elements=*/1500);
    // Uneven ranges, back to front, with one gap that is handed over last.
    size_t end = kN;
    for (size_t len : {700u, 1300u, 10u, 2990u, 1000u}) {
      reducer.Add(end - len, end);
      end -= len;
    }
    reducer.Add(0, end - 500);  // not adjacent: the merged ranges go out first
    reducer.Add(end - 500, end);
    ASSERT_TRUE(reducer.Finish().ok());
    for (size_t i = 0; i < kN; ++i) {
      float expected = 0;
      for (int r = 0; r < kWorld; ++r) expected += Value(r, i);
      ASSERT_EQ(data[i], expected) << "rank " << rank << " element " << i;
    }
    EXPECT_GT(reducer.busy_seconds(), 0.0);
  });
}

// zero2's gradient reduction of a region as a reduce-scatter: ranks own EvenSlices of
// the whole range (uneven: 10 over 3), the region [2, 9) spans all three, and each rank
// adds the sum of its part into its own shard.
TEST(CommTest, ReduceScatterAddsEachRanksPartIntoItsShard) {
  OnRanks(kRegionRanks, [](int rank, Communicator& comm) {
    auto backend = MakeCpuBackend({DType::kF32, 1});
    float* region = static_cast<float*>(backend->Allocate(kRegionEnd - kRegionBegin));
    for (size_t i = kRegionBegin; i < kRegionEnd; ++i) region[i - kRegionBegin] = Value(rank, i);
    const auto [own_begin, own_end] = EvenSlice(kRegionN, rank, kRegionRanks);  // 4, 3 and 3 elements
    const size_t lo = std::max(own_begin, kRegionBegin), hi = std::min(own_end, kRegionEnd);
    float* shard = static_cast<float*>(backend->Allocate(own_end - own_begin));
    for (size_t i = 0; i < own_end - own_begin; ++i) shard[i] = 100.0f;
    ASSERT_TRUE(ReduceScatterAddOnBackend(comm, *backend, region, kRegionBegin, kRegionEnd, kRegionN, shard + (lo - own_begin)).ok());
    for (size_t i = own_begin; i < own_end; ++i) {
      float expected = 100.0f;
      if (i >= lo && i < hi) {
        for (int r = 0; r < kRegionRanks; ++r) expected += Value(r, i);
      }
      ASSERT_EQ(shard[i - own_begin], expected) << "rank " << rank << " element " << i;
    }
  });
  EXPECT_EQ(OwnedParts(kRegionBegin, kRegionEnd, kRegionN, kRegionRanks).size(), 3u);
  EXPECT_EQ(OwnedParts(0, 4, kRegionN, kRegionRanks).size(), 1u);  // within rank 0's slice
}

// zero3's gather of a region: each rank holds its own part of [2, 9) of 10 elements
// (EvenSlices over 3) and ends with every owner's part.
TEST(CommTest, GatherPartsGivesEveryRankEachOwnersPart) {
  OnRanks(kRegionRanks, [](int rank, Communicator& comm) {
    auto backend = MakeCpuBackend({DType::kF32, 1});
    float* region = static_cast<float*>(backend->Allocate(kRegionEnd - kRegionBegin));
    std::fill_n(region, kRegionEnd - kRegionBegin, -1.0f);  // what the others own: not here yet
    const auto [own_begin, own_end] = EvenSlice(kRegionN, rank, kRegionRanks);
    for (size_t i = std::max(own_begin, kRegionBegin); i < std::min(own_end, kRegionEnd); ++i) region[i - kRegionBegin] = Value(rank, i);
    ASSERT_TRUE(GatherPartsOnBackend(comm, *backend, region, kRegionBegin, kRegionEnd, kRegionN).ok());
    for (size_t i = kRegionBegin; i < kRegionEnd; ++i) {
      int owner = 0;
      while (EvenSlice(kRegionN, owner, kRegionRanks).second <= i) ++owner;
      ASSERT_EQ(region[i - kRegionBegin], Value(owner, i)) << "rank " << rank << " element " << i;
    }
  });
}

// The owner adds the sum over the ranks into its shard; the other ranks' shard is
// untouched.
TEST(CommTest, ReduceAddOnBackendAddsTheSumIntoTheOwnersShard) {
  constexpr int kWorld = 2;
  constexpr size_t kN = 4099;
  OnRanks(kWorld, [](int rank, Communicator& comm) {
    auto backend = MakeCpuBackend({DType::kF32, 1});
    float* data = static_cast<float*>(backend->Allocate(kN));
    float* shard = static_cast<float*>(backend->Allocate(kN));
    for (size_t i = 0; i < kN; ++i) data[i] = Value(rank, i), shard[i] = 100.0f + float(rank);
    ASSERT_TRUE(ReduceAddOnBackend(comm, *backend, data, kN, /*root=*/1, shard).ok());
    for (size_t i = 0; i < kN; ++i) {
      const float expected = rank == 1 ? 101.0f + (Value(0, i) + Value(1, i)) : 100.0f;
      ASSERT_EQ(shard[i], expected) << "rank " << rank << " element " << i;
    }
  });
}

// Ranks that share a host's memory count each other by its keys: two of three share
// the first here, none the second; every rank sees every rank's keys.
TEST(CommTest, CountRanksWithKeysCountsTheRanksThatShareThem) {
  auto one = CountRanksWithKeys(*MakeLocalCommunicator(), {"host"});
  ASSERT_TRUE(one.ok()) << one.status();
  EXPECT_EQ(*one, std::vector<int>{1});
  std::vector<std::vector<int>> counted(3);
  std::vector<std::vector<double>> seen(3);
  OnRanks(3, [&](int rank, Communicator& comm) {
    const std::vector<std::string> keys = {rank == 2 ? "host b" : "host a", "cgroup " + std::to_string(rank)};
    auto n = CountRanksWithKeys(comm, keys);
    ASSERT_TRUE(n.ok()) << n.status();
    counted[size_t(rank)] = *n;
    auto codes = EveryRanksKeys(comm, keys);
    ASSERT_TRUE(codes.ok()) << codes.status();
    seen[size_t(rank)] = *codes;
  });
  EXPECT_EQ(counted, (std::vector<std::vector<int>>{{2, 1}, {2, 1}, {1, 1}}));
  ASSERT_EQ(seen[0].size(), 6u);
  EXPECT_EQ(seen[0], seen[1]);
  EXPECT_EQ(seen[0], seen[2]);
  EXPECT_EQ(seen[0][0], seen[0][2]);  // ranks 0 and 1, first key
  EXPECT_NE(seen[0][0], seen[0][4]);
}

TEST(CommTest, HostBackendKeepsGlooAndRefusesNccl) {
  auto backend = MakeCpuBackend({DType::kF32, 1});
  std::string note;
  std::unique_ptr<Communicator> local = MakeLocalCommunicator();
  Communicator* raw = local.get();
  auto kept = AttachDeviceCollectives(std::move(local), *backend, "auto", std::chrono::seconds(5), &note);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(kept->get(), raw);
  EXPECT_EQ((*kept)->device_collectives(), nullptr);
  EXPECT_TRUE(note.empty()) << note;

  auto nccl = AttachDeviceCollectives(MakeLocalCommunicator(), *backend, "nccl", std::chrono::seconds(5), &note);
  ASSERT_FALSE(nccl.ok());
  EXPECT_NE(nccl.status().message().find("bf16"), std::string::npos) << nccl.status();
  std::unique_ptr<Communicator> host = MakeLocalCommunicator();
  auto made = MakeNcclCommunicator(host, *backend, std::chrono::seconds(5));
  ASSERT_FALSE(made.ok());
  EXPECT_NE(made.status().message().find("cpu backend"), std::string::npos) << made.status();
  EXPECT_NE(host, nullptr) << "a refusal every rank makes alike leaves the host communicator";
  auto bad = AttachDeviceCollectives(MakeLocalCommunicator(), *backend, "mpi", std::chrono::seconds(5), &note);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'mpi'"), std::string::npos) << bad.status();
}

// A CUDA build loads NCCL at run time: where the library is, its version; where it is
// not, a reason that names it.
TEST(CommTest, NcclAvailabilityIsReported) {
  std::string version_or_why;
  if (NcclAvailable(&version_or_why)) {
    int major = 0, minor = 0, patch = 0;
    ASSERT_EQ(std::sscanf(version_or_why.c_str(), "%d.%d.%d", &major, &minor, &patch), 3) << version_or_why;
    EXPECT_EQ(major, 2);
    std::printf("NCCL %s loads here\n", version_or_why.c_str());
  } else {
    EXPECT_TRUE(version_or_why.find("libnccl.so.2") != std::string::npos ||
                version_or_why.find("no NCCL") != std::string::npos)
        << version_or_why;
    std::printf("NCCL does not load here: %s\n", version_or_why.c_str());
  }
}

// A collective that fails because a peer went away is ABORTED over NCCL, as over Gloo:
// the rank then exits as a lost peer (75), and the scheduler waits for the cause (a lost
// node restarts the job) instead of failing the job with this rank. NCCL's own errors,
// and this GPU's, fail the job. The numbers are NCCL's result codes (its ABI).
TEST(CommTest, NcclFailuresOfAPeerAreALostPeer) {
  const int kUnhandledCudaError = 1, kSystemError = 2, kInternalError = 3, kInvalidArgument = 4,
            kInvalidUsage = 5, kRemoteError = 6, kInProgress = 7;
  for (int peer : {kRemoteError, kInProgress}) {
    EXPECT_EQ(NcclFailureCode(peer), absl::StatusCode::kAborted) << "ncclResult_t " << peer;
  }
  // A system error is this host's (shared memory, InfiniBand, descriptors): a restart
  // would only repeat it.
  for (int own : {kUnhandledCudaError, kSystemError, kInternalError, kInvalidArgument, kInvalidUsage}) {
    EXPECT_EQ(NcclFailureCode(own), absl::StatusCode::kInternal) << "ncclResult_t " << own;
  }
}

// The last resort around an NCCL abort that would never return: the process ends with
// the status given, past the limit and not before; a call that returns disarms it.
TEST(CommTest, ACallThatNeverReturnsEndsTheProcessWithItsStatus) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  const auto fired = std::chrono::steady_clock::now();
  EXPECT_EXIT(
      {
        ExitUnlessDoneWithin guard(std::chrono::milliseconds(200), kExitPeerLost, "a collective made no progress");
        std::this_thread::sleep_for(std::chrono::seconds(30));
      },
      ::testing::ExitedWithCode(kExitPeerLost), "llama-train: a collective made no progress \\(not done in 0.2 s\\)");
  EXPECT_GE(std::chrono::steady_clock::now() - fired, std::chrono::milliseconds(200));
  const auto start = std::chrono::steady_clock::now();
  {
    ExitUnlessDoneWithin guard(std::chrono::seconds(30), kExitPeerLost, "never printed");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  // Disarmed: the guard's thread ended with it, long before its limit.
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

// Where the guard cannot start its thread (the address space is full here: no room for
// its stack), nothing could end the wait: the process ends at once, with the status given.
TEST(CommTest, AGuardThatCannotWatchEndsTheProcessAtOnce) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        size_t pages = 0;
        std::ifstream("/proc/self/statm") >> pages;
        // Room for a few small allocations beyond what is mapped now, far less than a
        // thread's stack (glibc's default follows `ulimit -s`).
        pthread_attr_t defaults;
        size_t stack = 0;
        if (pthread_getattr_default_np(&defaults) != 0 || pthread_attr_getstacksize(&defaults, &stack) != 0) {
          std::_Exit(1);
        }
        pthread_attr_destroy(&defaults);
        const rlim_t limit = pages * sysconf(_SC_PAGESIZE) + std::min<size_t>(256u << 10, stack / 4);
        rlimit bound;
        bound.rlim_cur = bound.rlim_max = limit;
        if (pages == 0 || setrlimit(RLIMIT_AS, &bound) != 0) std::_Exit(1);
        ExitUnlessDoneWithin guard(std::chrono::seconds(30), kExitPeerLost, "an abort with no room to watch it");
        std::_Exit(0);  // not reached when the guard ends the process
      },
      ::testing::ExitedWithCode(kExitPeerLost),
      "llama-train: an abort with no room to watch it \\(cannot watch the 30.0 s limit: .*\\): exiting");
}

}  // namespace
}  // namespace llamad
