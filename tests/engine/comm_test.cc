// Gloo collectives between ranks as threads of one process, over loopback TCP with a
// file rendezvous: the same transport as real multi-process jobs.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "comm/communicator.h"

namespace llamad {
namespace {

// Runs f(comm) on `world` ranks at once and returns when all have finished.
void OnRanks(int world, const std::string& name, const std::function<void(Communicator&)>& f) {
  const std::filesystem::path store =
      std::filesystem::temp_directory_path() / ("llamad-comm-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(store);
  std::filesystem::create_directories(store);
  std::vector<std::thread> ranks;
  for (int r = 0; r < world; ++r) {
    ranks.emplace_back([&, r] {
      auto comm = MakeGlooCommunicator(r, world, store.string(), std::chrono::seconds(30));
      ASSERT_TRUE(comm.ok()) << comm.status();
      f(**comm);
      // No rank closes its connections while another may still be setting up or sending.
      EXPECT_TRUE((*comm)->Barrier().ok());
    });
  }
  for (auto& t : ranks) t.join();
  std::filesystem::remove_all(store);
}

// Uneven parts (10 elements over 3 ranks: 4, 3, 3), a root that is not rank 0, and the
// root's own part received in place or into a separate buffer.
TEST(CommTest, ScatterSlicesSendsEachRankItsEvenSlice) {
  constexpr size_t n = 10;
  constexpr int world = 3, root = 1;
  OnRanks(world, "scatter", [&](Communicator& comm) {
    std::vector<float> full;
    if (comm.rank() == root) {
      full.resize(n);
      std::iota(full.begin(), full.end(), 100.f);
    }
    const auto [begin, end] = EvenSlice(n, comm.rank(), world);
    std::vector<float> own(end - begin, -1.f);
    ASSERT_TRUE(comm.ScatterSlices(comm.rank() == root ? full.data() : nullptr, own.data(), n, root).ok());
    for (size_t i = 0; i < own.size(); ++i) EXPECT_EQ(own[i], 100.f + float(begin + i)) << "rank " << comm.rank();
    // In place on the root: its part already sits in `full`.
    if (comm.rank() == root) std::fill(full.begin() + long(begin), full.begin() + long(end), 7.f);
    std::vector<float> again(end - begin, -1.f);
    float* into = comm.rank() == root ? full.data() + begin : again.data();
    ASSERT_TRUE(comm.ScatterSlices(comm.rank() == root ? full.data() : nullptr, into, n, root).ok());
    const float expected_root = 7.f;
    for (size_t i = 0; i < end - begin; ++i) {
      EXPECT_EQ(into[i], comm.rank() == root ? expected_root : 100.f + float(begin + i)) << "rank " << comm.rank();
    }
  });
}

// More ranks than elements: the empty parts send and receive nothing.
TEST(CommTest, ScatterSlicesWithEmptyParts) {
  constexpr size_t n = 2;
  OnRanks(3, "scatter-empty", [&](Communicator& comm) {
    std::vector<float> full = {5.f, 6.f};
    const auto [begin, end] = EvenSlice(n, comm.rank(), 3);
    std::vector<float> own(std::max<size_t>(end - begin, 1), -1.f);
    ASSERT_TRUE(comm.ScatterSlices(comm.rank() == 0 ? full.data() : nullptr, own.data(), n, 0).ok());
    if (end > begin) EXPECT_EQ(own[0], full[begin]) << "rank " << comm.rank();
    else EXPECT_EQ(own[0], -1.f) << "rank " << comm.rank() << " has no part";
  });
}

}  // namespace
}  // namespace llamad
