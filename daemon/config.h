// llamad's configuration: /etc/llamad/llamad.yaml, every field also a flag
// (--listen, --scheduler, ...; flags win over the file).
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace CLI {
class App;
class Option;
}

namespace llamad::daemon {

struct DaemonConfig {
  std::string role = "both";             // node | scheduler | both
  std::string listen = "127.0.0.1:7070"; // the scheduler's address (role scheduler/both)
  std::string scheduler;                 // where the node agent finds it ("" = listen)
  std::string data_dir = "/var/lib/llamad";  // scheduler state, job folders, rank logs
  std::string devices = "auto";          // auto (GPUs through CUDA, else cpu:1), cuda:N or cpu:N
  std::string node_id;                   // default: the host name
  std::string token_file;                // default: <data_dir>/token (created 0600 by a scheduler)
  std::string tls_ca, tls_cert, tls_key; // TLS / mutual TLS when set
  int64_t heartbeat_interval_ms = 1000;  // node heartbeats (the scheduler's setting)
  int64_t lease_timeout_ms = 5000;       // silence after which a node is lost
  int64_t grow_after_ms = 60'000;        // a shrunk job grows back after running this long (0: never)
  int64_t previous_ranks_wait_ms = 600'000;  // a next generation waits this long at most for saving ranks
  int64_t max_fault_drained_percent = 10;  // GPU faults drain at most this % of the nodes (at least 1; 0: none)
  int64_t forget_lost_nodes_after_ms = 24 * 3'600'000;  // undrained nodes lost this long are forgotten (0: never)
  std::string worker_binary;             // llama-train (default: next to llamad)
  int64_t worker_threads = 0;            // CPU threads per rank (0 = cores / devices)
  std::string comm_host = "auto";        // address this node's ranks listen on for peers
                                         // (auto: AutoCommHost, daemon/comm_address.h)
  int64_t stop_grace_ms = 10000;         // SIGTERM to a worker, then SIGKILL after this
};

// Adds one flag per field to `app`, and --config.
class DaemonFlags {
 public:
  explicit DaemonFlags(CLI::App& app);
  // The file (when --config was given), then the flags that were given.
  absl::StatusOr<DaemonConfig> Resolve() const;
  // `config` as the YAML file that would give it, one field per line (`llamad --check`).
  std::string ToYaml(const DaemonConfig& config) const;

 private:
  // One field: its YAML key (the flag is --key with '-' for '_') and where it lives.
  struct Field {
    std::string name;
    std::variant<std::string DaemonConfig::*, int64_t DaemonConfig::*> member;
    CLI::Option* option = nullptr;
    std::string zero_means;  // what 0 means, where it means something of its own (help and errors)
  };
  std::string config_path_;
  DaemonConfig flags_;
  std::vector<Field> fields_;
};

}  // namespace llamad::daemon
