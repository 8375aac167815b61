#include "daemon/node_agent.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>

#include "core/exit_codes.h"
#include "core/threads.h"
#include "daemon/comm_address.h"
#include "daemon/devices.h"
#include "storage/files.h"
#include "train/jobspec.h"

namespace llamad::daemon {
namespace {

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

// One rank: its process, the reader threads of its stdout and stderr, and the lines
// they collected since the last heartbeat.
struct NodeAgent::Worker {
  pb::StartRank order;
  pid_t pid = -1;
  std::thread stdout_reader, stderr_reader;
  std::mutex mu;
  std::deque<std::string> metric_lines, log_lines;
  int64_t dropped = 0;
  std::string log_path;
  std::ofstream log;
  int64_t log_bytes = 0;
  bool exited = false;
  int exit_code = 0;
  int64_t kill_at_ms = 0;  // SIGKILL after this (0 = no stop requested)
  bool preempted = false;
  std::string device;  // the GPU its CUDA_VISIBLE_DEVICES names ("" for a CPU rank)

  // Keeps a line: on disk always (bounded by rotation), and for the scheduler up to
  // `max_lines` (the oldest are dropped and counted).
  void Keep(const std::string& line, bool metric, size_t max_lines, int64_t max_bytes) {
    std::lock_guard lock(mu);
    if (log.is_open()) {
      if (log_bytes + int64_t(line.size()) + 1 > max_bytes / 2) {
        log.close();
        std::error_code ec;
        std::filesystem::rename(log_path, log_path + ".1", ec);
        log.open(log_path, std::ios::trunc);
        log_bytes = 0;
      }
      log << line << '\n';
      log.flush();
      log_bytes += int64_t(line.size()) + 1;
    }
    auto& queue = metric ? metric_lines : log_lines;
    queue.push_back(line);
    if (queue.size() > max_lines) {
      queue.pop_front();
      if (!metric) ++dropped;
    }
  }
};

NodeAgent::NodeAgent(NodeAgentOptions options) : options_(std::move(options)) {}

NodeAgent::~NodeAgent() { Stop(false); }

void NodeAgent::Start() {
  loop_ = std::thread([this] { Loop(); });
}

absl::Status NodeAgent::ConnectToScheduler() {
  if (scheduler_rpc_ != nullptr) return absl::OkStatus();
  auto channel = rpc::Dial(options_.scheduler_address, options_.tls);
  if (!channel.ok()) return channel.status();
  scheduler_rpc_ = pb::Node::NewStub(*channel);
  return absl::OkStatus();
}

absl::Status NodeAgent::Register() {
  if (auto s = ConnectToScheduler(); !s.ok()) return s;
  pb::RegisterNodeRequest request;
  request.set_node_id(options_.node_id);
  request.set_hostname(options_.hostname);
  request.set_devices(options_.devices);
  request.set_device_kind(options_.device_kind);
  pb::RegisterNodeResponse response;
  grpc::ClientContext context;
  rpc::PrepareCall(context, options_.token, 5000);
  auto s = rpc::FromGrpc(scheduler_rpc_->RegisterNode(&context, request, &response),
                         fmt::format("registering with the scheduler at {}", options_.scheduler_address));
  if (!s.ok()) return s;
  heartbeat_interval_ms_ = std::max<int64_t>(10, response.heartbeat_interval_ms());
  return absl::OkStatus();
}

void NodeAgent::Loop() {
  int failures = 0;
  int64_t first_failure_ms = 0;
  int redials = 0;
  while (!stopping_.load()) {
    absl::Status s = registered_ ? HeartbeatOnce() : Register();
    if (s.ok()) {
      if (!registered_) {
        std::fprintf(stderr, "llamad: node %s registered with %d %s device(s) at %s\n", options_.node_id.c_str(),
                     options_.devices, options_.device_kind.c_str(), options_.scheduler_address.c_str());
      } else if (failures > 0) {
        // How long the scheduler did not hear from this node, against its lease.
        std::fprintf(stderr, "llamad: heartbeats reach the scheduler again, after %d failed over %.1f s\n", failures,
                     double(NowMs() - first_failure_ms) / 1e3);
      }
      registered_ = true;
      failures = 0;
      redials = 0;
    } else {
      if (failures == 0) first_failure_ms = NowMs();
      // A channel whose scheduler went away reconnects on gRPC's backoff, which was seen
      // to take 10 s after a 3 s restart (longer than a lease): every second without an
      // answer, the next attempt dials afresh.
      if (NowMs() - first_failure_ms >= 1000 * (redials + 1)) {
        scheduler_rpc_.reset();  // ConnectToScheduler dials again
        ++redials;
      }
      if (absl::IsNotFound(s)) registered_ = false;  // the scheduler asked for a new registration
      // The first failure and then one in thirty: a wrong address is said, not spammed.
      if (failures++ % 30 == 0) std::fprintf(stderr, "llamad: %s\n", std::string(s.message()).c_str());
    }
    ReapWorkers();
    const int64_t wait = registered_ ? heartbeat_interval_ms_ : 1000;
    for (int64_t waited = 0; waited < wait && !stopping_.load(); waited += 10) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  // On the thread that started the workers: their parent-death signal comes when it ends.
  StopWorkers();
}

absl::Status NodeAgent::HeartbeatOnce() {
  pb::HeartbeatRequest request;
  request.set_node_id(options_.node_id);
  std::vector<std::shared_ptr<Worker>> reported;
  {
    std::lock_guard lock(mu_);
    for (auto& [key, w] : workers_) {
      std::lock_guard wlock(w->mu);
      pb::RankReport* r = request.add_ranks();
      r->set_job_id(w->order.job_id());
      r->set_generation(w->order.generation());
      r->set_rank(w->order.rank());
      r->set_local_rank(w->order.local_rank());
      r->set_device(w->device);
      r->set_state(w->exited ? pb::RANK_STATE_EXITED : pb::RANK_STATE_RUNNING);
      r->set_exit_code(w->exit_code);
      r->set_preempted(w->preempted);
      for (auto& line : w->metric_lines) r->add_metric_lines(line);
      for (auto& line : w->log_lines) r->add_log_lines(line);
      r->set_dropped_log_lines(w->dropped);
      reported.push_back(w);
    }
  }
  request.set_stopping(stopping_.load());
  if (auto s = ConnectToScheduler(); !s.ok()) return s;
  pb::HeartbeatResponse response;
  grpc::ClientContext context;
  rpc::PrepareCall(context, options_.token, std::max<int64_t>(2000, 3 * heartbeat_interval_ms_));
  auto s = rpc::FromGrpc(scheduler_rpc_->Heartbeat(&context, request, &response),
                         fmt::format("heartbeat to the scheduler at {}", options_.scheduler_address));
  if (!s.ok()) return s;  // the lines stay buffered for the next beat
  // Delivered: forget the lines that were sent, and the workers whose exit was reported.
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < reported.size(); ++i) {
      Worker& w = *reported[i];
      const pb::RankReport& r = request.ranks(int(i));
      {
        std::lock_guard wlock(w.mu);
        w.metric_lines.erase(w.metric_lines.begin(), w.metric_lines.begin() + r.metric_lines_size());
        w.log_lines.erase(w.log_lines.begin(), w.log_lines.begin() + std::min<size_t>(w.log_lines.size(), r.log_lines_size()));
        w.dropped -= r.dropped_log_lines();
      }
      if (r.state() == pb::RANK_STATE_EXITED) {
        if (w.stdout_reader.joinable()) w.stdout_reader.join();
        if (w.stderr_reader.joinable()) w.stderr_reader.join();
        workers_.erase({r.job_id(), r.generation(), r.rank()});
      }
    }
  }
  if (response.reregister()) return absl::NotFoundError("the scheduler does not know this node; registering again");
  for (const pb::StopRank& stop : response.stop()) {
    std::lock_guard lock(mu_);
    auto it = workers_.find({stop.job_id(), stop.generation(), stop.rank()});
    if (it == workers_.end() || it->second->kill_at_ms != 0) continue;
    // SIGTERM: the rank finishes its step and saves it. Where a peer was lost that step may
    // never finish (a collective waits for the peer): SIGKILL.
    std::fprintf(stderr, "llamad: stopping job %s rank %d%s: %s\n", stop.job_id().c_str(), stop.rank(),
                 stop.save_step() ? " after its step" : " at once", stop.reason().c_str());
    SignalWorker(*it->second, stop.save_step() ? SIGTERM : SIGKILL);
    it->second->kill_at_ms = NowMs() + options_.stop_grace_ms;
  }
  {
    // An order the scheduler no longer repeats (its job moved on) waits no more.
    std::set<Key> ordered;
    for (const pb::StartRank& start : response.start()) {
      ordered.insert({start.job_id(), start.generation(), start.rank()});
    }
    std::lock_guard lock(mu_);
    std::erase_if(waiting_for_device_, [&](const Key& key) { return !ordered.contains(key); });
  }
  for (const pb::StartRank& start : response.start()) StartWorker(start);
  return absl::OkStatus();
}

absl::StatusOr<std::string> NodeAgent::AutoCommHostFor(int job_nodes) {
  // 0: a scheduler older than the field; the route's address serves one node too.
  if (job_nodes == 1) return AutoCommHost(options_.scheduler_address, 1);
  // The lookup may ask DNS, on the heartbeat thread: once a minute at most.
  const int64_t now = NowMs();
  if (auto_comm_host_.empty() || now - auto_comm_host_ms_ > 60'000) {
    auto chosen = AutoCommHost(options_.scheduler_address, std::max(job_nodes, 2));
    if (!chosen.ok()) {
      if (auto_comm_host_.empty()) return chosen.status();
      return auto_comm_host_;  // the last address that worked beats loopback
    }
    auto_comm_host_ = *chosen;
    auto_comm_host_ms_ = now;
  }
  return auto_comm_host_;
}

void NodeAgent::SignalWorker(Worker& w, int sig) {
  if (w.pid > 0 && !w.exited) ::kill(-w.pid, sig);  // the worker's process group
}

void NodeAgent::StartWorker(const pb::StartRank& order) {
  const Key key{order.job_id(), order.generation(), order.rank()};
  {
    std::lock_guard lock(mu_);
    if (workers_.contains(key) || stopping_.load()) return;  // already running, or exited and not yet reported
    // The device's rank of an ended generation may still be stopping (its grace runs up
    // to stop_grace_ms): the new rank waits for it, or both would hold the GPU's memory.
    // The scheduler repeats the order with every heartbeat until the rank runs.
    for (const auto& [other_key, other] : workers_) {
      if (other->exited || other->order.local_rank() != order.local_rank()) continue;
      if (waiting_for_device_.insert(key).second) {
        std::fprintf(stderr, "llamad: job %s generation %lld rank %d waits for device %d, still held by job %s "
                     "generation %lld rank %d\n",
                     order.job_id().c_str(), (long long)order.generation(), order.rank(), order.local_rank(),
                     other->order.job_id().c_str(), (long long)other->order.generation(), other->order.rank());
      }
      return;
    }
    waiting_for_device_.erase(key);
  }
  auto w = std::make_shared<Worker>();
  w->order = order;
  // A rank that cannot be started is reported as one that exited with `exit_code`: the
  // scheduler learns why from its last line, as it would from a rank's own.
  auto not_started = [&](int exit_code, const std::string& why) {
    w->exited = true;
    w->exit_code = exit_code;
    w->Keep(fmt::format("llamad: {}", why), false, options_.forward_max_lines, options_.log_max_bytes);
    std::lock_guard lock(mu_);
    workers_[key] = w;
  };
  const std::filesystem::path dir = std::filesystem::path(options_.data_dir) / "jobs" / order.job_id() /
                                    fmt::format("gen-{}", order.generation());
  // Each rank reads a spec of its own: a rank started later on this node never rewrites
  // the file a running one reads. As only the rank started here reads it, a checked write
  // does, without syncing the disk on the heartbeat's thread.
  const std::string spec_path = (dir / fmt::format("rank-{}.yaml", order.rank())).string();
  auto written = storage::CreateFolders(dir.string());
  if (written.ok()) written = storage::WriteFile(spec_path, order.spec_yaml());
  if (!written.ok()) return not_started(kExitFailure, std::string(written.message()));
  w->log_path = (dir / fmt::format("rank-{}.log", order.rank())).string();
  w->log.open(w->log_path, std::ios::app);

  // A restarted job (generation 2 on: a lost node, a preemption, `llamactl resume`)
  // continues from its latest checkpoint when it saves any; the first generation starts
  // fresh (and refuses to overwrite another run's checkpoints of the same name).
  auto spec = ParseJobSpec(order.spec_yaml(), order.spec_origin());
  const bool resumable =
      order.generation() > 1 && spec.ok() && !spec->checkpoint.dir.empty() && spec->checkpoint.interval > 0;
  const int cores = int(std::max(1L, ::sysconf(_SC_NPROCESSORS_ONLN)));
  const int threads =
      options_.worker_threads > 0 ? options_.worker_threads : std::clamp(cores / options_.devices, 1, kMaxThreads);
  std::vector<std::string> args = {options_.worker_binary, "train", "--config", spec_path,
                                   "--spec-origin", order.spec_origin(), "--log-format", "json",
                                   "--threads", std::to_string(threads)};
  if (resumable) args.insert(args.end(), {"-f", "latest"});
  std::string comm_host = options_.comm_host;
  if (comm_host == "auto") {
    auto chosen = AutoCommHostFor(order.nodes());
    if (chosen.ok()) {
      comm_host = *chosen;
    } else {
      // Ranks on this machine still reach it; the rank's log says why others may not.
      comm_host = "127.0.0.1";
      w->Keep(fmt::format("llamad: comm_host auto: {}; this node's ranks listen on {}, which only ranks on this "
                          "machine reach",
                          std::string(chosen.status().message()), comm_host),
              false, options_.forward_max_lines, options_.log_max_bytes);
    }
  }
  std::vector<std::pair<std::string, std::string>> env = {
      {"LLAMAD_RANK", std::to_string(order.rank())},
      {"LLAMAD_WORLD_SIZE", std::to_string(order.world_size())},
      {"LLAMAD_GENERATION", std::to_string(order.generation())},
      {"LLAMAD_RENDEZVOUS",
       // The scheduler, where this agent reaches it (the address it listens on may be a
       // wildcard that no other machine can dial).
       fmt::format("grpc://{}/{}/{}", options_.scheduler_address, order.job_id(), order.generation())},
      {"LLAMAD_TOKEN_FILE", options_.token_file},
      {"LLAMAD_COMM_HOST", comm_host},
      // How long a stopping rank has to save: a rank of the job's next generation waits
      // longer than that for the checkpoint store a stopping one still holds.
      {"LLAMAD_STOP_GRACE_MS", std::to_string(options_.stop_grace_ms)},
      {"LLAMAD_TLS_CA", options_.tls.ca},
      {"LLAMAD_TLS_CERT", options_.tls.cert},
      {"LLAMAD_TLS_KEY", options_.tls.key}};
  if (options_.device_kind == "cuda") {
    // Device N is the Nth GPU by PCI address, as nvidia-smi numbers them (CUDA's default
    // order puts the fastest first), so that "device N" in a drain reason names that GPU;
    // or the Nth of the GPUs llamad's own CUDA_VISIBLE_DEVICES leaves it (RankGpuFor).
    auto gpu = RankGpuFor(options_.cuda_visible_devices.c_str(), order.local_rank());
    if (!gpu.ok()) return not_started(kExitFailure, std::string(gpu.status().message()));
    w->device = gpu->visible_devices;
    if (!gpu->device_order.empty()) env.emplace_back("CUDA_DEVICE_ORDER", gpu->device_order);
    env.emplace_back("CUDA_VISIBLE_DEVICES", gpu->visible_devices);
  }

  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) {
    return not_started(127, fmt::format("cannot create pipes: {}", std::strerror(errno)));
  }
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) {
    const int error = errno;
    ::close(out_pipe[0]);
    ::close(out_pipe[1]);
    return not_started(127, fmt::format("cannot create pipes: {}", std::strerror(error)));
  }
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // The child's environment, built here: between fork and exec a child of this
  // multi-threaded process may only make async-signal-safe calls (setenv is not).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (std::none_of(env.begin(), env.end(), [&](const auto& kv) { return kv.first == name; })) {
      env_strings.push_back(entry);
    }
  }
  for (auto& [name, value] : env) env_strings.push_back(name + "=" + value);
  std::vector<char*> envp;
  for (auto& e : env_strings) envp.push_back(e.data());
  envp.push_back(nullptr);
  const std::string exec_failed = fmt::format("llamad: cannot run {}\n", args[0]);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  const int fork_error = errno;
  if (pid == 0) {
    ::setpgid(0, 0);
    // The daemon blocks SIGINT/SIGTERM in every thread (it takes them with sigwait), and
    // a signal mask survives fork and exec: unblock them, or the worker could be stopped
    // only by SIGKILL and would outlive a daemon that dies.
    sigset_t none;
    sigemptyset(&none);
    ::pthread_sigmask(SIG_SETMASK, &none, nullptr);
    // A worker never outlives its daemon. The signal comes when the thread that forked it
    // ends (the daemon's loop, which outlives its workers) or the daemon dies; a daemon
    // that stops stops its workers first, with SIGTERM, so that they save their step.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(128 + SIGKILL);
    ::signal(SIGPIPE, SIG_DFL);  // the daemon ignores it; an ignored signal survives exec
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    ::execve(argv[0], argv.data(), envp.data());
    [[maybe_unused]] auto written = ::write(2, exec_failed.data(), exec_failed.size());
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  if (pid < 0) {
    ::close(out_pipe[0]);
    ::close(err_pipe[0]);
    return not_started(127, fmt::format("cannot fork: {}", std::strerror(fork_error)));
  }
  w->pid = pid;
  ::setpgid(pid, pid);
  auto reader = [this, w](int fd, bool is_stdout) {
    std::string pending;
    char buffer[8192];
    ssize_t n;
    while ((n = ::read(fd, buffer, sizeof(buffer))) > 0 || (n < 0 && errno == EINTR)) {
      if (n < 0) continue;
      pending.append(buffer, size_t(n));
      size_t newline;
      while ((newline = pending.find('\n')) != std::string::npos) {
        std::string line = pending.substr(0, newline);
        pending.erase(0, newline + 1);
        const bool metric = is_stdout && !line.empty() && line.front() == '{';
        w->Keep(line, metric, options_.forward_max_lines, options_.log_max_bytes);
      }
    }
    if (!pending.empty()) w->Keep(pending, false, options_.forward_max_lines, options_.log_max_bytes);
    ::close(fd);
  };
  w->stdout_reader = std::thread(reader, out_pipe[0], true);
  w->stderr_reader = std::thread(reader, err_pipe[0], false);
  std::fprintf(stderr, "llamad: started job %s generation %lld rank %d/%d (pid %d, peers on %s), log %s\n",
               order.job_id().c_str(), (long long)order.generation(), order.rank(), order.world_size(), pid,
               comm_host.c_str(), w->log_path.c_str());
  std::lock_guard lock(mu_);
  workers_[key] = w;
}

void NodeAgent::ReapWorkers() {
  std::lock_guard lock(mu_);
  const int64_t now = NowMs();
  for (auto& [key, w] : workers_) {
    if (w->exited || w->pid <= 0) continue;
    int status = 0;
    const pid_t r = ::waitpid(w->pid, &status, WNOHANG);
    if (r == w->pid) {
      ::kill(-w->pid, SIGKILL);  // anything the worker left in its group holds the pipes
      // Wait for the readers so the last lines (a crash's message) go with the exit report.
      if (w->stdout_reader.joinable()) w->stdout_reader.join();
      if (w->stderr_reader.joinable()) w->stderr_reader.join();
      std::lock_guard wlock(w->mu);
      w->exited = true;
      w->exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      std::fprintf(stderr, "llamad: job %s rank %d exited with status %d\n", w->order.job_id().c_str(),
                   w->order.rank(), w->exit_code);
    } else if (w->kill_at_ms != 0 && now >= w->kill_at_ms) {
      SignalWorker(*w, SIGKILL);
    }
  }
}

int NodeAgent::running_workers() {
  std::lock_guard lock(mu_);
  int n = 0;
  for (auto& [key, w] : workers_) n += w->exited ? 0 : 1;
  return n;
}

void NodeAgent::Stop(bool preempted) {
  stop_preempted_.store(preempted);
  if (stopping_.exchange(true)) {
    if (loop_.joinable()) loop_.join();
    return;
  }
  // The loop stops the workers before it returns (StopWorkers).
  if (loop_.joinable()) {
    loop_.join();
  } else {
    StopWorkers();
  }
  std::lock_guard lock(mu_);
  for (auto& [key, w] : workers_) {
    if (w->stdout_reader.joinable()) w->stdout_reader.join();
    if (w->stderr_reader.joinable()) w->stderr_reader.join();
  }
  workers_.clear();
}

void NodeAgent::StopWorkers() {
  int64_t last_kill_ms = NowMs();
  {
    std::lock_guard lock(mu_);
    for (auto& [key, w] : workers_) {
      std::lock_guard wlock(w->mu);
      if (w->exited) continue;  // its exit, a failure maybe, is reported as it was
      w->preempted = stop_preempted_.load();
      if (w->kill_at_ms == 0) {  // one the scheduler stopped already keeps its deadline
        SignalWorker(*w, SIGTERM);
        w->kill_at_ms = NowMs() + options_.stop_grace_ms;
      }
      last_kill_ms = std::max(last_kill_ms, w->kill_at_ms);
    }
  }
  // The ranks finish their step and save it, which may take most of the grace: the node
  // keeps its lease meanwhile, and says that it is stopping so that it gets no new ranks.
  // Not for longer: a worker that outlives its SIGKILL (stuck in the kernel) must not hold
  // its job, which the lease's expiry then moves on. The daemon itself waits for it to
  // exit (or for its service manager's stop timeout), so that no worker outlives it.
  const int64_t beat_until_ms = last_kill_ms + 2 * heartbeat_interval_ms_;
  int64_t next_beat_ms = NowMs() + heartbeat_interval_ms_;
  while (running_workers() > 0) {
    ReapWorkers();
    if (registered_ && NowMs() >= next_beat_ms && NowMs() < beat_until_ms) {
      HeartbeatOnce().IgnoreError();
      next_beat_ms = NowMs() + heartbeat_interval_ms_;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // One last beat so the scheduler learns of the exits now, not by the lease.
  if (registered_) HeartbeatOnce().IgnoreError();
}

}  // namespace llamad::daemon
