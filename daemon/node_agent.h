// The node agent of llamad: registers this machine's devices with the scheduler,
// heartbeats, and runs the ranks the scheduler assigns as child processes
// (`llama-train train ...`), forwarding their JSON step lines and stderr and reporting
// their exits. A worker that crashes is reported, never fatal to the agent.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "daemon/devices.h"
#include "llamad/v1/llamad.grpc.pb.h"
#include "proto/rpc.h"

namespace llamad::daemon {

namespace pb = ::llamad::v1;

struct NodeAgentOptions {
  std::string scheduler_address;      // "host:port" of the scheduler
  rpc::TlsFiles tls;                  // how to reach it (empty: plain TCP)
  std::string token;                  // bearer token
  std::string token_file;             // the same token's file, handed to the workers
  std::string node_id;                // this node's name at the scheduler
  std::string hostname;               // informational
  int devices = 1;                    // devices (GPUs or CPU slots) offered
  std::string device_kind = "cpu";    // "cuda" (one rank per GPU) or "cpu"
  std::string data_dir;               // jobs/<job>/gen-<g>/: spec copies and rank logs
  std::string worker_binary;          // llama-train
  std::string comm_host = "auto";     // where this node's ranks listen for their peers (auto: AutoCommHost)
  int worker_threads = 0;             // CPU threads per rank (0 = cores / devices)
  // llamad's own CUDA_VISIBLE_DEVICES ("" where unset): the GPUs its ranks may take
  // (RankGpuFor). OwnCudaVisibleDevices() reads it.
  std::string cuda_visible_devices = OwnCudaVisibleDevices();
  int64_t stop_grace_ms = 10'000;     // SIGTERM, then SIGKILL after this long
  int64_t log_max_bytes = 64 << 20;   // per rank log file; the older half is rotated to .1
  size_t forward_max_lines = 5'000;   // lines buffered per rank between heartbeats
};

class NodeAgent {
 public:
  explicit NodeAgent(NodeAgentOptions options);
  ~NodeAgent();  // Stop(false)

  // Starts the heartbeat thread. It registers first, retrying every second while the
  // scheduler cannot be reached, and says so on stderr.
  void Start();
  // Stops every worker (SIGTERM: a rank finishes its step and saves it; SIGKILL after the
  // grace period), heartbeating meanwhile as a node that takes no new ranks, reports their
  // exits (as preempted when `preempted`: the scheduler requeues their jobs), and returns.
  void Stop(bool preempted);

  // The ranks this node runs now (tests and status).
  int running_workers();

 private:
  struct Worker;
  using Key = std::tuple<std::string, int64_t, int32_t>;  // job, generation, rank

  void Loop();
  // SIGTERM to every worker (SIGKILL after the grace period), heartbeating until they
  // have exited, then one beat more: run by the loop as it ends, or by Stop without one.
  void StopWorkers();
  // Connects scheduler_rpc_ to the scheduler unless it is connected (again after the
  // heartbeat loop dropped it).
  absl::Status ConnectToScheduler();
  absl::Status Register();
  absl::Status HeartbeatOnce();
  void StartWorker(const pb::StartRank& order);
  // comm_host auto for a job on `job_nodes` nodes (0: not known).
  absl::StatusOr<std::string> AutoCommHostFor(int job_nodes);
  void SignalWorker(Worker& w, int sig);
  void ReapWorkers();
  std::unique_ptr<pb::Node::Stub> scheduler_rpc_;

  NodeAgentOptions options_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> stop_preempted_{false};  // Stop's argument, for StopWorkers
  std::thread loop_;
  int64_t heartbeat_interval_ms_ = 1000;
  bool registered_ = false;  // with the scheduler (heartbeat thread; Stop after it ends)
  // Starts held back while their device's earlier rank stops (logged once each).
  std::set<Key> waiting_for_device_;
  // The last multi-node comm_host auto gave, and when (heartbeat thread only).
  std::string auto_comm_host_;
  int64_t auto_comm_host_ms_ = 0;
  std::mutex mu_;
  std::map<Key, std::shared_ptr<Worker>> workers_;
};

}  // namespace llamad::daemon
