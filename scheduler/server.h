// The scheduler on the network: its three gRPC services (Scheduler, Node, Rendezvous)
// on one listening port, every call checked against the bearer token, and a timer that
// expires leases between heartbeats.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "proto/rpc.h"
#include "scheduler/scheduler.h"

namespace llamad::scheduler {

struct ServerOptions {
  std::string listen_address = "127.0.0.1:7070";  // "host:port"; port 0 picks a free one
  std::string token;                              // the bearer token every call must carry
  rpc::TlsFiles tls;                              // empty: plain TCP
};

class SchedulerServer {
 public:
  // Starts serving `scheduler` (which must outlive the server).
  static absl::StatusOr<std::unique_ptr<SchedulerServer>> Start(Scheduler* scheduler, const ServerOptions& options);
  ~SchedulerServer();  // Shutdown()

  // "host:port" it listens on (the real port when 0 was asked for).
  const std::string& address() const { return address_; }
  // Stops accepting calls, ends open streams and joins the timer. Idempotent.
  void Shutdown();

 private:
  SchedulerServer() = default;
  class SchedulerService;
  class NodeService;
  class RendezvousService;

  Scheduler* scheduler_ = nullptr;
  std::string address_;
  std::unique_ptr<SchedulerService> scheduler_service_;
  std::unique_ptr<NodeService> node_service_;
  std::unique_ptr<RendezvousService> rendezvous_service_;
  std::unique_ptr<grpc::Server> server_;
  std::atomic<bool> stopping_{false};
  // The lease timer waits on timer_wake_ between ticks; Shutdown wakes it.
  std::mutex timer_mu_;
  std::condition_variable timer_wake_;
  std::thread timer_;
};

}  // namespace llamad::scheduler
