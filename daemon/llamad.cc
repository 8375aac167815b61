// llamad: the per-node daemon. The composition root: reads the config, then hosts the
// scheduler (role scheduler or both) and the node agent (role node or both), and stops
// them cleanly on SIGTERM/SIGINT (workers get SIGTERM, then SIGKILL after the grace
// period, and their jobs are requeued elsewhere).
#include <CLI/CLI.hpp>
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <filesystem>

#include "core/cli_integers.h"
#include "core/self_executable.h"
#include "daemon/config.h"
#include "daemon/devices.h"
#include "daemon/node_agent.h"
#include "scheduler/clock.h"
#include "scheduler/scheduler.h"
#include "scheduler/server.h"
#include "storage/files.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "llamad: %s\n", std::string(s.message()).c_str());
  return 2;
}

// Each rank's spec and log go under DATA_DIR/jobs. A node that cannot write there would
// take ranks only to fail each of them, so it says so at start instead.
absl::Status CheckJobFolders(const std::string& data_dir) {
  const std::string jobs = (std::filesystem::path(data_dir) / "jobs").string();
  const std::string probe = jobs + "/.write-check";
  absl::Status s = llamad::storage::CreateFolders(jobs);
  if (s.ok()) s = llamad::storage::WriteFile(probe, "");
  std::error_code ignored;
  std::filesystem::remove(probe, ignored);
  if (s.ok()) return s;
  return absl::InvalidArgumentError("data_dir: the ranks' folders cannot be written: " + std::string(s.message()));
}

std::string HostName() {
  char name[HOST_NAME_MAX + 1] = {};
  ::gethostname(name, sizeof(name) - 1);
  return name;
}

std::string SelfDir() { return std::filesystem::path(llamad::SelfExecutable()).parent_path().string(); }

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("llamad: the llamad node daemon and scheduler");
  llamad::daemon::DaemonFlags flags(app);
  bool check = false;
  app.add_flag("--check", check, "Check the config (file and flags), print it resolved, and exit");
  llamad::StrictIntegers(app);
  CLI11_PARSE(app, argc, argv);
  auto config = flags.Resolve();
  if (!config.ok()) return Fail(config.status());
  if (config->token_file.empty()) config->token_file = (std::filesystem::path(config->data_dir) / "token").string();
  const bool hosts_scheduler = config->role != "node";
  const bool hosts_node = config->role != "scheduler";
  // A configured name was checked with the config; the default, the host name, is checked
  // here, so that --check finds a host name that cannot name the node.
  if (hosts_node && config->node_id.empty()) {
    config->node_id = HostName();
    if (auto s = llamad::rpc::CheckNodeId(config->node_id); !s.ok()) {
      return Fail(absl::InvalidArgumentError(
          std::string(s.message()) + " (it is this machine's host name: give the node a name with node_id)"));
    }
  }
  if (check) {
    std::fputs(flags.ToYaml(*config).c_str(), stdout);
    return 0;
  }

  // Signals are taken by sigwait below, not by whichever thread they land on.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  const llamad::rpc::TlsFiles tls{config->tls_ca, config->tls_cert, config->tls_key};
  llamad::scheduler::SystemClock clock;
  std::unique_ptr<llamad::scheduler::Scheduler> scheduler;
  std::unique_ptr<llamad::scheduler::SchedulerServer> server;
  std::string token;
  std::string scheduler_address = config->scheduler;
  // What a node needs of this machine is checked before a scheduler starts beside it, so
  // that a daemon which cannot host its node exits without leaving a scheduler address.
  absl::StatusOr<llamad::daemon::Devices> devices;
  if (hosts_node) {
    devices = llamad::daemon::ResolveDevices(config->devices);
    if (!devices.ok()) return Fail(devices.status());
    if (auto s = CheckJobFolders(config->data_dir); !s.ok()) return Fail(s);
  }
  if (hosts_scheduler) {
    auto t = llamad::rpc::LoadOrCreateToken(config->token_file);
    if (!t.ok()) return Fail(t.status());
    token = *t;
    llamad::scheduler::SchedulerOptions options;
    options.data_dir = (std::filesystem::path(config->data_dir) / "scheduler").string();
    options.heartbeat_interval_ms = config->heartbeat_interval_ms;
    options.lease_timeout_ms = config->lease_timeout_ms;
    options.grow_after_ms = config->grow_after_ms;
    options.previous_ranks_wait_ms = config->previous_ranks_wait_ms;
    options.max_fault_drained_percent = static_cast<int>(config->max_fault_drained_percent);
    options.forget_lost_nodes_after_ms = config->forget_lost_nodes_after_ms;
    auto opened = llamad::scheduler::Scheduler::Open(options, &clock);
    if (!opened.ok()) return Fail(opened.status());
    scheduler = std::move(*opened);
    auto started = llamad::scheduler::SchedulerServer::Start(scheduler.get(), {config->listen, token, tls});
    if (!started.ok()) return Fail(started.status());
    server = std::move(*started);
    if (scheduler_address.empty()) scheduler_address = server->address();
    // Where a client (or a test) finds the scheduler when the port was chosen by the system.
    // Written whole or not at all: a reader that finds the file finds the address.
    const std::string address_file = (std::filesystem::path(config->data_dir) / "scheduler.address").string();
    if (auto s = llamad::storage::WriteFileAtomically(address_file, server->address() + "\n"); !s.ok()) {
      return Fail(s);
    }
    std::fprintf(stderr, "llamad: scheduler listening on %s%s; token file %s\n", server->address().c_str(),
                 tls.enabled() ? " (TLS)" : "", config->token_file.c_str());
  }

  std::unique_ptr<llamad::daemon::NodeAgent> agent;
  if (hosts_node) {
    if (token.empty()) {
      auto t = llamad::rpc::ReadToken(config->token_file);
      if (!t.ok()) return Fail(t.status());
      token = *t;
    }
    llamad::daemon::NodeAgentOptions options;
    options.scheduler_address = scheduler_address;
    options.tls = tls;
    options.token = token;
    options.token_file = config->token_file;
    options.hostname = HostName();
    options.node_id = config->node_id;
    options.devices = devices->count;
    options.device_kind = devices->kind;
    options.data_dir = config->data_dir;
    options.worker_binary = config->worker_binary.empty() ? SelfDir() + "/llama-train" : config->worker_binary;
    options.worker_threads = int(config->worker_threads);
    options.comm_host = config->comm_host;
    options.stop_grace_ms = config->stop_grace_ms;
    if (::access(options.worker_binary.c_str(), X_OK) != 0) {
      return Fail(absl::NotFoundError("worker_binary: " + options.worker_binary + " is not an executable"));
    }
    agent = std::make_unique<llamad::daemon::NodeAgent>(options);
    agent->Start();
  }

  int sig = 0;
  sigwait(&stop_signals, &sig);
  std::fprintf(stderr, "llamad: %s received; stopping\n", strsignal(sig));
  if (agent) agent->Stop(/*preempted=*/true);
  if (server) server->Shutdown();
  return 0;
}
