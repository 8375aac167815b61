// llamad's settings, from flags: out-of-range numbers and bad names name the key and the rule.
#include "daemon/config.h"

#include <CLI/CLI.hpp>
#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

// Resolves llamad's flags `args` (after the program name).
absl::StatusOr<llamad::daemon::DaemonConfig> Resolve(std::vector<std::string> args) {
  CLI::App app;
  llamad::daemon::DaemonFlags flags(app);
  args.insert(args.begin(), "--data-dir=/tmp/unused");
  std::vector<std::string> reversed(args.rbegin(), args.rend());  // CLI11 takes them last first
  app.parse(reversed);
  return flags.Resolve();
}

TEST(DaemonConfigTest, DefaultsResolve) {
  auto config = Resolve({});
  EXPECT_TRUE(config.ok()) << config.status();
}

TEST(DaemonConfigTest, DurationsAndThreadCountsOutOfRangeNameTheirKey) {
  const struct {
    std::vector<std::string> args;
    std::string needle;
  } cases[] = {
      {{"--stop-grace-ms=9223372036854775807"},
       "stop_grace_ms: 9223372036854775807 is not within [0, 2592000000] (30 days)"},
      {{"--heartbeat-interval-ms=3000000000000000000", "--lease-timeout-ms=9000000000000000000"},
       "heartbeat_interval_ms: 3000000000000000000"},
      {{"--lease-timeout-ms=2592000001"}, "lease_timeout_ms: 2592000001"},
      // What 0 means, where it means something of its own, is in the error too.
      {{"--grow-after-ms=-1"}, "grow_after_ms: -1 is not within [0, 2592000000] (30 days; 0: never)"},
      {{"--previous-ranks-wait-ms=9999999999999"}, "previous_ranks_wait_ms: 9999999999999 is not within "
                                                   "[0, 2592000000] (30 days; 0: do not wait)"},
      {{"--forget-lost-nodes-after-ms=-5"}, "forget_lost_nodes_after_ms: -5 is not within [0, 2592000000] (30 days; "
                                            "0: never)"},
      {{"--worker-threads=4294967297"}, "worker_threads: 4294967297 is not within [0, 1024]"},
      {{"--worker-threads=1025"}, "worker_threads: 1025 is not within [0, 1024]"},
      {{"--heartbeat-interval-ms=5000", "--lease-timeout-ms=5000"}, "must exceed heartbeat_interval_ms 5000"},
  };
  for (const auto& c : cases) {
    auto config = Resolve(c.args);
    ASSERT_FALSE(config.ok()) << c.needle;
    EXPECT_NE(std::string(config.status().message()).find(c.needle), std::string::npos) << config.status();
  }
  // The limits themselves are accepted.
  auto at_limits = Resolve({"--lease-timeout-ms=2592000000", "--stop-grace-ms=2592000000", "--worker-threads=1024"});
  EXPECT_TRUE(at_limits.ok()) << at_limits.status();
}

// The node's name is the one the scheduler accepts: a name it would refuse stops llamad
// at start, instead of a node that retries its registration for ever.
TEST(DaemonConfigTest, NodeIdIsAPlainName) {
  const struct {
    std::string node_id;
    std::string needle;
  } cases[] = {
      {"rack1/gpu3", "node_id: character 6 is '/'"},
      {"gpu 3", "node_id: character 4 is 0x20"},
      {"gpu\t3", "node_id: character 4 is 0x09"},
      {std::string(254, 'n'), "node_id: 254 characters, more than the 253 a node's name may have"},
  };
  for (const auto& c : cases) {
    auto config = Resolve({"--node-id=" + c.node_id});
    ASSERT_FALSE(config.ok()) << c.needle;
    EXPECT_NE(std::string(config.status().message()).find(c.needle), std::string::npos) << config.status();
  }
  for (const std::string name : {std::string(253, 'n'), std::string("Gpu-node_07.rack3")}) {
    auto config = Resolve({"--node-id=" + name});
    EXPECT_TRUE(config.ok()) << config.status();
  }
}

}  // namespace
