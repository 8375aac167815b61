// Whole clusters on loopback: a `llamad --role scheduler` process, node daemons with
// CPU slots (`llamad --role node`), real llama-train workers, and llamactl as the user.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "common/process_table.h"
#include "common/subprocess.h"
#include "common/synthetic_tokens.h"

namespace {
namespace fs = std::filesystem;
using llamad::testing::Subprocess;

const std::string kBin = LLAMAD_BIN_DIR;

class ClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("llamad-cluster-test-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    llamad::testing::WriteSyntheticTokens(dir_ / "tokens.u32");
    StartScheduler();
  }
  void TearDown() override {
    nodes_.clear();
    scheduler_.reset();
    fs::remove_all(dir_);
  }

  void StartScheduler(const std::string& listen = "127.0.0.1:0", const std::string& flags = "") {
    fs::remove(dir_ / "sched" / "scheduler.address");
    scheduler_ = std::make_unique<Subprocess>(kBin + "/llamad --role scheduler --listen " + listen + " --data-dir " +
                                              (dir_ / "sched").string() +
                                              " --heartbeat-interval-ms 100 --lease-timeout-ms 3000 " + flags);
    for (int i = 0; i < 200 && !fs::exists(dir_ / "sched" / "scheduler.address"); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::ifstream(dir_ / "sched" / "scheduler.address") >> address_;
    ASSERT_FALSE(address_.empty()) << scheduler_->Drain();
  }
  // A node daemon of this cluster, its data_dir under the test's folder.
  std::string NodeCommand(const std::string& id, const std::string& flags = "", int devices = 1) {
    return kBin + "/llamad --role node --node-id " + id + " --devices cpu:" + std::to_string(devices) +
           " --worker-threads 1 --scheduler " + address_ + " --token-file " + (dir_ / "sched" / "token").string() +
           " --data-dir " + (dir_ / id).string() +
           // Longer than the 5 s a cancel may take: stopping must come from SIGTERM.
           " --stop-grace-ms 10000 " + flags;
  }
  void StartNode(const std::string& id, const std::string& flags = "", int devices = 1) {
    nodes_.push_back(std::make_unique<Subprocess>(NodeCommand(id, flags, devices)));
  }
  // Waits up to 10 s for `llamactl nodes` to list the node.
  bool WaitForNode(const std::string& id) {
    std::string out;
    for (int i = 0; i < 100; ++i) {
      if (Ctl("nodes", &out) == 0 && out.find(id) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // Runs llamactl; returns its exit code and fills *out with what it printed.
  int Ctl(const std::string& args, std::string* out = nullptr, const std::string& token_file = "") {
    Subprocess p(kBin + "/llamactl --server " + address_ + " --token-file " +
                 (token_file.empty() ? (dir_ / "sched" / "token").string() : token_file) + " " + args);
    p.Drain();
    const int code = p.Wait();
    if (out != nullptr) *out = p.output();
    return code;
  }
  nlohmann::json Job(const std::string& id) {
    std::string out;
    if (Ctl("--json status " + id, &out) != 0) return {};
    return nlohmann::json::parse(out, nullptr, false);
  }
  // Waits up to `seconds` for the job's state.
  bool WaitFor(const std::string& id, const std::string& state, double seconds) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
    while (std::chrono::steady_clock::now() < deadline) {
      if (Job(id).value("state", "") == state) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return false;
  }
  std::string WriteSpec(const std::string& name, int nodes, int steps, const std::string& dataset = "tokens.u32",
                        const std::string& extra = "", int devices_per_node = 1) {
    const fs::path path = dir_ / (name + ".yaml");
    std::ofstream(path) << "name: " << name << R"(
model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 2, global_batch_size: 8, steps: )" << steps << R"(, lr: 3e-3, seed: 9}
data: {dataset: )" << dataset << R"(}
resources:
  nodes: )" << nodes << R"(
  devices_per_node: )" << devices_per_node << "\n" << extra;
    return path.string();
  }
  std::string Submit(const std::string& spec) {
    std::string out;
    EXPECT_EQ(Ctl("--json submit " + spec, &out), 0) << out;
    return nlohmann::json::parse(out, nullptr, false).value("id", "");
  }
  // Live llama-train processes whose parent is `parent`, or any of this test's node
  // daemons when it is 0.
  std::vector<pid_t> WorkerPids(pid_t parent = 0) {
    std::set<pid_t> parents;
    if (parent != 0) parents.insert(parent);
    for (const auto& node : nodes_) {
      if (parent == 0) parents.insert(node->pid());
    }
    return llamad::testing::LiveChildren(parents, "llama-train");
  }
  int Workers() { return int(WorkerPids().size()); }
  // What the node daemons have printed so far (starts, stops with the scheduler's
  // reason, exits), for failure messages.
  std::string DaemonOutput() {
    std::string all;
    for (const auto& node : nodes_) all += "\n== llamad node\n" + node->Drain(0.2);
    return all;
  }
  // Every rank log the node daemons kept, for failure messages.
  std::string RankLogs() {
    std::string all;
    // Under each node's jobs/ only: checkpoint folders come and go while this reads.
    std::error_code ec;
    for (fs::directory_iterator node(dir_, ec), end; !ec && node != end; node.increment(ec)) {
      std::error_code jobs_ec;
      fs::recursive_directory_iterator it(node->path() / "jobs", jobs_ec), jobs_end;
      for (; !jobs_ec && it != jobs_end; it.increment(jobs_ec)) {
        const fs::path& path = it->path();
        if (!path.filename().string().starts_with("rank-") || path.extension() != ".log") continue;
        std::ifstream in(path);
        all += "\n== " + path.string() + "\n" + std::string(std::istreambuf_iterator<char>(in), {});
      }
    }
    return all;
  }

  fs::path dir_;
  std::string address_;
  std::unique_ptr<Subprocess> scheduler_;
  std::vector<std::unique_ptr<Subprocess>> nodes_;
};

TEST_F(ClusterTest, GangStartsQueuesCancelsAndReportsCrashes) {
  for (auto id : {"node1", "node2", "node3"}) StartNode(id);
  // A 2-node job starts on two daemons at once and completes; `submit --wait` follows
  // it with its events and the steps its rank 0 reports.
  std::string followed;
  ASSERT_EQ(Ctl("--json submit --wait " + WriteSpec("two", 2, 200), &followed), 0) << followed;
  std::string two;
  std::vector<std::string> kinds;
  int64_t last_step = 0;
  std::istringstream lines(followed);
  for (std::string line; std::getline(lines, line);) {
    auto event = nlohmann::json::parse(line, nullptr, false);
    if (!event.is_object() || !event.contains("kind")) continue;
    two = event.value("job_id", two);
    const std::string kind = event.value("kind", "");
    if (kinds.empty() || kinds.back() != kind) kinds.push_back(kind);
    if (kind == "progress") {
      const int64_t step = std::stoll(event["job"]["progress"].value("step", "0"));
      EXPECT_GT(step, last_step) << line;
      last_step = step;
    }
  }
  EXPECT_EQ(kinds.front(), "submitted") << followed;
  EXPECT_EQ(kinds.back(), "succeeded") << followed;
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "progress"), kinds.end()) << followed;
  ASSERT_FALSE(two.empty()) << followed;
  EXPECT_EQ(Job(two)["progress"].value("step", "0"), "200");
  std::string logs;
  EXPECT_EQ(Ctl("logs " + two, &logs), 0);
  EXPECT_NE(logs.find("[rank 0]"), std::string::npos) << logs;

  // A 4-node job waits, saying why, and starts when a fourth daemon joins.
  const std::string four = Submit(WriteSpec("four", 4, 100000));
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  nlohmann::json queued = Job(four);
  EXPECT_EQ(queued.value("state", ""), "JOB_STATE_QUEUED");
  EXPECT_NE(queued.value("reason", "").find("waiting for 4 node(s)"), std::string::npos) << queued.dump(1);
  StartNode("node4");
  ASSERT_TRUE(WaitFor(four, "JOB_STATE_RUNNING", 30)) << Job(four).dump(1);
  for (int i = 0; i < 100 && Workers() < 4; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(Workers(), 4) << Job(four).dump(1) << RankLogs();

  // Cancel stops every worker within 5 s.
  const auto cancelled_at = std::chrono::steady_clock::now();
  ASSERT_EQ(Ctl("cancel " + four), 0);
  while (Workers() > 0 && std::chrono::steady_clock::now() - cancelled_at < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double stop_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - cancelled_at).count();
  std::printf("cancel stopped 4 workers in %.2f s\n", stop_s);
  EXPECT_EQ(Workers(), 0);
  EXPECT_LT(stop_s, 5.0);

  // A worker that fails marks its job failed with the exit status and its last lines.
  const std::string bad = Submit(WriteSpec("bad", 1, 4, "missing.u32"));
  ASSERT_TRUE(WaitFor(bad, "JOB_STATE_FAILED", 30)) << Job(bad).dump(1);
  nlohmann::json failed = Job(bad);
  EXPECT_NE(failed.value("exit_code", 0), 0);
  EXPECT_NE(failed["last_log_lines"].dump().find("missing.u32"), std::string::npos) << failed.dump(1);
  std::string status;
  EXPECT_EQ(Ctl("status " + bad, &status), 0);
  EXPECT_NE(status.find("missing.u32"), std::string::npos) << status;
}

// Ranks that share a node each read a spec file of their own, so starting one never
// rewrites the file another is reading.
TEST_F(ClusterTest, RanksSharingANodeEachReadASpecOfTheirOwn) {
  StartNode("node1", "", 2);
  const std::string id = Submit(WriteSpec("pair", 1, 4, "tokens.u32", "", 2));
  ASSERT_TRUE(WaitFor(id, "JOB_STATE_SUCCEEDED", 60)) << Job(id).dump(1) << RankLogs();
  const fs::path gen = dir_ / "node1" / "jobs" / id / "gen-1";
  std::set<std::string> specs;
  for (const auto& entry : fs::directory_iterator(gen)) {
    if (entry.path().extension() == ".yaml") specs.insert(entry.path().filename().string());
  }
  EXPECT_EQ(specs, (std::set<std::string>{"rank-0.yaml", "rank-1.yaml"}));
  std::ifstream first(gen / "rank-1.yaml");
  std::string line;
  std::getline(first, line);
  EXPECT_EQ(line, "name: pair");
}

TEST_F(ClusterTest, ARankItsNodeCannotStartFailsTheJobSayingWhy) {
  // A file stands where a node keeps its jobs' folders: the node says so as it starts,
  // and takes no rank.
  fs::create_directories(dir_ / "blocked");
  std::ofstream(dir_ / "blocked" / "jobs") << "not a folder\n";
  Subprocess blocked(NodeCommand("blocked"));
  blocked.Drain(/*timeout_s=*/15);
  blocked.Kill(SIGKILL);  // still running: the exit code says so
  EXPECT_EQ(blocked.Wait(), 2) << blocked.output();
  EXPECT_NE(blocked.output().find("data_dir: the ranks' folders cannot be written: " +
                                  (dir_ / "blocked" / "jobs").string() + ": cannot create: Not a directory"),
            std::string::npos)
      << blocked.output();
  // With a scheduler beside the node, it says so before the scheduler starts: nothing
  // listens, and no address file points at a scheduler that is gone.
  Subprocess both(kBin + "/llamad --role both --listen 127.0.0.1:0 --devices cpu:1 --data-dir " +
                  (dir_ / "blocked").string());
  both.Drain(/*timeout_s=*/15);
  both.Kill(SIGKILL);
  EXPECT_EQ(both.Wait(), 2) << both.output();
  EXPECT_NE(both.output().find("data_dir: the ranks' folders cannot be written"), std::string::npos) << both.output();
  EXPECT_FALSE(fs::exists(dir_ / "blocked" / "scheduler.address")) << both.output();
  EXPECT_FALSE(fs::exists(dir_ / "blocked" / "scheduler")) << both.output();
  // The same after the node started: the rank's spec cannot be written, and the job
  // fails with the node's reason rather than a worker's guess.
  StartNode("node1");
  ASSERT_TRUE(WaitForNode("node1")) << DaemonOutput();
  fs::remove_all(dir_ / "node1" / "jobs");
  std::ofstream(dir_ / "node1" / "jobs") << "not a folder\n";
  const std::string id = Submit(WriteSpec("blocked", 1, 4));
  ASSERT_TRUE(WaitFor(id, "JOB_STATE_FAILED", 30)) << Job(id).dump(1) << DaemonOutput();
  const nlohmann::json failed = Job(id);
  EXPECT_EQ(failed.value("exit_code", 0), 1) << failed.dump(1);
  const std::string lines = failed["last_log_lines"].dump();
  EXPECT_NE(lines.find((dir_ / "node1" / "jobs").string()), std::string::npos) << failed.dump(1);
  EXPECT_NE(lines.find("Not a directory"), std::string::npos) << failed.dump(1);
}

TEST_F(ClusterTest, LostNodeTakesItsWorkersAndTheJobMovesOn) {
  for (auto id : {"node1", "node2", "node3"}) StartNode(id);
  const std::string job = Submit(WriteSpec("mover", 2, 100000));
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_RUNNING", 30)) << Job(job).dump(1);
  const std::string victim = Job(job)["placement"][1].value("node_id", "");
  ASSERT_TRUE(victim.starts_with("node")) << Job(job).dump(1);
  Subprocess& daemon = *nodes_[size_t(victim.back() - '1')];
  std::vector<pid_t> orphans;
  for (int i = 0; i < 100 && orphans.empty(); ++i) {
    orphans = WorkerPids(daemon.pid());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_EQ(orphans.size(), 1u) << RankLogs();
  // Training has started, so the surviving rank sees its peer vanish mid-collective.
  for (int i = 0; i < 300 && std::stoll(Job(job)["progress"].value("step", "0")) < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GE(std::stoll(Job(job)["progress"].value("step", "0")), 1) << Job(job).dump(1) << RankLogs();

  // The daemon dies without a word: its worker follows it (parent-death signal)...
  daemon.Kill(SIGKILL);
  daemon.Wait();
  const auto killed_at = std::chrono::steady_clock::now();
  auto alive = [&] { return llamad::testing::IsLiveProcess(orphans[0], "llama-train"); };
  while (alive() && std::chrono::steady_clock::now() - killed_at < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_FALSE(alive()) << "the worker of a dead daemon is still running";
  std::printf("the dead daemon's worker exited after %.2f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count());

  // ...the surviving rank exits for want of its peer (which alone must not fail the
  // job), the lost node's lease runs out, and the job's next generation runs on the two
  // live nodes.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  nlohmann::json moved;
  while (std::chrono::steady_clock::now() < deadline) {
    moved = Job(job);
    if (moved.value("generation", "0") == "2" && moved.value("state", "") == "JOB_STATE_RUNNING") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  ASSERT_EQ(moved.value("generation", "0"), "2") << moved.dump(1) << RankLogs();
  EXPECT_EQ(moved.value("state", ""), "JOB_STATE_RUNNING") << moved.dump(1);
  EXPECT_EQ(moved.dump().find(victim), std::string::npos) << moved.dump(1);
  std::string nodes;
  EXPECT_EQ(Ctl("nodes", &nodes), 0);
  EXPECT_NE(nodes.find("lost"), std::string::npos) << nodes;
  // The job's history says why it has a second generation.
  std::string history;
  EXPECT_EQ(Ctl("events " + job, &history), 0) << history;
  EXPECT_NE(history.find("requeued   node " + victim + " lost (no heartbeat for"), std::string::npos) << history;
  EXPECT_EQ(Ctl("events no-such-job", &history), 3) << history;
  EXPECT_EQ(Ctl("cancel " + job), 0);
  EXPECT_TRUE(WaitFor(job, "JOB_STATE_CANCELLED", 30)) << Job(job).dump(1);
}

// A drained node takes no new ranks, also after its daemon restarts, until `llamactl
// undrain`; `llamactl nodes` says why it is drained.
TEST_F(ClusterTest, ADrainedNodeStaysDrainedUntilUndrained) {
  StartNode("n1");
  ASSERT_TRUE(WaitForNode("n1")) << DaemonOutput();
  std::string out;
  ASSERT_EQ(Ctl("drain n1 --reason 'fan replaced, burn-in due'", &out), 0) << out;
  EXPECT_NE(out.find("n1 draining"), std::string::npos) << out;
  EXPECT_EQ(Ctl("nodes", &out), 0);
  EXPECT_NE(out.find("drained with llamactl drain: fan replaced, burn-in due"), std::string::npos) << out;
  // Its daemon restarts: still drained, and the job waits.
  nodes_.back()->Kill(SIGTERM);
  nodes_.back()->Wait();
  nodes_.clear();
  StartNode("n1");
  const std::string job = Submit(WriteSpec("waits", 1, 4));
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // many heartbeats
  EXPECT_EQ(Job(job).value("state", ""), "JOB_STATE_QUEUED") << Job(job).dump(1);
  EXPECT_EQ(Workers(), 0);
  EXPECT_EQ(Ctl("--json nodes", &out), 0);
  EXPECT_NE(out.find("NODE_STATE_DRAINING"), std::string::npos) << out;
  // Undrained, it runs the job.
  ASSERT_EQ(Ctl("undrain n1", &out), 0) << out;
  EXPECT_NE(out.find("n1 ready"), std::string::npos) << out;
  EXPECT_TRUE(WaitFor(job, "JOB_STATE_SUCCEEDED", 60)) << Job(job).dump(1) << RankLogs();
  EXPECT_EQ(Ctl("nodes", &out), 0);
  EXPECT_EQ(out.find("drained with"), std::string::npos) << out;
  EXPECT_EQ(Ctl("undrain nowhere", &out), 3) << out;
}

// A rank whose GPU fails (exit 74) drains its node, and the job goes on on another node
// from its latest checkpoint; `llamactl nodes` names the fault and counts it against the
// limit. The nodes run llama-train through a wrapper that, the first time, kills it once
// it has printed its third step and committed a checkpoint (a save is committed in the
// background, after later steps may have printed), and exits as a failed GPU would: the
// daemons, the scheduler and llamactl are the real ones, and so is every other run.
TEST_F(ClusterTest, AFailedGpuDrainsItsNodeAndTheJobGoesOnElsewhere) {
  const fs::path worker = dir_ / "llama-train-whose-gpu-fails-once";
  std::ofstream(worker) << "#!/usr/bin/env bash\n"
                        << "marker='" << (dir_ / "gpu-failed").string() << "'\n"
                        << "real='" << kBin << "/llama-train'\n"
                        << R"sh(if ! mkdir "$marker" 2>/dev/null; then exec "$real" "$@"; fi
"$real" "$@" > >(tee "$marker/out") 2> >(tee "$marker/err" >&2) &
pid=$!
until grep -qE '"step":3[,}]' "$marker/out" 2>/dev/null && grep -q ' committed in ' "$marker/err" 2>/dev/null; do
  kill -0 "$pid" 2>/dev/null || exit 1
  sleep 0.05
done
kill -KILL "$pid"
echo "the GPU fails here (as llama-train exits on an uncorrectable ECC error)" >&2
exit 74
)sh";
  fs::permissions(worker, fs::perms::owner_all);
  for (auto id : {"node1", "node2"}) StartNode(id, "--worker-binary " + worker.string());
  const std::string job = Submit(WriteSpec("faulted", 1, 40, "tokens.u32",
                                           "checkpoint: {dir: " + (dir_ / "ckpt").string() + ", interval: 2}\n"));
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_SUCCEEDED", 120)) << Job(job).dump(1) << DaemonOutput() << RankLogs();
  const nlohmann::json done = Job(job);
  EXPECT_EQ(done.value("generation", "0"), "2") << done.dump(1);
  std::string history;
  EXPECT_EQ(Ctl("events " + job, &history), 0) << history;
  const std::string requeued = "requeued   the GPU of rank 0 (device 0) failed on node ";
  const size_t said = history.find(requeued);
  ASSERT_NE(said, std::string::npos) << history;
  const std::string faulted = history.substr(said + requeued.size(), 5);  // node1 or node2
  EXPECT_NE(history.find(faulted + ", which is drained"), std::string::npos) << history;
  EXPECT_EQ(done.dump().find(faulted), std::string::npos) << "generation 2 ran on the faulted node: " << done.dump(1);
  // From a checkpoint its first generation saved (every 2 steps; it was killed at step 3
  // or later, after a commit, as its wrapper saw the step and commit lines).
  const std::string logs = RankLogs();
  const size_t resumed = logs.find("resumed job 'faulted' at step ");
  ASSERT_NE(resumed, std::string::npos) << logs;
  const int64_t from = std::stoll(logs.substr(resumed + std::strlen("resumed job 'faulted' at step ")));
  EXPECT_GE(from, 2) << logs;
  EXPECT_LT(from, 40) << logs;
  EXPECT_EQ(from % 2, 0) << logs;
  std::string out;
  EXPECT_EQ(Ctl("nodes", &out), 0);
  EXPECT_NE(out.find("the GPU of rank 0 (device 0) failed under job " + job + "; see that job's log, then llamactl "
                     "undrain " + faulted),
            std::string::npos)
      << out;
  // Two nodes, 10%: the one drain is the limit.
  EXPECT_NE(out.find("GPU faults drained 1 node(s); they drain at most 1 (max_fault_drained_percent 10): a node "
                     "whose GPU fails now stays in service"),
            std::string::npos)
      << out;
  ASSERT_EQ(Ctl("undrain " + faulted, &out), 0) << out;
  EXPECT_EQ(Ctl("nodes", &out), 0);
  EXPECT_EQ(out.find("GPU faults drained"), std::string::npos) << out;
}

// A preempted node's daemon (SIGTERM) stops its rank, which finishes its step and saves
// it with its peer: the job goes on on other nodes from the step it stopped after,
// although its checkpoint interval had saved nothing yet. The preempted rank is rank 0,
// which commits the checkpoint that its peer's node then resumes from. Then a drain moves
// the job the same way.
TEST_F(ClusterTest, APreemptedJobGoesOnFromTheStepItStoppedAfter) {
  for (auto id : {"node1", "node2", "node3", "node4"}) StartNode(id);
  const std::string job = Submit(WriteSpec("preempted", 2, 100000, "tokens.u32",
                                           "checkpoint: {dir: " + (dir_ / "ckpt").string() + ", interval: 100000}\n"));
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_RUNNING", 30)) << Job(job).dump(1);
  for (int i = 0; i < 300 && std::stoll(Job(job)["progress"].value("step", "0")) < 3; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const int64_t before = std::stoll(Job(job)["progress"].value("step", "0"));
  ASSERT_GE(before, 3) << Job(job).dump(1) << RankLogs();
  const std::string victim = Job(job)["placement"][0].value("node_id", "");
  ASSERT_TRUE(victim.starts_with("node")) << Job(job).dump(1);
  Subprocess& daemon = *nodes_[size_t(victim.back() - '1')];
  daemon.Kill(SIGTERM);
  const std::string said = daemon.Drain();
  EXPECT_EQ(daemon.Wait(), 0) << said;

  // Rank 0 saved the step it stopped after, before its daemon exited.
  std::string logs = RankLogs();
  const size_t at = logs.find("stopped after step ");
  ASSERT_NE(at, std::string::npos) << said << logs;
  const int64_t stopped = std::stoll(logs.substr(at + std::strlen("stopped after step ")));
  EXPECT_GE(stopped, before);
  EXPECT_NE(logs.find("checkpoint step " + std::to_string(stopped) + " committed"), std::string::npos) << logs;
  // Generation 2 runs on the two other nodes, from that step on.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  nlohmann::json moved;
  while (std::chrono::steady_clock::now() < deadline) {
    moved = Job(job);
    if (moved.value("generation", "0") == "2" && moved.value("state", "") == "JOB_STATE_RUNNING" &&
        std::stoll(moved["progress"].value("step", "0")) > stopped) {
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  logs = RankLogs();
  ASSERT_EQ(moved.value("generation", "0"), "2") << moved.dump(1) << logs;
  EXPECT_GT(std::stoll(moved["progress"].value("step", "0")), stopped) << moved.dump(1) << logs;
  EXPECT_EQ(moved.dump().find(victim), std::string::npos) << moved.dump(1);
  EXPECT_NE(logs.find("resumed job 'preempted' at step " + std::to_string(stopped)), std::string::npos) << logs;
  std::string history;
  EXPECT_EQ(Ctl("events " + job, &history), 0) << history;
  EXPECT_NE(history.find("node " + victim + " stopped (preempted)"), std::string::npos) << history;
  EXPECT_EQ(history.find("lost its peers"), std::string::npos) << history;

  // `llamactl drain --now` moves it again, with its daemon running on: generation 2's
  // ranks are told to save their step too, and generation 3 goes on from it.
  const std::string drained = moved["placement"][0].value("node_id", "");
  std::string out;
  ASSERT_EQ(Ctl("drain " + drained + " --now", &out), 0) << out;
  const fs::path gen2_log = dir_ / drained / "jobs" / job / "gen-2" / "rank-0.log";
  int64_t stopped2 = -1;
  for (int i = 0; i < 300 && stopped2 < 0; ++i) {
    std::ifstream in(gen2_log);
    const std::string text(std::istreambuf_iterator<char>(in), {});
    if (const size_t at2 = text.find("stopped after step "); at2 != std::string::npos) {
      stopped2 = std::stoll(text.substr(at2 + std::strlen("stopped after step ")));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_GT(stopped2, stopped) << RankLogs();
  for (int i = 0; i < 300 && RankLogs().find("resumed job 'preempted' at step " + std::to_string(stopped2)) ==
                                 std::string::npos;
       ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_NE(RankLogs().find("resumed job 'preempted' at step " + std::to_string(stopped2)), std::string::npos)
      << RankLogs();
  EXPECT_EQ(Job(job).value("generation", "0"), "3") << Job(job).dump(1);
  EXPECT_EQ(Ctl("cancel " + job), 0);
  EXPECT_TRUE(WaitFor(job, "JOB_STATE_CANCELLED", 30)) << Job(job).dump(1);
  std::printf("generation 1 stopped after step %lld (step %lld seen before the preemption), generation 2 after %lld\n",
              (long long)stopped, (long long)before, (long long)stopped2);
}

TEST_F(ClusterTest, TokensSpecsAndAddressesAreChecked) {
  const fs::path wrong = dir_ / "wrong-token";
  std::ofstream(wrong) << "not-the-token\n";
  std::string out;
  EXPECT_EQ(Ctl("list", &out, wrong.string()), 4) << out;
  EXPECT_NE(out.find("bearer token"), std::string::npos) << out;
  // A malformed spec: INVALID_ARGUMENT naming the field, exit code 2, nothing queued.
  const std::string spec = WriteSpec("typo", 1, 4);
  std::ofstream(spec, std::ios::app) << "  devices_per_nod: 2\n";
  EXPECT_EQ(Ctl("submit " + spec, &out), 2) << out;
  EXPECT_NE(out.find("resources.devices_per_nod"), std::string::npos) << out;
  EXPECT_EQ(Ctl("--json list -a", &out), 0);
  EXPECT_EQ(out.find("typo"), std::string::npos) << out;
  // A daemon pointed at nothing says so.
  Subprocess lost(kBin + "/llamad --role node --node-id lost --devices cpu:1 --scheduler 127.0.0.1:1 --token-file " +
                  (dir_ / "sched" / "token").string() + " --data-dir " + (dir_ / "lost").string());
  auto line = lost.ReadLine(15);
  ASSERT_TRUE(line.has_value());
  EXPECT_NE(line->find("registering with the scheduler at 127.0.0.1:1"), std::string::npos) << *line;
  // A second scheduler on the first one's port, or on an address that is not this
  // machine's, says it cannot listen and exits; it never shares the port.
  for (const std::string& listen : {address_, std::string("192.0.2.1:0")}) {
    Subprocess second(kBin + "/llamad --role scheduler --listen " + listen + " --data-dir " +
                      (dir_ / "second").string());
    second.Drain(/*timeout_s=*/15);
    second.Kill(SIGKILL);  // still serving: the exit code says so
    EXPECT_EQ(second.Wait(), 2) << listen << ": " << second.output();
    EXPECT_NE(second.output().find("cannot listen on " + listen), std::string::npos) << second.output();
  }
}

TEST_F(ClusterTest, AStopIsPromptWhateverTheHeartbeatInterval) {
  // The lease timer ticks every half interval (here about 12 days); a stop must not wait for it.
  Subprocess slow(kBin + "/llamad --role scheduler --listen 127.0.0.1:0 --data-dir " + (dir_ / "slow").string() +
                  " --heartbeat-interval-ms 2000000000 --lease-timeout-ms 2000000001");
  auto line = slow.ReadLine(15);
  ASSERT_TRUE(line.has_value());
  ASSERT_NE(line->find("scheduler listening"), std::string::npos) << *line;
  slow.Kill(SIGTERM);
  slow.Drain(/*timeout_s=*/20);
  slow.Kill(SIGKILL);  // still running: the exit code says so
  EXPECT_EQ(slow.Wait(), 0) << slow.output();
}

TEST_F(ClusterTest, ExportWritesAJobsCheckpointAsAHuggingFaceModel) {
  StartNode("node1");
  const std::string spec = WriteSpec("saver", 1, 4);
  std::ofstream(spec, std::ios::app) << "checkpoint: {dir: ckpt, interval: 2}\n";
  const std::string job = Submit(spec);
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_SUCCEEDED", 120)) << Job(job).dump(1) << RankLogs();
  std::string out;
  EXPECT_EQ(Ctl("export " + job + " --hf " + (dir_ / "hf-latest").string(), &out), 0) << out;
  EXPECT_NE(out.find("step 4"), std::string::npos) << out;
  EXPECT_TRUE(fs::exists(dir_ / "hf-latest" / "model.safetensors")) << out;
  EXPECT_TRUE(fs::exists(dir_ / "hf-latest" / "config.json")) << out;
  EXPECT_EQ(Ctl("export saver --step 2 --hf " + (dir_ / "hf-2").string(), &out), 0) << out;
  EXPECT_NE(out.find("step 2"), std::string::npos) << out;
  // A step that was never saved, and a job that saves nothing, are refused by name.
  EXPECT_NE(Ctl("export " + job + " --step 3 --hf " + (dir_ / "hf-3").string(), &out), 0) << out;
  EXPECT_NE(out.find("no committed checkpoint at step 3"), std::string::npos) << out;
  const std::string plain = Submit(WriteSpec("plain", 1, 2));
  ASSERT_TRUE(WaitFor(plain, "JOB_STATE_SUCCEEDED", 120)) << Job(plain).dump(1);
  EXPECT_EQ(Ctl("export " + plain + " --hf " + (dir_ / "hf-plain").string(), &out), 2) << out;
  EXPECT_NE(out.find("saves no checkpoints"), std::string::npos) << out;
}

// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
void MakeCertificates(const fs::path& dir) {
  fs::create_directories(dir);
  std::ofstream(dir / "server.ext") << "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
  std::ofstream(dir / "client.ext") << "extendedKeyUsage=clientAuth\n";
  const std::string d = dir.string() + "/";
  const std::string ec = " -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes ";
  std::string script = "openssl req -x509" + ec + "-keyout " + d + "ca.key -out " + d + "ca.pem -days 2 -subj /CN=llamad-test-ca";
  for (const std::string who : {"server", "client"}) {
    script += " && openssl req" + ec + "-keyout " + d + who + ".key -out " + d + who + ".csr -subj /CN=llamad-" + who +
              " && openssl x509 -req -in " + d + who + ".csr -CA " + d + "ca.pem -CAkey " + d + "ca.key -CAcreateserial" +
              " -days 2 -out " + d + who + ".pem -extfile " + d + who + ".ext";
  }
  Subprocess openssl("sh -c '" + script + "'");
  const std::string out = openssl.Drain();
  ASSERT_EQ(openssl.Wait(), 0) << out;
}

TEST_F(ClusterTest, MutualTlsAdmitsOnlyClientsWithACertificate) {
  const fs::path certs = dir_ / "certs";
  ASSERT_NO_FATAL_FAILURE(MakeCertificates(certs));
  const std::string c = certs.string() + "/";
  scheduler_.reset();
  StartScheduler("127.0.0.1:0", "--tls-ca " + c + "ca.pem --tls-cert " + c + "server.pem --tls-key " + c + "server.key");
  const std::string client_tls = "--tls-ca " + c + "ca.pem --tls-cert " + c + "client.pem --tls-key " + c + "client.key";
  std::string out;
  EXPECT_EQ(Ctl(client_tls + " list", &out), 0) << out;
  // Plain TCP, and TLS without a client certificate, are turned away.
  EXPECT_EQ(Ctl("list", &out), 5) << out;
  EXPECT_NE(out.find("pass its CA with --tls-ca"), std::string::npos) << out;
  EXPECT_EQ(Ctl("--tls-ca " + c + "ca.pem list", &out), 5) << out;
  EXPECT_NE(out.find("--tls-cert/--tls-key"), std::string::npos) << out;
  // Daemons and their workers (whose rendezvous crosses the same TLS) run a 2-node job.
  const std::string node_tls = "--tls-ca " + c + "ca.pem --tls-cert " + c + "client.pem --tls-key " + c + "client.key";
  StartNode("node1", node_tls);
  StartNode("node2", node_tls);
  const std::string spec = WriteSpec("secure", 2, 4);
  ASSERT_EQ(Ctl(client_tls + " --json submit " + spec, &out), 0) << out;
  const std::string id = nlohmann::json::parse(out, nullptr, false).value("id", "");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  nlohmann::json job;
  while (std::chrono::steady_clock::now() < deadline) {
    if (Ctl(client_tls + " --json status " + id, &out) == 0) job = nlohmann::json::parse(out, nullptr, false);
    if (job.is_object() && job.value("state", "") == "JOB_STATE_SUCCEEDED") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_EQ(job.value("state", ""), "JOB_STATE_SUCCEEDED") << job.dump(1) << RankLogs();
}

TEST_F(ClusterTest, SchedulerKilledMidJobLosesNothing) {
  StartNode("node1");
  StartNode("node2");
  // Long enough (seconds) that it is still running once the scheduler is back, even on a
  // loaded machine.
  const std::string job = Submit(WriteSpec("survivor", 2, 1000));
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_RUNNING", 30));
  for (int i = 0; i < 300 && std::stoi(Job(job)["progress"].value("step", "0")) < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  const std::string before = Job(job)["progress"].value("step", "0");
  scheduler_->Kill(SIGKILL);
  scheduler_->Wait();
  StartScheduler(address_);  // same port: the daemons reconnect by themselves
  nlohmann::json after = Job(job);
  EXPECT_EQ(after.value("state", ""), "JOB_STATE_RUNNING") << after.dump(1);
  EXPECT_EQ(after.value("generation", "0"), "1");
  std::string nodes;
  EXPECT_EQ(Ctl("nodes", &nodes), 0);
  EXPECT_NE(nodes.find("node2"), std::string::npos) << nodes;
  // The same generation runs on to the end; its progress kept coming after the restart.
  ASSERT_TRUE(WaitFor(job, "JOB_STATE_SUCCEEDED", 180)) << Job(job).dump(1);
  EXPECT_EQ(Job(job)["progress"].value("step", "0"), "1000");
  std::string events;
  Ctl("--json status " + job + " --wait", &events);  // every event of the ended job
  EXPECT_EQ(Job(job).value("generation", "0"), "1") << events << DaemonOutput() << scheduler_->Drain(0.2);
  std::printf("progress before the kill: step %s\n", before.c_str());
}

}  // namespace
