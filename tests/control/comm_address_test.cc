// comm_host auto (daemon/comm_address.h). Across real hosts: tests/ops/netns_cluster_test.sh.
#include "daemon/comm_address.h"

#include <gtest/gtest.h>

namespace llamad::daemon {
namespace {

TEST(CommAddressTest, HostOfAddressReadsEveryFormTheSchedulerAddressTakes) {
  EXPECT_EQ(*HostOfAddress("10.0.0.1:7070"), "10.0.0.1");
  EXPECT_EQ(*HostOfAddress("head-0.cluster:7070"), "head-0.cluster");
  EXPECT_EQ(*HostOfAddress("[fd00::1]:7070"), "fd00::1");
  EXPECT_EQ(*HostOfAddress("dns:///head:7070"), "head");
  EXPECT_EQ(*HostOfAddress("ipv4:10.0.0.1:7070"), "10.0.0.1");
  for (const char* bad : {"head", ":7070", "[fd00::1:7070", "unix:///run/llamad.sock"}) {
    auto host = HostOfAddress(bad);
    ASSERT_FALSE(host.ok()) << bad << " gave " << *host;
    EXPECT_NE(host.status().message().find(bad), std::string::npos) << host.status();
  }
}

TEST(CommAddressTest, OneNodeJobsListenOnLoopback) {
  // Whatever the route to the scheduler: no other machine needs to reach these ranks.
  EXPECT_EQ(*AutoCommHost("10.0.0.1:7070", 1), "127.0.0.1");
  EXPECT_EQ(*AutoCommHost("not-a-host.invalid.:7070", 1), "127.0.0.1");
}

TEST(CommAddressTest, RouteToLoopbackLeavesFromLoopback) {
  auto source = RouteSourceToward("127.0.0.1");
  ASSERT_TRUE(source.ok()) << source.status();
  EXPECT_EQ(*source, "127.0.0.1");
}

TEST(CommAddressTest, SchedulerOnThisMachineGivesTheDefaultRouteOrAsksForCommHost) {
  // Ranks of a job across nodes must not listen on loopback: the scheduler dialled on
  // loopback or a wildcard says nothing of the cluster's network.
  for (const char* scheduler : {"127.0.0.1:7070", "0.0.0.0:7070", "localhost:7070"}) {
    auto chosen = AutoCommHost(scheduler, 2);
    if (chosen.ok()) {
      EXPECT_NE(chosen->rfind("127.", 0), 0u) << scheduler << " gave " << *chosen;
      EXPECT_NE(*chosen, "::1") << scheduler;
      // The default route's source, IPv4's where there is one.
      auto v4 = RouteSourceToward("192.0.2.1");
      auto v6 = RouteSourceToward("2001:db8::1");
      const bool from_default_route = (v4.ok() && *chosen == *v4) || (v6.ok() && *chosen == *v6);
      EXPECT_TRUE(from_default_route) << scheduler << " gave " << *chosen;
    } else {
      EXPECT_NE(chosen.status().message().find("set comm_host"), std::string::npos) << chosen.status();
    }
  }
}

TEST(CommAddressTest, UnresolvableSchedulerIsNamed) {
  auto chosen = AutoCommHost("not-a-host.invalid.:7070", 2);
  ASSERT_FALSE(chosen.ok());
  EXPECT_NE(chosen.status().message().find("not-a-host.invalid"), std::string::npos) << chosen.status();
}

}  // namespace
}  // namespace llamad::daemon
