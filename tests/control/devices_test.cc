// What a node offers (daemon/devices.h): devices: auto, cuda:N or cpu:N, checked against
// what the CUDA driver reports (none on a machine without one).
#include "daemon/devices.h"

#include <gtest/gtest.h>

#include <string>

namespace llamad::daemon {
namespace {

TEST(DevicesTest, SpecsResolveOrSayWhatIsWrong) {
  auto cpu = ResolveDevices("cpu:3");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ(cpu->kind, "cpu");
  EXPECT_EQ(cpu->count, 3);
  for (const char* bad : {"gpu:2", "cpu:0", "cpu:x", "cpu:2x", "cpu:2000", "cpu: 4", "cpu:+4", "cpu:",
                          "cpu:007", "cpu:03", "cpu:00"}) {
    EXPECT_FALSE(ResolveDevices(bad).ok()) << bad;
  }
  EXPECT_EQ(ResolveDevices("cpu:007").status().message(),
            "devices: 'cpu:007': N must be a whole number from 1 to 1024 in base 10, no leading zeros");
  auto any = ResolveDevices("auto");
  ASSERT_TRUE(any.ok()) << any.status();
  if (any->kind == "cuda") {
    EXPECT_GE(any->count, 1);
    EXPECT_TRUE(ResolveDevices("cuda:" + std::to_string(any->count)).ok());
    EXPECT_FALSE(ResolveDevices("cuda:" + std::to_string(any->count + 1)).ok());
  } else {
    EXPECT_EQ(any->count, 1);
    auto cuda = ResolveDevices("cuda:1");
    ASSERT_FALSE(cuda.ok());
    EXPECT_NE(cuda.status().message().find("reports 0 GPU(s)"), std::string::npos) << cuda.status();
  }
}

// A rank's GPU: its index in PCI order, or where llamad itself was given some of the
// machine's GPUs, the entry of that list at the rank's position, under llamad's order.
TEST(DevicesTest, RanksGetTheGpusLlamadWasGiven) {
  for (const char* unset : {static_cast<const char*>(nullptr), ""}) {
    auto gpu = RankGpuFor(unset, 3);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ(gpu->visible_devices, "3");
    EXPECT_EQ(gpu->device_order, "PCI_BUS_ID");
  }
  const char* kept = "2, 3,GPU-8f6a1c2e-0b1d-4e5f-9a7b-1c2d3e4f5a6b";
  const std::pair<int, const char*> expected[] = {{0, "2"}, {1, "3"}, {2, "GPU-8f6a1c2e-0b1d-4e5f-9a7b-1c2d3e4f5a6b"}};
  for (const auto& [local_rank, name] : expected) {
    auto gpu = RankGpuFor(kept, local_rank);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ(gpu->visible_devices, name) << local_rank;
    EXPECT_EQ(gpu->device_order, "") << "llamad's own order counted the list";
  }
  // CheckRankGpus (which ResolveDevices runs, so llamad stops at start) refuses a list
  // that falls short of the GPUs the driver counts.
  EXPECT_TRUE(CheckRankGpus({"cuda", 3}, kept).ok());
  EXPECT_TRUE(CheckRankGpus({"cpu", 8}, "0").ok());
  auto short_list = CheckRankGpus({"cuda", 2}, "0,,1");
  ASSERT_FALSE(short_list.ok());
  EXPECT_NE(short_list.message().find("devices: 2 GPU(s), but device 1: llamad's CUDA_VISIBLE_DEVICES='0,,1'"),
            std::string::npos)
      << short_list;
  for (const auto& [list, local_rank] : {std::pair{kept, 3}, std::pair{"0,,1", 1}, std::pair{"0,,1", 2},
                                    std::pair{"0", -1}}) {
    auto gpu = RankGpuFor(list, local_rank);
    ASSERT_FALSE(gpu.ok()) << list << " " << local_rank;
    EXPECT_NE(gpu.status().message().find(std::string("CUDA_VISIBLE_DEVICES='") + list + "'"), std::string::npos)
        << gpu.status();
  }
}

// CUDA shows a process at most one MIG device, so where llamad's list names MIG devices
// the driver reports 1 to llamad: the list's entries count instead, each rank taking one.
TEST(DevicesTest, AListOfMigDevicesGivesEachRankOne) {
  const std::string migs =
      "MIG-5c3b2a10-7d4e-5f60-8a9b-0c1d2e3f4a5b, MIG-6d4c3b21-8e5f-6071-9bac-1d2e3f4a5b6c,"
      "MIG-7e5d4c32-9f60-7182-acbd-2e3f4a5b6c7d";
  EXPECT_EQ(UsableGpuCount(1, migs), 3);
  EXPECT_EQ(UsableGpuCount(0, migs), 0) << "no driver, no GPU";
  EXPECT_EQ(UsableGpuCount(1, migs + ",,MIG-8f6e5d43-a071-8293-bdce-3f4a5b6c7d8e"), 3) << "CUDA stops at ''";
  EXPECT_EQ(UsableGpuCount(1, "GPU-8f6a1c2e,MIG-5c3b2a10"), 2) << "a rank a whole GPU, a rank a MIG device";
  // Lists of whole GPUs, or none: what the driver reports.
  EXPECT_EQ(UsableGpuCount(8, ""), 8);
  EXPECT_EQ(UsableGpuCount(2, "3,1,0"), 2) << "the driver knows which entries it found";
  EXPECT_EQ(UsableGpuCount(0, "0,1"), 0);
  EXPECT_TRUE(CheckRankGpus({"cuda", 3}, migs).ok());
  auto third = RankGpuFor(migs.c_str(), 2);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->visible_devices, "MIG-7e5d4c32-9f60-7182-acbd-2e3f4a5b6c7d");
  EXPECT_EQ(third->device_order, "");
  EXPECT_FALSE(CheckRankGpus({"cuda", 4}, migs).ok());
}

}  // namespace
}  // namespace llamad::daemon
