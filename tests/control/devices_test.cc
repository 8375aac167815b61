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
  for (const char* bad : {"gpu:2", "cpu:0", "cpu:x", "cpu:2x", "cpu:2000"}) {
    EXPECT_FALSE(ResolveDevices(bad).ok()) << bad;
  }
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

}  // namespace
}  // namespace llamad::daemon
