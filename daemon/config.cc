#include "daemon/config.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <functional>
#include <variant>

#include "core/durations.h"
#include "core/threads.h"
#include "core/yaml_fields.h"
#include "proto/rpc.h"

namespace llamad::daemon {

DaemonFlags::DaemonFlags(CLI::App& app) {
  app.add_option("--config", config_path_, "YAML file with the fields below (flags win)");
  auto add = [&](std::string name, auto member, std::string help, std::string zero_means = "") {
    std::string flag = "--" + name;
    std::replace(flag.begin(), flag.end(), '_', '-');
    if (!zero_means.empty()) help += " (0: " + zero_means + ")";
    Field field{name, member, nullptr, zero_means};
    std::visit([&](auto m) { field.option = app.add_option(flag, flags_.*m, help); }, field.member);
    fields_.push_back(field);
  };
  add("role", &DaemonConfig::role, "node, scheduler or both");
  add("listen", &DaemonConfig::listen, "Scheduler listen address host:port");
  add("scheduler", &DaemonConfig::scheduler, "Scheduler address for the node agent (default: --listen)");
  add("data_dir", &DaemonConfig::data_dir, "State, job folders and rank logs");
  add("devices", &DaemonConfig::devices, "auto, cuda:N or cpu:N");
  add("node_id", &DaemonConfig::node_id, "This node's name (default: host name)");
  add("token_file", &DaemonConfig::token_file, "Bearer token file (default: DATA_DIR/token)");
  add("tls_ca", &DaemonConfig::tls_ca, "CA certificate (mutual TLS on a scheduler; server check on a node)");
  add("tls_cert", &DaemonConfig::tls_cert, "TLS certificate");
  add("tls_key", &DaemonConfig::tls_key, "TLS private key");
  add("heartbeat_interval_ms", &DaemonConfig::heartbeat_interval_ms, "Node heartbeat interval");
  add("lease_timeout_ms", &DaemonConfig::lease_timeout_ms, "Silence after which a node is lost");
  add("grow_after_ms", &DaemonConfig::grow_after_ms,
      "A job that shrank grows back onto free nodes after running this long", "never");
  add("previous_ranks_wait_ms", &DaemonConfig::previous_ranks_wait_ms,
      "A job's next generation waits this long at most for ranks saving the step they stopped after", "do not wait");
  add("max_fault_drained_percent", &DaemonConfig::max_fault_drained_percent,
      "GPU faults drain at most this percent of the nodes, and at least one", "none");
  add("forget_lost_nodes_after_ms", &DaemonConfig::forget_lost_nodes_after_ms,
      "A node lost this long, and not drained, leaves the scheduler's state", "never");
  add("worker_binary", &DaemonConfig::worker_binary, "llama-train (default: next to llamad)");
  add("worker_threads", &DaemonConfig::worker_threads, "CPU threads per rank", "cores / devices");
  add("comm_host", &DaemonConfig::comm_host, "Address this node's ranks listen on for their peers (auto: loopback for one-node jobs, "
      "else this machine's address on its route to the scheduler)");
  add("stop_grace_ms", &DaemonConfig::stop_grace_ms, "SIGTERM (a rank saves its step), then SIGKILL after this long");
}

absl::StatusOr<DaemonConfig> DaemonFlags::Resolve() const {
  DaemonConfig config;
  if (!config_path_.empty()) {
    YAML::Node root;
    try {
      root = YAML::LoadFile(config_path_);
    } catch (const YAML::BadFile&) {
      return absl::NotFoundError(fmt::format("{}: cannot open the llamad config", config_path_));
    } catch (const YAML::Exception& e) {
      return ConfigError(config_path_, fmt::format("not valid YAML: {}", e.what()));
    }
    YamlSection section(root, config_path_, "");
    for (const Field& f : fields_) {
      std::visit([&](auto m) { section.Get(f.name, &(config.*m)); }, f.member);
    }
    if (auto s = section.Finish(); !s.ok()) return s;
  }
  for (const Field& f : fields_) {
    if (f.option->count() > 0) std::visit([&](auto m) { config.*m = flags_.*m; }, f.member);
  }
  // Errors name the config file, or the command line when there is none.
  const std::string where = config_path_.empty() ? std::string("command line") : config_path_;
  if (config.role != "node" && config.role != "scheduler" && config.role != "both") {
    return ConfigError(where, fmt::format("role: '{}' is not one of node, scheduler, both", config.role));
  }
  if (config.data_dir.empty()) return ConfigError(where, "data_dir: must not be empty");
  // "" is the host name, which llamad checks when it starts a node.
  if (!config.node_id.empty()) {
    if (auto s = rpc::CheckNodeId(config.node_id); !s.ok()) return ConfigError(where, std::string(s.message()));
  }
  if (config.role == "node" && config.scheduler.empty()) {
    return ConfigError(where, "scheduler: a node needs the scheduler's address (host:port)");
  }
  for (const Field& f : fields_) {
    const auto* member = std::get_if<int64_t DaemonConfig::*>(&f.member);
    if (member == nullptr || !f.name.ends_with("_ms")) continue;
    if (const int64_t value = config.**member; value < 0 || value > kMaxDurationMs) {
      return ConfigError(where, fmt::format("{}: {} is not within [0, {}] ({} days{})", f.name, value, kMaxDurationMs,
                                            kMaxDurationMs / 86'400'000,
                                            f.zero_means.empty() ? "" : "; 0: " + f.zero_means));
    }
  }
  if (config.heartbeat_interval_ms <= 0 || config.lease_timeout_ms <= config.heartbeat_interval_ms) {
    return ConfigError(where, fmt::format("lease_timeout_ms: {} must exceed heartbeat_interval_ms {} (> 0)",
                                          config.lease_timeout_ms, config.heartbeat_interval_ms));
  }
  if (config.worker_threads < 0 || config.worker_threads > kMaxThreads) {
    return ConfigError(where, fmt::format("worker_threads: {} is not within [0, {}] (the most a rank takes)",
                                          config.worker_threads, kMaxThreads));
  }
  if (config.max_fault_drained_percent < 0 || config.max_fault_drained_percent > 100) {
    return ConfigError(where, fmt::format("max_fault_drained_percent: {} is not between 0 and 100",
                                          config.max_fault_drained_percent));
  }
  return config;
}

std::string DaemonFlags::ToYaml(const DaemonConfig& config) const {
  YAML::Emitter out;
  out << YAML::BeginMap;
  for (const Field& f : fields_) {
    out << YAML::Key << f.name << YAML::Value;
    std::visit([&](auto m) { out << config.*m; }, f.member);
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace llamad::daemon
