// The control plane under load, measured from outside: a real `llamad --role
// scheduler` process, driven over gRPC on loopback.
//
// Part 1 (simulated cluster): --nodes simulated nodes register and heartbeat every
// --heartbeat-ms, reporting the ranks the scheduler gave them; every rank "runs" for
// --job-seconds and then exits 0. Meanwhile jobs are submitted at --submit-per-s (1 to
// --max-job-nodes nodes each) and polled with GetJob/ListJobs the way llamactl does.
// Prints p50/p99/max latency per RPC and the scheduler process's CPU use.
//
// Part 2 (--daemons N, real workers): N `llamad --role node` daemons with one CPU slot
// each; a tiny N-node job is submitted --runs times. Prints the time from SubmitJob to
// all N llama-train processes alive, and to the job's first reported step.
#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/process_table.h"
#include "common/subprocess.h"
#include "common/synthetic_tokens.h"
#include "core/self_executable.h"
#include "llamad/v1/llamad.grpc.pb.h"
#include "proto/rpc.h"

namespace {
namespace fs = std::filesystem;
namespace pb = llamad::v1;
using Clock = std::chrono::steady_clock;
using llamad::testing::Subprocess;

// Flags: --name value, each optional.
struct Options {
  int nodes = 1000;            // simulated nodes (0: skip part 1)
  int devices = 8;             // devices per simulated node
  int heartbeat_ms = 1000;     // heartbeat interval of every node (and the scheduler's setting)
  double seconds = 20;         // measured seconds, after the warm-up
  double warmup = 5;           // seconds of load before measuring
  double submit_per_s = 2;     // jobs submitted per second
  int max_job_nodes = 16;      // each simulated job takes 1..this many nodes
  double job_seconds = 10;     // how long a simulated rank runs before it exits 0
  int threads = 8;             // client threads sending the heartbeats
  int daemons = 3;             // real node daemons for part 2 (0: skip)
  int runs = 5;                // submissions measured with the real daemons
};
Options options;


double SecondsSince(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// CPU seconds (user + system) a process has used so far.
double CpuSeconds(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  std::getline(stat, line);
  std::istringstream rest(line.substr(line.rfind(')') + 2));
  std::string field;
  unsigned long long utime = 0, stime = 0;
  for (int i = 3; i <= 15 && rest >> field; ++i) {
    if (i == 14) utime = std::stoull(field);
    if (i == 15) stime = std::stoull(field);
  }
  return double(utime + stime) / double(::sysconf(_SC_CLK_TCK));
}

long RssMiB(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with("VmRSS:")) return std::stol(line.substr(6)) / 1024;
  }
  return 0;
}

// Latencies of one RPC kind, in milliseconds; recorded only while `measuring`.
class Latencies {
 public:
  void Add(const std::string& rpc, double ms, bool ok) {
    std::lock_guard lock(mu_);
    auto& s = series_[rpc];
    s.ms.push_back(ms);
    if (!ok) ++s.errors;
  }
  void Print() const {
    std::printf("%-14s %9s %8s %9s %9s %9s\n", "rpc", "calls", "errors", "p50 ms", "p99 ms", "max ms");
    for (auto [rpc, s] : series_) {
      std::sort(s.ms.begin(), s.ms.end());
      auto at = [&](double q) { return s.ms.empty() ? 0.0 : s.ms[std::min(s.ms.size() - 1, size_t(q * s.ms.size()))]; };
      std::printf("%-14s %9zu %8zu %9.3f %9.3f %9.3f\n", rpc.c_str(), s.ms.size(), s.errors, at(0.50), at(0.99),
                  s.ms.empty() ? 0.0 : s.ms.back());
    }
  }

 private:
  struct Series {
    std::vector<double> ms;
    size_t errors = 0;
  };
  std::mutex mu_;
  std::map<std::string, Series> series_;
};

// A scheduler process on a loopback port of its own, with its data in `dir`.
struct SchedulerProcess {
  std::unique_ptr<Subprocess> process;
  std::string address, token;

  SchedulerProcess(const fs::path& bin, const fs::path& dir, int heartbeat_ms) {
    fs::create_directories(dir);
    process = std::make_unique<Subprocess>(
        (bin / "llamad").string() + " --role scheduler --listen 127.0.0.1:0 --data-dir " + dir.string() +
        " --heartbeat-interval-ms " + std::to_string(heartbeat_ms) + " --lease-timeout-ms " +
        std::to_string(10 * heartbeat_ms) + " > " + (dir / "llamad.log").string() + " 2>&1");
    for (int i = 0; i < 400 && !fs::exists(dir / "scheduler.address"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    std::ifstream(dir / "scheduler.address") >> address;
    if (auto t = llamad::rpc::ReadToken((dir / "token").string()); t.ok()) token = *t;
  }
  bool ok() const { return !address.empty() && !token.empty(); }
};

std::string JobSpec(const std::string& name, int nodes, int devices, int steps) {
  return "name: " + name + R"(
model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 2, global_batch_size: )" +
         std::to_string(2 * nodes * devices) + ", steps: " + std::to_string(steps) + R"(, lr: 3e-3}
data: {dataset: tokens.u32}
resources: {nodes: )" + std::to_string(nodes) + ", devices_per_node: " + std::to_string(devices) + "}\n";
}

// One channel per client thread: gRPC would otherwise multiplex every call of the
// process over a single TCP connection.
std::shared_ptr<grpc::Channel> Channel(const std::string& address, int index) {
  grpc::ChannelArguments args;
  args.SetInt("llamad.bench.channel", index);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

struct SimulatedNode {
  std::string id;
  Clock::time_point next_beat;
  struct Rank {
    pb::RankReport report;
    Clock::time_point ends;
    int64_t step = 0;
  };
  std::map<std::tuple<std::string, int64_t, int32_t>, Rank> ranks;
};

int SimulatedCluster(const fs::path& bin, const fs::path& dir) {
  const int node_count = options.nodes, devices = options.devices;
  const int heartbeat_ms = options.heartbeat_ms, threads = options.threads;
  const auto job_time = std::chrono::duration_cast<Clock::duration>(
      std::chrono::duration<double>(options.job_seconds));
  SchedulerProcess scheduler(bin, dir / "scheduler", heartbeat_ms);
  if (!scheduler.ok()) {
    std::fprintf(stderr, "bench-scheduler: the scheduler did not start (see %s)\n",
                 (dir / "scheduler" / "llamad.log").c_str());
    return 1;
  }
  std::printf("scheduler pid %d at %s; %d simulated nodes x %d devices, heartbeat every %d ms, %d client threads\n",
              scheduler.process->pid(), scheduler.address.c_str(), node_count, devices, heartbeat_ms, threads);

  Latencies latencies;
  std::atomic<bool> measuring{false}, done{false};
  auto call = [&](const std::string& rpc, auto&& f) {
    grpc::ClientContext context;
    llamad::rpc::PrepareCall(context, scheduler.token, 10'000);
    const auto start = Clock::now();
    const grpc::Status status = f(context);
    if (measuring.load()) latencies.Add(rpc, SecondsSince(start) * 1e3, status.ok());
    return status;
  };

  // Registration, spread over the threads; the heartbeats are spread over the interval.
  std::vector<std::vector<SimulatedNode>> shards(static_cast<size_t>(threads));
  for (int i = 0; i < node_count; ++i) {
    SimulatedNode node;
    node.id = "sim-" + std::to_string(i);
    node.next_beat = Clock::now() + std::chrono::milliseconds(int64_t(heartbeat_ms) * i / node_count);
    shards[size_t(i % threads)].push_back(std::move(node));
  }
  std::atomic<int64_t> started_ranks{0}, finished_ranks{0};
  std::vector<std::thread> beaters;
  for (int t = 0; t < threads; ++t) {
    beaters.emplace_back([&, t] {
      auto stub = pb::Node::NewStub(Channel(scheduler.address, t));
      for (SimulatedNode& node : shards[size_t(t)]) {
        pb::RegisterNodeRequest request;
        request.set_node_id(node.id);
        request.set_hostname(node.id);
        request.set_devices(devices);
        request.set_device_kind("cpu");
        pb::RegisterNodeResponse response;
        call("RegisterNode", [&](grpc::ClientContext& c) { return stub->RegisterNode(&c, request, &response); });
      }
      while (!done.load()) {
        auto next = std::min_element(shards[size_t(t)].begin(), shards[size_t(t)].end(),
                                     [](const SimulatedNode& a, const SimulatedNode& b) { return a.next_beat < b.next_beat; });
        std::this_thread::sleep_until(next->next_beat);
        next->next_beat += std::chrono::milliseconds(heartbeat_ms);
        const auto now = Clock::now();
        pb::HeartbeatRequest request;
        request.set_node_id(next->id);
        for (auto it = next->ranks.begin(); it != next->ranks.end();) {
          SimulatedNode::Rank& rank = it->second;
          pb::RankReport* report = request.add_ranks();
          *report = rank.report;
          if (now >= rank.ends) {
            report->set_state(pb::RANK_STATE_EXITED);
            report->set_exit_code(0);
            ++finished_ranks;
            it = next->ranks.erase(it);
            continue;
          }
          if (rank.report.rank() == 0) {  // progress, as a worker prints it
            report->add_metric_lines("{\"step\": " + std::to_string(++rank.step) +
                                     ", \"loss\": 3.5, \"lr\": 0.0003, \"tokens_per_s\": 50000.0}");
          }
          ++it;
        }
        pb::HeartbeatResponse response;
        if (!call("Heartbeat", [&](grpc::ClientContext& c) { return stub->Heartbeat(&c, request, &response); }).ok()) {
          continue;
        }
        for (const pb::StartRank& start : response.start()) {
          SimulatedNode::Rank rank;
          rank.report.set_job_id(start.job_id());
          rank.report.set_generation(start.generation());
          rank.report.set_rank(start.rank());
          rank.report.set_state(pb::RANK_STATE_RUNNING);
          rank.ends = now + job_time;
          if (next->ranks.emplace(std::make_tuple(start.job_id(), start.generation(), start.rank()), rank).second) {
            ++started_ranks;
          }
        }
        for (const pb::StopRank& stop : response.stop()) {
          next->ranks.erase(std::make_tuple(stop.job_id(), stop.generation(), stop.rank()));
        }
      }
    });
  }

  // Job churn and the polling of people and scripts watching it.
  std::atomic<int64_t> submitted{0};
  std::thread churn([&] {
    auto stub = pb::Scheduler::NewStub(Channel(scheduler.address, threads));
    std::mt19937 random(7);
    std::uniform_int_distribution<int> job_nodes(1, options.max_job_nodes);
    const auto period = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(1.0 / options.submit_per_s));
    std::vector<std::string> ids;
    auto next = Clock::now();
    while (!done.load()) {
      std::this_thread::sleep_until(next);
      next += period;
      pb::SubmitJobRequest submit;
      submit.set_spec_yaml(JobSpec("churn-" + std::to_string(submitted.load()), job_nodes(random), devices, 100));
      submit.set_spec_origin((dir / "churn.yaml").string());
      submit.set_owner("bench");
      pb::SubmitJobResponse job;
      if (call("SubmitJob", [&](grpc::ClientContext& c) { return stub->SubmitJob(&c, submit, &job); }).ok()) {
        ++submitted;
        ids.push_back(job.job().id());
      }
      pb::GetJobRequest get;
      get.set_job_id(ids.empty() ? "none" : ids[random() % ids.size()]);
      pb::Job got;
      call("GetJob", [&](grpc::ClientContext& c) { return stub->GetJob(&c, get, &got); });
      pb::ListJobsRequest list;
      pb::ListJobsResponse listed;
      call("ListJobs", [&](grpc::ClientContext& c) { return stub->ListJobs(&c, list, &listed); });
    }
  });

  std::this_thread::sleep_for(std::chrono::duration<double>(options.warmup));
  const pid_t pid = scheduler.process->pid();
  const double cpu_before = CpuSeconds(pid), self_before = CpuSeconds(::getpid());
  const int64_t started_before = started_ranks.load(), finished_before = finished_ranks.load();
  const int64_t submitted_before = submitted.load();
  const auto window = Clock::now();
  measuring = true;
  std::this_thread::sleep_for(std::chrono::duration<double>(options.seconds));
  measuring = false;
  const double wall = SecondsSince(window);
  const double cpu = CpuSeconds(pid) - cpu_before, self = CpuSeconds(::getpid()) - self_before;
  done = true;
  for (auto& t : beaters) t.join();
  churn.join();

  latencies.Print();
  std::printf("over %.1f s: %lld jobs submitted, %lld ranks started, %lld ranks finished\n", wall,
              (long long)(submitted.load() - submitted_before), (long long)(started_ranks.load() - started_before),
              (long long)(finished_ranks.load() - finished_before));
  std::printf("scheduler CPU: %.3f cores (%.2f s in %.1f s), RSS %ld MiB; this load generator: %.3f cores\n",
              cpu / wall, cpu, wall, RssMiB(pid), self / wall);
  return 0;
}

int RealDaemons(const fs::path& bin, const fs::path& dir) {
  const int daemons = options.daemons, runs = options.runs;
  SchedulerProcess scheduler(bin, dir / "real-scheduler", options.heartbeat_ms);
  if (!scheduler.ok()) return 1;
  llamad::testing::WriteSyntheticTokens(dir / "tokens.u32");
  std::vector<std::unique_ptr<Subprocess>> nodes;
  std::set<pid_t> node_pids;
  for (int i = 0; i < daemons; ++i) {
    const fs::path data = dir / ("node" + std::to_string(i));
    nodes.push_back(std::make_unique<Subprocess>(
        (bin / "llamad").string() + " --role node --node-id node" + std::to_string(i) +
        " --devices cpu:1 --worker-threads 1 --scheduler " + scheduler.address + " --token-file " +
        (dir / "real-scheduler" / "token").string() + " --data-dir " + data.string() + " > " +
        (dir / ("node" + std::to_string(i) + ".log")).string() + " 2>&1"));
    node_pids.insert(nodes.back()->pid());
  }
  auto stub = pb::Scheduler::NewStub(Channel(scheduler.address, 0));
  auto call = [&](auto&& f) {
    grpc::ClientContext context;
    llamad::rpc::PrepareCall(context, scheduler.token, 10'000);
    return f(context);
  };
  // Wait for every daemon to register.
  for (int i = 0; i < 200; ++i) {
    pb::ListNodesResponse listed;
    call([&](grpc::ClientContext& c) { return stub->ListNodes(&c, pb::ListNodesRequest(), &listed); });
    if (listed.nodes_size() == daemons) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  std::printf("\n%d llamad node daemons (1 CPU slot each), scheduler heartbeat interval %d ms\n", daemons,
              options.heartbeat_ms);
  std::printf("%-4s %22s %22s\n", "run", "submit->ranks alive s", "submit->first step s");
  std::vector<double> alive_s, step_s;
  std::mt19937 random(11);
  for (int run = 0; run < runs; ++run) {
    // Submissions land at a random point of the daemons' heartbeat cycle, as a user's do.
    std::this_thread::sleep_for(std::chrono::milliseconds(random() % unsigned(options.heartbeat_ms)));
    pb::SubmitJobRequest submit;
    submit.set_spec_yaml(JobSpec("latency-" + std::to_string(run), daemons, 1, 100000));
    submit.set_spec_origin((dir / "latency.yaml").string());
    pb::SubmitJobResponse job;
    const auto submitted = Clock::now();
    if (!call([&](grpc::ClientContext& c) { return stub->SubmitJob(&c, submit, &job); }).ok()) return 1;
    double alive = -1, first_step = -1;
    while (SecondsSince(submitted) < 120 && (alive < 0 || first_step < 0)) {
      if (alive < 0 && int(llamad::testing::LiveChildren(node_pids, "llama-train").size()) == daemons) {
        alive = SecondsSince(submitted);
      }
      if (first_step < 0) {
        pb::GetJobRequest get;
        get.set_job_id(job.job().id());
        pb::Job got;
        if (call([&](grpc::ClientContext& c) { return stub->GetJob(&c, get, &got); }).ok() &&
            got.progress().step() >= 1) {
          first_step = SecondsSince(submitted);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::printf("%-4d %22.3f %22.3f\n", run + 1, alive, first_step);
    alive_s.push_back(alive);
    step_s.push_back(first_step);
    pb::CancelJobRequest cancel;
    cancel.set_job_id(job.job().id());
    pb::Job cancelled;
    call([&](grpc::ClientContext& c) { return stub->CancelJob(&c, cancel, &cancelled); });
    for (int i = 0; i < 400 && !llamad::testing::LiveChildren(node_pids, "llama-train").empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
  }
  std::sort(alive_s.begin(), alive_s.end());
  std::sort(step_s.begin(), step_s.end());
  std::printf("median: ranks alive %.3f s, first step %.3f s after SubmitJob\n", alive_s[alive_s.size() / 2],
              step_s[step_s.size() / 2]);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void(const char*)>> flags = {
      {"--nodes", [](const char* v) { options.nodes = std::atoi(v); }},
      {"--devices", [](const char* v) { options.devices = std::atoi(v); }},
      {"--heartbeat-ms", [](const char* v) { options.heartbeat_ms = std::atoi(v); }},
      {"--seconds", [](const char* v) { options.seconds = std::atof(v); }},
      {"--warmup", [](const char* v) { options.warmup = std::atof(v); }},
      {"--submit-per-s", [](const char* v) { options.submit_per_s = std::atof(v); }},
      {"--max-job-nodes", [](const char* v) { options.max_job_nodes = std::atoi(v); }},
      {"--job-seconds", [](const char* v) { options.job_seconds = std::atof(v); }},
      {"--threads", [](const char* v) { options.threads = std::atoi(v); }},
      {"--daemons", [](const char* v) { options.daemons = std::atoi(v); }},
      {"--runs", [](const char* v) { options.runs = std::atoi(v); }},
  };
  for (int i = 1; i < argc; i += 2) {
    auto flag = flags.find(argv[i]);
    if (flag == flags.end() || i + 1 >= argc) {
      std::fprintf(stderr, "usage: bench-scheduler [--FLAG VALUE]...; flags:");
      for (const auto& [name, set] : flags) std::fprintf(stderr, " %s", name.c_str());
      std::fprintf(stderr, "\n");
      return 2;
    }
    flag->second(argv[i + 1]);
  }
  if (options.heartbeat_ms <= 0 || options.threads <= 0 || options.submit_per_s <= 0 || options.devices <= 0 ||
      options.max_job_nodes <= 0 || options.nodes < 0 || options.daemons < 0 || options.runs <= 0) {
    std::fprintf(stderr, "bench-scheduler: counts, rates and intervals must be positive\n");
    return 2;
  }
  const fs::path bin = fs::path(llamad::SelfExecutable()).parent_path();
  const fs::path dir = fs::temp_directory_path() / ("llamad-bench-scheduler-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  int code = options.nodes > 0 ? SimulatedCluster(bin, dir) : 0;
  if (code == 0 && options.daemons > 0) code = RealDaemons(bin, dir);
  std::error_code ec;
  fs::remove_all(dir, ec);
  return code;
}
