#include "daemon/comm_address.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>

namespace llamad::daemon {
namespace {

// Whether ranks on other machines could dial `literal` (a numeric address): not a
// loopback address, and not an IPv6 link-local one (which needs its interface's scope,
// lost in the text form).
bool ReachableFromOtherHosts(const std::string& literal) {
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST;
  addrinfo* parsed = nullptr;
  if (::getaddrinfo(literal.c_str(), nullptr, &hints, &parsed) != 0) return false;
  bool reachable = true;
  if (parsed->ai_family == AF_INET) {
    reachable = (ntohl(reinterpret_cast<const sockaddr_in*>(parsed->ai_addr)->sin_addr.s_addr) >> 24) != 127;
  } else if (parsed->ai_family == AF_INET6) {
    const in6_addr& a = reinterpret_cast<const sockaddr_in6*>(parsed->ai_addr)->sin6_addr;
    reachable = !IN6_IS_ADDR_LOOPBACK(&a) && !IN6_IS_ADDR_LINKLOCAL(&a) &&
                !(IN6_IS_ADDR_V4MAPPED(&a) && a.s6_addr[12] == 127);
  }
  ::freeaddrinfo(parsed);
  return reachable;
}

}  // namespace

absl::StatusOr<std::string> HostOfAddress(const std::string& address) {
  std::string rest = address;
  for (const char* scheme : {"dns:///", "dns:", "ipv4:", "ipv6:"}) {
    if (rest.rfind(scheme, 0) == 0) {
      rest = rest.substr(std::strlen(scheme));
      break;
    }
  }
  std::string host;
  if (!rest.empty() && rest[0] == '[') {
    const size_t close = rest.find(']');
    if (close == std::string::npos) return absl::InvalidArgumentError(fmt::format("'{}': no ']' after '['", address));
    host = rest.substr(1, close - 1);
  } else {
    const size_t colon = rest.rfind(':');
    if (colon == std::string::npos || rest.find("://") != std::string::npos) {
      return absl::InvalidArgumentError(fmt::format("'{}' is not host:port", address));
    }
    host = rest.substr(0, colon);
  }
  if (host.empty()) return absl::InvalidArgumentError(fmt::format("'{}' names no host", address));
  return host;
}

absl::StatusOr<std::string> RouteSourceToward(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  // Any port: a UDP connect only picks the route.
  if (int rc = ::getaddrinfo(host.c_str(), "9", &hints, &found); rc != 0) {
    return absl::NotFoundError(fmt::format("cannot resolve '{}': {}", host, gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owned(found, &::freeaddrinfo);
  std::string why = "no address";
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    sockaddr_storage local{};
    socklen_t length = sizeof local;
    const bool routed = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0 &&
                        ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &length) == 0;
    if (!routed) why = std::strerror(errno);
    ::close(fd);
    if (!routed) continue;
    char text[INET6_ADDRSTRLEN] = {};
    const void* bytes = local.ss_family == AF_INET
                            ? static_cast<const void*>(&reinterpret_cast<const sockaddr_in*>(&local)->sin_addr)
                            : static_cast<const void*>(&reinterpret_cast<const sockaddr_in6*>(&local)->sin6_addr);
    if (::inet_ntop(local.ss_family, bytes, text, sizeof text) == nullptr) {
      why = std::strerror(errno);
      continue;
    }
    return std::string(text);
  }
  return absl::UnavailableError(fmt::format("no route to '{}': {}", host, why));
}

absl::StatusOr<std::string> AutoCommHost(const std::string& scheduler_address, int job_nodes) {
  if (job_nodes <= 1) return std::string("127.0.0.1");
  auto host = HostOfAddress(scheduler_address);
  if (!host.ok()) {
    return absl::InvalidArgumentError(fmt::format("scheduler address {}", std::string(host.status().message())));
  }
  auto source = RouteSourceToward(*host);
  if (!source.ok()) return source.status();
  if (ReachableFromOtherHosts(*source)) return source;
  // The scheduler is dialled on this machine's loopback (or a wildcard address): its
  // route says nothing of the cluster's network. The default route's source is the
  // machine's address in most clusters. 192.0.2.1 and 2001:db8::1 are documentation
  // addresses, which no route but the default one covers (where one is this machine's
  // own subnet, its source is this machine's address there, which serves as well).
  for (const char* outside : {"192.0.2.1", "2001:db8::1"}) {
    auto outward = RouteSourceToward(outside);
    if (outward.ok() && ReachableFromOtherHosts(*outward)) return outward;
  }
  return absl::UnavailableError(fmt::format(
      "the scheduler ({}) is reached over loopback and this machine has no default route, so the address its "
      "ranks should listen on for peers on other nodes is unknown: set comm_host in the llamad config (or "
      "--comm-host) to this machine's address on the cluster network",
      scheduler_address));
}

}  // namespace llamad::daemon
