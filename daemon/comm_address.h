// The address a node's ranks listen on for their peers (Gloo's TCP pairs) when the
// llamad config leaves it to llamad (comm_host: auto).
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace llamad::daemon {

// The address to listen on for a job that spans `job_nodes` nodes:
//  - one node: loopback, which no other machine can reach and no firewall stops;
//  - several: the source address of this machine's route to the scheduler, which is
//    the address the scheduler sees this node at, so the other nodes of a cluster on
//    one network reach it there too. Where that route is loopback (the scheduler runs
//    here and `scheduler_address` is a loopback or wildcard address), the source
//    address of the default route instead.
// An error says why neither route gives an address (the node agent then listens on
// loopback, and says so in the rank's log).
absl::StatusOr<std::string> AutoCommHost(const std::string& scheduler_address, int job_nodes);

// The local address this machine's packets to `host` (a name or an IPv4/IPv6 literal)
// would leave from, as the kernel's routing picks it; nothing is sent.
absl::StatusOr<std::string> RouteSourceToward(const std::string& host);

// "host:port", "[v6]:port" or gRPC's "dns:///host:port" -> host. Errors name `address`.
absl::StatusOr<std::string> HostOfAddress(const std::string& address);

}  // namespace llamad::daemon
