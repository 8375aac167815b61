// The GPU timeline's arithmetic (ops/bench/gpu_activity.h) on made-up activities: busy
// time as a union, idle gaps with their neighbours and host phase, clipping to the
// stretch. CUPTI itself only runs on a GPU (bench-gpu's timeline).
#include "gpu_activity.h"

#include <gtest/gtest.h>

namespace llamad {
namespace {

TEST(GpuActivity, KernelNamesLoseReturnTypeArgumentsAndQualifiers) {
  EXPECT_EQ(ShortKernelName("_ZN6llamad4cuda12_GLOBAL__N_113RmsNormKernelILi8EEEvPfPKfi"), "RmsNormKernel<8>");
  EXPECT_EQ(ShortKernelName("_Z9AddKernelIfEvPT_PKS0_m"), "AddKernel<float>");
  EXPECT_EQ(ShortKernelName("void llamad::cuda::(anonymous namespace)::SwiGluKernel<8>(bf16*, int)"),
            "SwiGluKernel<8>");
  // Library kernels with C names stay whole, however long: they are grouped by name, and
  // two of them may differ only at the end.
  EXPECT_EQ(ShortKernelName("sm90_xmma_gemm_bf16bf16_bf16f32"), "sm90_xmma_gemm_bf16bf16_bf16f32");
  const std::string long_name = std::string(70, 'k') + "_tile128x256";
  EXPECT_EQ(ShortKernelName(long_name.c_str()), long_name);
  EXPECT_EQ(ShortKernelName(""), "?");
  EXPECT_EQ(ShortKernelName(nullptr), "?");
}

TEST(GpuActivity, BusyIsTheUnionAndGapsNameTheirNeighbours) {
  constexpr uint64_t us = 1000;
  const std::vector<GpuActivity> activities = {
      {1000 * us, 1100 * us, "kernel", "A"},
      {0, 60 * us, "memset", "memset"},  // begins before the stretch: clipped to [50, 60)
      {100 * us, 200 * us, "kernel", "A"},
      {150 * us, 300 * us, "kernel", "B"},  // overlaps A: counted once in busy
      {400 * us, 450 * us, "host-to-device", "host-to-device"},
      {410 * us, 420 * us, "kernel", "D"},  // inside the copy: the copy still ends last
      {1300 * us, 1400 * us, "kernel", "C"},  // after the stretch
  };
  const TimelineMarks marks = {{0, "forward"}, {350 * us, "norm"}, {900 * us, "optimizer"}};
  const nlohmann::json s = SummarizeGpuActivity(activities, 50 * us, 1200 * us, marks, 15, 2);
  EXPECT_NEAR(s["wall_s"].get<double>(), 1150e-6, 1e-12);
  EXPECT_NEAR(s["busy_s"].get<double>(), 360e-6, 1e-12);  // 10 + 200 + 50 + 100
  EXPECT_NEAR(s["idle_s"].get<double>(), 790e-6, 1e-12);
  EXPECT_EQ(s["activities"].get<int>(), 6);
  EXPECT_EQ(s["gaps_of_10us"].get<int>(), 4);
  EXPECT_NEAR(s["gaps_of_10us_s"].get<double>(), 790e-6, 1e-12);
  EXPECT_NEAR(s["busy_by_kind_s"]["kernel"].get<double>(), 360e-6, 1e-12);  // overlaps in each
  EXPECT_NEAR(s["busy_by_kind_s"]["memset"].get<double>(), 10e-6, 1e-12);
  EXPECT_NEAR(s["busy_by_kind_s"]["host-to-device"].get<double>(), 50e-6, 1e-12);

  ASSERT_EQ(s["kernels"].size(), 3u);  // C lies outside
  EXPECT_EQ(s["kernels"][0]["kernel"], "A");
  EXPECT_EQ(s["kernels"][0]["calls"], 2);
  EXPECT_NEAR(s["kernels"][0]["s"].get<double>(), 200e-6, 1e-12);
  EXPECT_EQ(s["kernels"][1]["kernel"], "B");
  EXPECT_EQ(s["kernels"][2]["kernel"], "D");

  // The two longest of the gaps [60, 100), [300, 400), [450, 1000) and [1100, 1200).
  ASSERT_EQ(s["gaps"].size(), 2u);
  const auto& longest = s["gaps"][0];
  EXPECT_NEAR(longest["s"].get<double>(), 550e-6, 1e-12);
  EXPECT_NEAR(longest["at_s"].get<double>(), 400e-6, 1e-12);
  EXPECT_EQ(longest["phase"], "norm");
  EXPECT_EQ(longest["after"], "host-to-device");
  EXPECT_EQ(longest["before"], "A");
  const auto& next = s["gaps"][1];  // ties with [1100, 1200): the earlier first
  EXPECT_NEAR(next["at_s"].get<double>(), 250e-6, 1e-12);
  EXPECT_EQ(next["phase"], "forward");
  EXPECT_EQ(next["after"], "B");  // the last to end before it
  EXPECT_EQ(next["before"], "host-to-device");

  // bench-gpu prints it so.
  ::testing::internal::CaptureStdout();
  PrintGpuActivitySummary(s);
  const std::string text = ::testing::internal::GetCapturedStdout();
  EXPECT_NE(text.find("1.15 ms wall, busy 0.36 ms (31.3%), idle 0.79 ms; 4 idle gaps"), std::string::npos) << text;
  EXPECT_NE(text.find("0.550      0.40  norm         host-to-device -> A"), std::string::npos) << text;

  // Long names are cut in the printed table only.
  const std::string long_name = std::string(100, 'k');
  const nlohmann::json one = SummarizeGpuActivity({{0, 1000, "kernel", long_name}}, 0, 1000, {});
  EXPECT_EQ(one["kernels"][0]["kernel"], long_name);
  ::testing::internal::CaptureStdout();
  PrintGpuActivitySummary(one);
  const std::string table = ::testing::internal::GetCapturedStdout();
  EXPECT_NE(table.find(std::string(61, 'k') + "..."), std::string::npos) << table;
  EXPECT_EQ(table.find(std::string(62, 'k')), std::string::npos) << table;
}

TEST(GpuActivity, AnIdleStretchIsOneGap) {
  const nlohmann::json s = SummarizeGpuActivity({}, 1000, 500'000, {}, 15, 8);
  EXPECT_EQ(s["busy_s"].get<double>(), 0);
  EXPECT_EQ(s["gaps_of_10us"].get<int>(), 1);
  ASSERT_EQ(s["gaps"].size(), 1u);
  EXPECT_EQ(s["gaps"][0]["after"], "(start)");
  EXPECT_EQ(s["gaps"][0]["before"], "(end)");
  EXPECT_EQ(s["gaps"][0]["phase"], "-");
}

}  // namespace
}  // namespace llamad
