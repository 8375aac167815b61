// The scheduler on a real RocksDB with a manual clock: gang placement, queue reasons,
// leases, rank supervision, restart, and spec validation.
#include "scheduler/scheduler.h"

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <optional>
#include <thread>

#include "core/exit_codes.h"
#include "daemon/rendezvous_wire.h"

namespace llamad::scheduler {
namespace {
namespace fs = std::filesystem;

constexpr char kSpec[] = R"(
name: gang
model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 4, steps: 5}
data: {dataset: tokens.u32}
resources:
  nodes: NODES
  devices_per_node: 1
)";

std::string Spec(int nodes, int priority = 0) {
  std::string s = kSpec;
  s.replace(s.find("NODES"), 5, std::to_string(nodes));
  if (priority != 0) s += "  priority: " + std::to_string(priority) + "\n";
  return s;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("llamad-scheduler-test-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    Reopen();
  }
  void TearDown() override {
    scheduler_.reset();
    fs::remove_all(dir_);
  }
  void Reopen() {
    scheduler_.reset();
    SchedulerOptions options;
    options.data_dir = dir_.string();
    options.heartbeat_interval_ms = 1000;
    options.lease_timeout_ms = 5000;
    options.max_fault_drained_percent = max_fault_drained_percent_;
    options.forget_lost_nodes_after_ms = forget_lost_nodes_after_ms_;
    auto s = Scheduler::Open(options, &clock_);
    ASSERT_TRUE(s.ok()) << s.status();
    scheduler_ = std::move(*s);
  }
  void AddNode(const std::string& id, int devices = 1) {
    pb::RegisterNodeRequest r;
    r.set_node_id(id);
    r.set_devices(devices);
    r.set_device_kind("cpu");
    ASSERT_TRUE(scheduler_->RegisterNode(r).ok());
  }
  // `checkpoints`: the job saves them (every 10 steps).
  pb::Job Submit(int nodes, int priority = 0, bool checkpoints = false) {
    pb::SubmitJobRequest r;
    r.set_spec_yaml(Spec(nodes, priority) + (checkpoints ? "checkpoint: {dir: ckpt, interval: 10}\n" : ""));
    r.set_spec_origin("/jobs/gang.yaml");
    auto job = scheduler_->SubmitJob(r);
    EXPECT_TRUE(job.ok()) << job.status();
    return job.ok() ? *job : pb::Job();
  }
  pb::Job Get(const std::string& id) { return *scheduler_->GetJob(id); }
  // One heartbeat of `node` reporting `ranks`; returns the orders.
  pb::HeartbeatResponse Beat(const std::string& node, std::vector<pb::RankReport> ranks = {}, bool stopping = false) {
    pb::HeartbeatRequest r;
    r.set_node_id(node);
    r.set_stopping(stopping);
    for (auto& rank : ranks) *r.add_ranks() = rank;
    auto resp = scheduler_->Heartbeat(r);
    EXPECT_TRUE(resp.ok());
    return *resp;
  }
  // The one stop order `node` gets for its running rank `start` (an empty order, after a
  // failure, when there is not exactly one).
  pb::StopRank StopOrder(const std::string& node, const pb::StartRank& start) {
    const pb::HeartbeatResponse orders = Beat(node, {Report(start, pb::RANK_STATE_RUNNING)});
    EXPECT_EQ(orders.stop_size(), 1) << node;
    return orders.stop_size() == 1 ? orders.stop(0) : pb::StopRank();
  }
  pb::NodeInfo NodeOf(const std::string& id) {
    for (const pb::NodeInfo& n : scheduler_->ListNodes()) {
      if (n.id() == id) return n;
    }
    return pb::NodeInfo();
  }
  // Generation `generation` of `job` (one rank) starts, reports step `steps_before` (when
  // above 0), and its rank exits as a failed GPU. Returns its node and the failure's words.
  std::pair<std::string, std::string> GpuFailsUnder(const pb::Job& job, int64_t generation, int64_t steps_before) {
    const pb::Job running = Get(job.id());
    EXPECT_EQ(running.generation(), generation);
    EXPECT_EQ(running.state(), pb::JOB_STATE_RUNNING) << running.reason();
    if (running.placement_size() != 1) {
      ADD_FAILURE() << "generation " << generation << " is not placed: " << running.reason();
      return {};
    }
    const std::string node = running.placement(0).node_id();
    pb::StartRank start;
    const pb::HeartbeatResponse orders = Beat(node);
    for (const pb::StartRank& s : orders.start()) {
      if (s.job_id() == job.id()) start = s;
    }
    EXPECT_EQ(start.generation(), generation);
    if (steps_before > 0) {
      pb::RankReport line = Report(start, pb::RANK_STATE_RUNNING);
      line.add_metric_lines(fmt::format(R"({{"step": {}, "loss": 2.5}})", steps_before));
      Beat(node, {line});
    }
    Beat(node, {Report(start, pb::RANK_STATE_EXITED, kExitDeviceFault)});
    return {node, fmt::format("the GPU of rank 0 (device {}) failed", start.local_rank())};
  }
  // Whether an event of `job` starts with `prefix`.
  bool SaidOf(const pb::Job& job, const std::string& prefix) {
    auto events = scheduler_->WaitJobUpdates(job.id(), 0, 0, 0);
    EXPECT_TRUE(events.ok()) << events.status();
    if (!events.ok()) return false;
    for (const auto& e : events->events) {
      if (e.message().starts_with(prefix)) return true;
    }
    return false;
  }
  static pb::RankReport Report(const pb::StartRank& start, pb::RankState state, int exit_code = 0) {
    pb::RankReport r;
    r.set_job_id(start.job_id());
    r.set_generation(start.generation());
    r.set_rank(start.rank());
    r.set_local_rank(start.local_rank());
    r.set_state(state);
    r.set_exit_code(exit_code);
    return r;
  }

  fs::path dir_;
  int max_fault_drained_percent_ = SchedulerOptions().max_fault_drained_percent;  // at Reopen
  int64_t forget_lost_nodes_after_ms_ = SchedulerOptions().forget_lost_nodes_after_ms;  // at Reopen
  ManualClock clock_;
  std::unique_ptr<Scheduler> scheduler_;
};

TEST_F(SchedulerTest, GangStartsAllOrNothingAndSaysWhyItWaits) {
  for (auto n : {"a", "b", "c"}) AddNode(n);
  pb::Job two = Submit(2);
  EXPECT_EQ(Get(two.id()).state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(two.id()).placement_size(), 2);
  pb::Job four = Submit(4);
  pb::Job j = Get(four.id());
  EXPECT_EQ(j.state(), pb::JOB_STATE_QUEUED);
  EXPECT_NE(j.reason().find("waiting for 4 node(s)"), std::string::npos) << j.reason();
  EXPECT_NE(j.reason().find("1 of 3 ready"), std::string::npos) << j.reason();
  // A later small job does not overtake the waiting one.
  pb::Job one = Submit(1);
  EXPECT_EQ(Get(one.id()).state(), pb::JOB_STATE_QUEUED);
  EXPECT_NE(Get(one.id()).reason().find("behind job " + four.id()), std::string::npos);
  // The first job ends; then a fourth node makes room for all four.
  pb::HeartbeatResponse orders_a = Beat("a");
  ASSERT_EQ(orders_a.start_size(), 1);
  Beat("a", {Report(orders_a.start(0), pb::RANK_STATE_EXITED, 0)});
  pb::HeartbeatResponse orders_b = Beat("b");
  ASSERT_EQ(orders_b.start_size(), 1);
  EXPECT_EQ(orders_b.start(0).world_size(), 2);
  EXPECT_EQ(orders_b.start(0).nodes(), 2);  // the node agent picks its ranks' address by it
  Beat("b", {Report(orders_b.start(0), pb::RANK_STATE_EXITED, 0)});
  EXPECT_EQ(Get(two.id()).state(), pb::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Get(four.id()).state(), pb::JOB_STATE_QUEUED);
  AddNode("d");
  EXPECT_EQ(Get(four.id()).state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(four.id()).placement_size(), 4);
  EXPECT_EQ(Get(one.id()).state(), pb::JOB_STATE_QUEUED);
}

// A registration the scheduler cannot keep is refused with the field and the rule, and a
// node already registered under that name keeps what it had.
TEST_F(SchedulerTest, RegistrationWithABadFieldIsRefused) {
  AddNode("a", 2);
  const struct {
    std::string node_id;
    int32_t devices;
    std::string needle;
    std::string hostname = "a";
    std::string device_kind = "cpu";
  } cases[] = {
      {"a", 0, "devices: 0 is not within [1, 1024]"},
      {"a", 1025, "devices: 1025 is not within [1, 1024]"},
      {"", 1, "node_id: must not be empty"},
      {"rack1/a", 1, "node_id: character 6 is '/'"},
      {"gpu a", 1, "node_id: character 4 is 0x20"},
      {"a\n", 1, "node_id: character 2 is 0x0a"},
      {std::string(254, 'n'), 1, "node_id: 254 characters, more than the 253"},
      {"a", 1, "hostname: 254 characters, more than the 253", std::string(254, 'h')},
      {"a", 1, "hostname: character 4 is 0x1b, a control character", "gpu\x1b[2J"},
      {"a", 1, "device_kind: 'gpu' is neither \"cuda\" nor \"cpu\"", "a", "gpu"},
      {"a", 1, "device_kind: '' is neither", "a", ""},
  };
  for (const auto& c : cases) {
    pb::RegisterNodeRequest r;
    r.set_node_id(c.node_id);
    r.set_devices(c.devices);
    r.set_hostname(c.hostname);
    r.set_device_kind(c.device_kind);
    auto refused = scheduler_->RegisterNode(r);
    ASSERT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << c.needle;
    EXPECT_NE(std::string(refused.status().message()).find(c.needle), std::string::npos) << refused.status();
  }
  ASSERT_EQ(scheduler_->ListNodes().size(), 1u);
  EXPECT_EQ(NodeOf("a").devices(), 2);
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_READY);
  // The limits, and every character a name may hold, are accepted.
  AddNode("a", 1024);
  EXPECT_EQ(NodeOf("a").devices(), 1024);
  AddNode(std::string(253, 'n'));
  AddNode("Gpu-node_07.rack3");
  EXPECT_EQ(scheduler_->ListNodes().size(), 3u);
  // A host name is shown as given: one of 253 bytes, with spaces, is accepted, as is "cuda".
  pb::RegisterNodeRequest r;
  r.set_node_id("b");
  r.set_devices(8);
  r.set_hostname("gpu box " + std::string(245, 'h'));
  r.set_device_kind("cuda");
  ASSERT_TRUE(scheduler_->RegisterNode(r).ok());
  EXPECT_EQ(NodeOf("b").device_kind(), "cuda");
  EXPECT_EQ(NodeOf("b").hostname().size(), 253u);
}

TEST_F(SchedulerTest, PriorityGoesFirst) {
  AddNode("a");
  pb::Job running = Submit(1);
  pb::Job low = Submit(1, 0);
  pb::Job high = Submit(1, 5);
  scheduler_->CancelJob(running.id()).IgnoreError();
  EXPECT_EQ(Get(high.id()).state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(low.id()).state(), pb::JOB_STATE_QUEUED);
}

TEST_F(SchedulerTest, ExpiredLeaseRequeuesTheJobWithoutSleeping) {
  AddNode("a");
  AddNode("b");
  pb::Job job = Submit(2);
  ASSERT_EQ(Get(job.id()).state(), pb::JOB_STATE_RUNNING);
  clock_.Advance(3000);
  Beat("a");  // a keeps its lease, b goes silent
  clock_.Advance(3000);
  scheduler_->Tick();
  pb::Job j = Get(job.id());
  EXPECT_EQ(j.state(), pb::JOB_STATE_QUEUED);
  EXPECT_NE(j.reason().find("node b lost"), std::string::npos) << j.reason();
  auto nodes = scheduler_->ListNodes();
  EXPECT_EQ(nodes[1].state(), pb::NODE_STATE_LOST);
  // a is told to stop its rank of the ended generation.
  pb::RankReport stale;
  stale.set_job_id(job.id());
  stale.set_generation(1);
  stale.set_rank(0);
  stale.set_state(pb::RANK_STATE_RUNNING);
  const pb::HeartbeatResponse to_a = Beat("a", {stale});
  ASSERT_EQ(to_a.stop_size(), 1);
  // Its peer is gone, so the step in flight may never finish: it stops at once.
  EXPECT_FALSE(to_a.stop(0).save_step());
  // b comes back: the job starts again as generation 2.
  Beat("b");
  EXPECT_EQ(Get(job.id()).state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(job.id()).generation(), 2);
}

TEST_F(SchedulerTest, FailedRankFailsTheJobWithItsLastLines) {
  AddNode("a");
  pb::Job job = Submit(1);
  pb::HeartbeatResponse orders = Beat("a");
  ASSERT_EQ(orders.start_size(), 1);
  pb::RankReport report = Report(orders.start(0), pb::RANK_STATE_EXITED, 134);
  report.add_log_lines("loading");
  report.add_log_lines("boom: out of memory");
  Beat("a", {report});
  pb::Job j = Get(job.id());
  EXPECT_EQ(j.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(j.exit_code(), 134);
  EXPECT_NE(j.reason().find("signal 6"), std::string::npos) << j.reason();
  ASSERT_EQ(j.last_log_lines_size(), 2);
  EXPECT_EQ(j.last_log_lines(1), "boom: out of memory");
  auto logs = scheduler_->GetLogs(job.id(), 0, 10);
  ASSERT_TRUE(logs.ok());
  EXPECT_EQ(logs->size(), 2u);
  // Resume puts it back in the queue; it starts as generation 2.
  ASSERT_TRUE(scheduler_->ResumeJob(job.id()).ok());
  EXPECT_EQ(Get(job.id()).generation(), 2);
}

TEST_F(SchedulerTest, ARankThatLostItsPeersWaitsForTheCause) {
  AddNode("a");
  AddNode("b");
  pb::Job job = Submit(2);
  const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
  // a's rank lost its peer: the job waits, and a is not told to start it again.
  pb::HeartbeatResponse orders = Beat("a", {Report(on_a, pb::RANK_STATE_EXITED, 75)});
  EXPECT_EQ(orders.start_size(), 0);
  EXPECT_EQ(Get(job.id()).state(), pb::JOB_STATE_RUNNING);
  // The cause: b's rank failed by itself. The job fails with b's reason, not a's.
  Beat("b", {Report(on_b, pb::RANK_STATE_EXITED, 1)});
  pb::Job failed = Get(job.id());
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(failed.failed_rank(), on_b.rank());
  EXPECT_NE(failed.reason().find("node b exited with status 1"), std::string::npos) << failed.reason();

  // When every rank lost its peers there is nobody to blame: restart, a few times. Each
  // generation gets to step 10 and no further (a hang there, say): the steps it does
  // again after a restart are no progress.
  pb::Job again = Submit(2);
  for (int generation = 1; generation <= 4; ++generation) {
    if (generation == 3) {  // the count survives a restart of the scheduler
      Reopen();
      AddNode("a");
      AddNode("b");
    }
    ASSERT_EQ(Get(again.id()).generation(), generation);
    const pb::StartRank a = Beat("a").start(0), b = Beat("b").start(0);
    for (const int step : {7, 10}) {
      pb::RankReport line = Report(a.rank() == 0 ? a : b, pb::RANK_STATE_RUNNING);
      line.add_metric_lines(fmt::format(R"({{"step": {}, "loss": 2.5}})", step));
      Beat(a.rank() == 0 ? "a" : "b", {line});
      EXPECT_EQ(Get(again.id()).progress().step(), step);
    }
    Beat("a", {Report(a, pb::RANK_STATE_EXITED, 75)});
    for (const int step : {7, 10}) {
      pb::RankReport line = Report(a.rank() == 0 ? a : b, pb::RANK_STATE_RUNNING);
      line.add_metric_lines(fmt::format(R"({{"step": {}, "loss": 2.5}})", step));
      Beat(a.rank() == 0 ? "a" : "b", {line});
      EXPECT_EQ(Get(again.id()).progress().step(), step);
    }
    Beat("b", {Report(b, pb::RANK_STATE_EXITED, 75)});
    if (generation < 4) {
      EXPECT_EQ(Get(again.id()).state(), pb::JOB_STATE_RUNNING) << Get(again.id()).reason();  // requeued and placed
    }
  }
  pb::Job gave_up = Get(again.id());
  EXPECT_EQ(gave_up.state(), pb::JOB_STATE_FAILED);
  EXPECT_NE(gave_up.reason().find("lost their peers 4 times in a row without getting past step 10"),
            std::string::npos)
      << gave_up.reason();
  EXPECT_NE(gave_up.reason().find("every rank lost its peers (rank"), std::string::npos) << gave_up.reason();
  // Resumed by a person, it gets its restarts again.
  ASSERT_TRUE(scheduler_->ResumeJob(again.id()).ok());
  ASSERT_EQ(Get(again.id()).state(), pb::JOB_STATE_RUNNING) << Get(again.id()).reason();
  const pb::StartRank a = Beat("a").start(0), b = Beat("b").start(0);
  Beat("a", {Report(a, pb::RANK_STATE_EXITED, 75)});
  Beat("b", {Report(b, pb::RANK_STATE_EXITED, 75)});
  EXPECT_EQ(Get(again.id()).state(), pb::JOB_STATE_RUNNING) << Get(again.id()).reason();
}

TEST_F(SchedulerTest, RanksWaitingForAPeerThatNeverAnswersAreRestartedAfterTheGrace) {
  AddNode("a");
  AddNode("b");
  pb::Job job = Submit(2);
  // Time passes in heartbeats, so no lease runs out; b's rank runs on, waiting for a
  // peer (say one whose address b's host cannot reach).
  auto pass = [&](int64_t ms, const pb::StartRank& on_b) {
    pb::HeartbeatResponse to_b;
    for (int64_t t = 0; t < ms; t += 1000) {
      clock_.Advance(1000);
      Beat("a");
      to_b = Beat("b", {Report(on_b, pb::RANK_STATE_RUNNING)});
      scheduler_->Tick();
    }
    return to_b;
  };
  for (int generation = 1; generation <= 4; ++generation) {
    ASSERT_EQ(Get(job.id()).generation(), generation);
    const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
    Beat("a", {Report(on_a, pb::RANK_STATE_EXITED, 75)});
    // Within the grace (a lease and two heartbeats) a cause could still come.
    pb::HeartbeatResponse to_b = pass(6000, on_b);
    EXPECT_EQ(Get(job.id()).generation(), generation);
    EXPECT_EQ(to_b.stop_size(), 0);
    pass(2000, on_b);
    if (generation < 4) {
      pb::Job restarted = Get(job.id());
      EXPECT_EQ(restarted.generation(), generation + 1) << restarted.reason();
      EXPECT_EQ(restarted.state(), pb::JOB_STATE_RUNNING) << restarted.reason();
    }
    // b is told to stop the rank of the ended generation.
    to_b = Beat("b", {Report(on_b, pb::RANK_STATE_RUNNING)});
    ASSERT_EQ(to_b.stop_size(), 1);
    EXPECT_EQ(to_b.stop(0).generation(), generation);
    Beat("b", {Report(on_b, pb::RANK_STATE_EXITED, 75)});
  }
  pb::Job gave_up = Get(job.id());
  EXPECT_EQ(gave_up.state(), pb::JOB_STATE_FAILED);
  EXPECT_NE(gave_up.reason().find("lost their peers 4 times"), std::string::npos) << gave_up.reason();
  EXPECT_NE(gave_up.reason().find("rank 0 on node a lost its peers and no other rank reported a cause"),
            std::string::npos)
      << gave_up.reason();

  // A cause that comes within the grace decides: b's rank fails by itself, six seconds on.
  pb::Job other = Submit(2);
  const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
  Beat("a", {Report(on_a, pb::RANK_STATE_EXITED, 75)});
  pass(6000, on_b);
  Beat("b", {Report(on_b, pb::RANK_STATE_EXITED, 1)});
  for (int i = 0; i < 4; ++i) {  // past the grace: it stays failed, with b's reason
    clock_.Advance(1000);
    Beat("a");
    Beat("b");
    scheduler_->Tick();
  }
  pb::Job failed = Get(other.id());
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(failed.generation(), 1);
  EXPECT_NE(failed.reason().find("node b exited with status 1"), std::string::npos) << failed.reason();
}

TEST_F(SchedulerTest, AStoppingNodeTakesNoRanksAndItsSavingRankIsTheCause) {
  AddNode("a");
  AddNode("b");
  AddNode("c");
  pb::Job job = Submit(2);
  ASSERT_EQ(Get(job.id()).placement(0).node_id(), "a");
  ASSERT_EQ(Get(job.id()).placement(1).node_id(), "b");
  const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
  // b's daemon is stopping (preempted): its rank finishes the step and saves it, and a's
  // rank, stopped with it, exits as one that lost its peer.
  Beat("b", {Report(on_b, pb::RANK_STATE_RUNNING)}, /*stopping=*/true);
  Beat("a", {Report(on_a, pb::RANK_STATE_EXITED, 75)});
  // A save may take longer than the lost-peer grace: b's running rank is the cause, and
  // the job waits for it rather than restarting with a's reason.
  for (int t = 0; t < 10; ++t) {
    clock_.Advance(1000);
    Beat("a");
    Beat("c");
    Beat("b", {Report(on_b, pb::RANK_STATE_RUNNING)}, true);
    scheduler_->Tick();
  }
  EXPECT_EQ(Get(job.id()).generation(), 1) << Get(job.id()).reason();
  EXPECT_EQ(Get(job.id()).state(), pb::JOB_STATE_RUNNING);
  // b's rank saved and exited as preempted: the job goes on on a and c, not on b, which
  // is still stopping.
  pb::RankReport preempted = Report(on_b, pb::RANK_STATE_EXITED, 128 + 15);
  preempted.set_preempted(true);
  EXPECT_EQ(Beat("b", {preempted}, true).start_size(), 0);
  pb::Job moved = Get(job.id());
  EXPECT_EQ(moved.generation(), 2) << moved.reason();
  EXPECT_EQ(moved.state(), pb::JOB_STATE_RUNNING) << moved.reason();
  for (const pb::Placement& p : moved.placement()) EXPECT_NE(p.node_id(), "b");
  EXPECT_EQ(Beat("b", {}, true).start_size(), 0);
  EXPECT_EQ(Beat("c").start_size(), 1);
  // A daemon that registers again takes ranks.
  pb::Job queued = Submit(1);
  EXPECT_EQ(Get(queued.id()).state(), pb::JOB_STATE_QUEUED);
  AddNode("b");
  scheduler_->Tick();
  EXPECT_EQ(Get(queued.id()).state(), pb::JOB_STATE_RUNNING) << Get(queued.id()).reason();
  EXPECT_EQ(Beat("b").start_size(), 1);
}

// A rank whose GPU failed (exit 74) fails neither itself nor its job: its node is drained,
// with the reason, and the job restarts on another node. Failures that follow the job
// from node to node without a step in between fail it. A drain outlasts the node's lost
// lease, its daemon's restart and the scheduler's, until the node is undrained.
TEST_F(SchedulerTest, AFailedGpuDrainsItsNodeAndTheJobGoesOnElsewhere) {
  max_fault_drained_percent_ = 100;  // every node may be drained here
  Reopen();
  for (const char* id : {"a", "b", "c"}) AddNode(id, 2);
  pb::Job filler = Submit(1);  // takes a device, so that the job's rank is not always device 0
  pb::Job job = Submit(1, 0, /*checkpoints=*/true);
  // The job's rank on its node fails with its GPU, which drains the node.
  auto gpu_fails = [&](int64_t generation, int64_t steps_before) {
    const auto [node, why] = GpuFailsUnder(job, generation, steps_before);
    EXPECT_EQ(NodeOf(node).state(), pb::NODE_STATE_DRAINING);
    EXPECT_TRUE(NodeOf(node).drained_for_gpu_fault());
    EXPECT_NE(NodeOf(node).drain_reason().find(why + " under job " + job.id()), std::string::npos)
        << NodeOf(node).drain_reason();
    EXPECT_NE(NodeOf(node).drain_reason().find("llamactl undrain " + node), std::string::npos);
    return std::pair{node, why};
  };
  const auto [first, first_why] = gpu_fails(1, 0);
  EXPECT_TRUE(SaidOf(job, first_why + " on node " + first + ", which is drained"));
  // It trains past where it was, and another GPU fails: a restart again.
  const auto [second, second_why] = gpu_fails(2, 5);
  EXPECT_NE(second, first);
  // A third, without a step past 5 in between, and after a restart of the scheduler
  // (which keeps the count): the job fails.
  Reopen();
  for (const char* id : {"a", "b", "c"}) AddNode(id, 2);
  const auto [third, third_why] = gpu_fails(3, 0);
  const pb::Job failed = Get(job.id());
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_EQ(failed.exit_code(), kExitDeviceFault);
  EXPECT_NE(failed.reason().find("GPUs failed under it 2 times in a row without it getting past step 5, the last: " +
                                 third_why + " on node " + third),
            std::string::npos)
      << failed.reason();

  // A node whose lease ran out comes back drained; so does one whose daemon or scheduler
  // restarted. A drained node gets no new ranks.
  for (int t = 0; t < 7; ++t) {
    clock_.Advance(1000);
    for (const char* id : {"b", "c"}) Beat(id);
  }
  scheduler_->Tick();
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_LOST);
  Beat("a");
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_DRAINING);
  AddNode("b", 2);
  Reopen();
  for (const char* id : {"a", "b", "c"}) AddNode(id, 2);
  for (const char* id : {"a", "b", "c"}) EXPECT_EQ(NodeOf(id).state(), pb::NODE_STATE_DRAINING) << id;
  scheduler_->CancelJob(filler.id()).IgnoreError();
  pb::Job waiting = Submit(1);
  EXPECT_EQ(Get(waiting.id()).state(), pb::JOB_STATE_QUEUED) << Get(waiting.id()).reason();

  // Undrained, it takes ranks again.
  auto undrained = scheduler_->UndrainNode("a");
  ASSERT_TRUE(undrained.ok()) << undrained.status();
  EXPECT_EQ(undrained->state(), pb::NODE_STATE_READY);
  EXPECT_EQ(undrained->drain_reason(), "");
  EXPECT_EQ(Get(waiting.id()).state(), pb::JOB_STATE_RUNNING) << Get(waiting.id()).reason();
  EXPECT_EQ(Beat("a").start_size(), 1);
  // A lost node that is undrained is ready once it heartbeats.
  for (int t = 0; t < 7; ++t) {
    clock_.Advance(1000);
    Beat("a");
  }
  scheduler_->Tick();
  ASSERT_EQ(NodeOf("b").state(), pb::NODE_STATE_LOST);
  ASSERT_TRUE(scheduler_->UndrainNode("b").ok());
  EXPECT_EQ(NodeOf("b").drain_reason(), "");
  Beat("b");
  EXPECT_EQ(NodeOf("b").state(), pb::NODE_STATE_READY);
  // A rank that names its GPU (llamad's own CUDA_VISIBLE_DEVICES gave it) is reported by
  // that name.
  {
    pb::Job named = Submit(1, 0, /*checkpoints=*/true);
    ASSERT_EQ(Get(named.id()).placement_size(), 1) << Get(named.id()).reason();
    const std::string node = Get(named.id()).placement(0).node_id();
    pb::StartRank start;
    const pb::HeartbeatResponse orders = Beat(node);
    for (const pb::StartRank& s : orders.start()) {
      if (s.job_id() == named.id()) start = s;
    }
    pb::RankReport failed = Report(start, pb::RANK_STATE_EXITED, kExitDeviceFault);
    failed.set_device("GPU-8f6a1c2e");
    Beat(node, {failed});
    EXPECT_TRUE(SaidOf(named, "the GPU of rank 0 (device GPU-8f6a1c2e) failed on node " + node));
    EXPECT_NE(NodeOf(node).drain_reason().find("(device GPU-8f6a1c2e)"), std::string::npos);
    ASSERT_TRUE(scheduler_->CancelJob(named.id()).ok());
    ASSERT_TRUE(scheduler_->UndrainNode(node).ok());
  }
  // An operator's drain says so.
  ASSERT_TRUE(scheduler_->DrainNode("b").ok());
  EXPECT_EQ(NodeOf("b").drain_reason(), "drained with llamactl drain");
  EXPECT_FALSE(NodeOf("b").drained_for_gpu_fault());
  auto long_reason = scheduler_->DrainNode("c", false, std::string(1001, 'x'));
  EXPECT_EQ(long_reason.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(long_reason.status().message().find("reason: 1001 characters"), std::string::npos);
  ASSERT_TRUE(scheduler_->UndrainNode("b").ok());
  EXPECT_TRUE(scheduler_->UndrainNode("b").ok());  // not drained: nothing changes
  EXPECT_EQ(NodeOf("b").state(), pb::NODE_STATE_READY);
  EXPECT_EQ(scheduler_->UndrainNode("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SchedulerTest, GpuFaultsDrainAtMostAFewNodes) {
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  pb::Job job = Submit(1, 0, /*checkpoints=*/true);
  // 10% of 10 nodes: the first fault drains its node.
  EXPECT_EQ(scheduler_->GpuFaultDrains().limit, 1);
  EXPECT_EQ(scheduler_->GpuFaultDrains().drained, 0);
  const auto [first, first_why] = GpuFailsUnder(job, 1, 0);
  EXPECT_EQ(NodeOf(first).state(), pb::NODE_STATE_DRAINING);
  EXPECT_EQ(scheduler_->GpuFaultDrains().drained, 1);
  // The count survives a restart of the scheduler; operators' drains do not count.
  Reopen();
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  const std::string placed = Get(job.id()).placement(0).node_id();
  const std::string idle = first != "n8" && placed != "n8" ? "n8" : first != "n9" && placed != "n9" ? "n9" : "n7";
  ASSERT_TRUE(scheduler_->DrainNode(idle).ok());
  // The next, after the job trained on, leaves its node in service, and says why.
  const auto [second, second_why] = GpuFailsUnder(job, 2, 5);
  EXPECT_NE(second, first);
  EXPECT_EQ(NodeOf(second).state(), pb::NODE_STATE_READY);
  EXPECT_EQ(NodeOf(second).drain_reason(), "");
  EXPECT_TRUE(SaidOf(job, second_why + " on node " + second +
                              ", which is not drained: 1 of the 10 known nodes are drained for GPU faults "
                              "already, and GPU faults drain at most 1 (max_fault_drained_percent 10, at least one)"));
  EXPECT_EQ(Get(job.id()).state(), pb::JOB_STATE_RUNNING) << Get(job.id()).reason();
  // Its next generation goes elsewhere (the first node in order would be that one).
  EXPECT_EQ(second, "n1");
  EXPECT_EQ(Get(job.id()).placement(0).node_id(), "n2");
  // A third fault without progress fails the job, and still drains nothing.
  const auto [third, third_why] = GpuFailsUnder(job, 3, 0);
  EXPECT_EQ(NodeOf(third).drain_reason(), "");
  const pb::Job failed = Get(job.id());
  EXPECT_EQ(failed.state(), pb::JOB_STATE_FAILED);
  EXPECT_NE(failed.reason().find(third_why + " on node " + third + ", which is not drained: 1 of the 10"),
            std::string::npos)
      << failed.reason();
  // Undraining the first node frees its place: the next fault drains again.
  ASSERT_TRUE(scheduler_->UndrainNode(first).ok());
  EXPECT_FALSE(NodeOf(first).drained_for_gpu_fault());
  pb::Job next = Submit(1, 0, /*checkpoints=*/true);
  const auto [fourth, fourth_why] = GpuFailsUnder(next, 1, 0);
  EXPECT_EQ(NodeOf(fourth).state(), pb::NODE_STATE_DRAINING);
  EXPECT_TRUE(NodeOf(fourth).drained_for_gpu_fault());
  // A fault on a node an operator drained while its ranks ran replaces the reason at the
  // limit too: that node was out of service already. It counts from then on.
  const std::string operator_drained = Get(next.id()).placement(0).node_id();
  ASSERT_TRUE(scheduler_->DrainNode(operator_drained).ok());
  ASSERT_TRUE(scheduler_->DrainNode(idle).ok());  // a second drain of a drained node changes nothing
  EXPECT_EQ(NodeOf(idle).drain_reason(), "drained with llamactl drain");
  const auto [fifth, fifth_why] = GpuFailsUnder(next, 2, 5);
  EXPECT_EQ(fifth, operator_drained);
  EXPECT_TRUE(NodeOf(fifth).drained_for_gpu_fault());
  EXPECT_NE(NodeOf(fifth).drain_reason().find(fifth_why), std::string::npos) << NodeOf(fifth).drain_reason();
  // An operator's drain of a node a fault drained frees its place too, and keeps the node
  // out and the fault's words.
  ASSERT_TRUE(scheduler_->DrainNode(fourth, false, "bad fan").ok());
  EXPECT_EQ(NodeOf(fourth).state(), pb::NODE_STATE_DRAINING);
  EXPECT_FALSE(NodeOf(fourth).drained_for_gpu_fault());
  EXPECT_TRUE(NodeOf(fourth).drain_reason().starts_with("drained with llamactl drain: bad fan; before that: " +
                                                         fourth_why + " under job " + next.id()))
      << NodeOf(fourth).drain_reason();
  // 30% of ten: up to three nodes (one is counted now: fifth); the third fault from here
  // (eighth) is refused.
  max_fault_drained_percent_ = 30;
  Reopen();
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  const auto [sixth, sixth_why] = GpuFailsUnder(next, 3, 10);
  EXPECT_EQ(NodeOf(sixth).state(), pb::NODE_STATE_DRAINING);
  EXPECT_TRUE(SaidOf(next, sixth_why + " on node " + sixth + ", which is drained"));
  const auto [seventh, seventh_why] = GpuFailsUnder(next, 4, 15);
  EXPECT_EQ(NodeOf(seventh).state(), pb::NODE_STATE_DRAINING);
  const auto [eighth, eighth_why] = GpuFailsUnder(next, 5, 20);
  EXPECT_EQ(NodeOf(eighth).state(), pb::NODE_STATE_READY);
  EXPECT_EQ(scheduler_->GpuFaultDrains().drained, 3);
  EXPECT_EQ(scheduler_->GpuFaultDrains().limit, 3);
  EXPECT_EQ(scheduler_->GpuFaultDrains().known, 10);
  EXPECT_TRUE(SaidOf(next, eighth_why + " on node " + eighth + ", which is not drained: 3 of the 10 known nodes " +
                               "are drained for GPU faults already, and GPU faults drain at most 3 " +
                               "(max_fault_drained_percent 30, at least one)"));
  // 0: none.
  max_fault_drained_percent_ = 0;
  Reopen();
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  EXPECT_EQ(scheduler_->GpuFaultDrains().limit, 0);
  ASSERT_TRUE(scheduler_->ResumeJob(job.id()).ok());
  const auto [last, last_why] = GpuFailsUnder(job, 4, 0);
  EXPECT_EQ(NodeOf(last).drain_reason(), "");
  EXPECT_TRUE(SaidOf(job, last_why + " on node " + last +
                              ", which is not drained: GPU faults drain no node here (max_fault_drained_percent 0)"));
  // Out of range: the scheduler does not open.
  SchedulerOptions options;
  options.data_dir = dir_.string();
  options.max_fault_drained_percent = -1;
  EXPECT_NE(Scheduler::Open(options, &clock_).status().message().find("max_fault_drained_percent -1"),
            std::string::npos);
  // Nor with a duration whose sums with clock times would overflow.
  options.max_fault_drained_percent = 0;
  options.grow_after_ms = INT64_MAX;
  const auto too_long = Scheduler::Open(options, &clock_);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("grow_after_ms"), std::string::npos) << too_long.status();
}

// Lost nodes leave the state after forget_lost_nodes_after_ms (preemptible machines come
// back under new names), unless drained; one that heartbeats again registers anew.
TEST_F(SchedulerTest, NodesLostLongEnoughAreForgottenUnlessDrained) {
  forget_lost_nodes_after_ms_ = 60'000;
  Reopen();
  for (const char* id : {"a", "b", "c", "d"}) AddNode(id);
  pb::Job job = Submit(1);  // on a
  ASSERT_TRUE(scheduler_->DrainNode("c").ok());
  auto ids = [&] {
    std::string all;
    for (const pb::NodeInfo& n : scheduler_->ListNodes()) all += n.id();
    return all;
  };
  // a, b and c go silent; d heartbeats on. Lost after the lease, a's job back in the queue.
  for (int t = 0; t < 6; ++t) {
    clock_.Advance(1000);
    Beat("d");
  }
  scheduler_->Tick();
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_LOST);
  EXPECT_EQ(ids(), "abcd");
  // Not yet at a minute of silence, across a restart of the scheduler (which keeps when
  // they were last heard of); then past it.
  auto pass = [&](int seconds) {
    for (int t = 0; t < seconds; ++t) {
      clock_.Advance(1000);
      Beat("d");
    }
    scheduler_->Tick();
  };
  pass(30);
  Reopen();
  pass(20);
  EXPECT_EQ(ids(), "abcd");
  pass(10);
  EXPECT_EQ(ids(), "cd") << "a and b forgotten; c is drained";
  EXPECT_EQ(scheduler_->GpuFaultDrains().known, 2);
  EXPECT_EQ(Get(job.id()).placement(0).node_id(), "d") << Get(job.id()).reason();
  // Gone from the state too.
  Reopen();
  EXPECT_EQ(ids(), "cd");
  // Undrained, c is forgotten at once: it has been lost long enough.
  auto undrained = scheduler_->UndrainNode("c");
  ASSERT_TRUE(undrained.ok()) << undrained.status();
  EXPECT_EQ(undrained->id(), "c");
  EXPECT_EQ(undrained->drain_reason(), "");
  EXPECT_EQ(ids(), "d");
  // A forgotten node that heartbeats is asked to register, and then is a node again.
  EXPECT_TRUE(Beat("a").reregister());
  AddNode("a");
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_READY);
  // 0: never.
  forget_lost_nodes_after_ms_ = 0;
  Reopen();
  pass(100);
  EXPECT_EQ(NodeOf("a").state(), pb::NODE_STATE_LOST);
  EXPECT_EQ(ids(), "ad");
}

TEST_F(SchedulerTest, NodesAnEarlierVersionDrainedForAGpuFaultCount) {
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  pb::Job job = Submit(1, 0, /*checkpoints=*/true);
  const auto [first, first_why] = GpuFailsUnder(job, 1, 0);
  // Its record as an earlier version wrote it: the reason, without the mark.
  scheduler_.reset();
  {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), (dir_ / "state").string(), &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    std::string value;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), "node/" + first, &value).ok());
    pb::NodeInfo node;
    ASSERT_TRUE(node.ParseFromString(value));
    ASSERT_TRUE(node.drained_for_gpu_fault());
    node.clear_drained_for_gpu_fault();
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "node/" + first, node.SerializeAsString()).ok());
  }
  Reopen();
  EXPECT_TRUE(NodeOf(first).drained_for_gpu_fault());
  for (int i = 0; i < 10; ++i) AddNode(fmt::format("n{}", i));
  const auto [second, second_why] = GpuFailsUnder(job, 2, 5);
  EXPECT_EQ(NodeOf(second).drain_reason(), "");
}

TEST_F(SchedulerTest, DrainingNowMovesTheJobsAndTheirRanksSaveFirst) {
  AddNode("a");
  AddNode("b");
  AddNode("c");
  pb::Job job = Submit(2, 0, /*checkpoints=*/true);
  ASSERT_EQ(Get(job.id()).placement(1).node_id(), "b");
  const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
  // A plain drain lets the job run on.
  ASSERT_TRUE(scheduler_->DrainNode("b").ok());
  EXPECT_EQ(Get(job.id()).generation(), 1);
  EXPECT_EQ(Beat("b", {Report(on_b, pb::RANK_STATE_RUNNING)}).stop_size(), 0);
  // --now: the job restarts on a and c; both of generation 1's ranks save their step.
  auto drained = scheduler_->DrainNode("b", /*move_jobs=*/true);
  ASSERT_TRUE(drained.ok()) << drained.status();
  EXPECT_EQ(drained->devices_in_use(), 0);
  pb::Job moved = Get(job.id());
  EXPECT_EQ(moved.generation(), 2) << moved.reason();
  EXPECT_EQ(moved.state(), pb::JOB_STATE_RUNNING) << moved.reason();
  for (const pb::Placement& p : moved.placement()) EXPECT_NE(p.node_id(), "b");
  for (const auto& [node, rank] : {std::pair{"a", on_a}, std::pair{"b", on_b}}) {
    const pb::HeartbeatResponse orders = Beat(node, {Report(rank, pb::RANK_STATE_RUNNING)});
    ASSERT_EQ(orders.stop_size(), 1) << node;
    EXPECT_TRUE(orders.stop(0).save_step()) << node;
  }
  auto events = scheduler_->WaitJobUpdates(job.id(), 0, 0, 0);
  ASSERT_TRUE(events.ok());
  bool said = false;
  for (const auto& e : events->events) said |= e.message().starts_with("node b drained");
  EXPECT_TRUE(said);
  EXPECT_FALSE(scheduler_->DrainNode("nope", true).ok());
  // What the scheduler told survives its restart.
  Reopen();
  EXPECT_TRUE(StopOrder("a", on_a).save_step());

  // Nothing to save: a job without checkpoints, or one with a rank that lost its peers
  // (their step may never finish), is stopped at once.
  ASSERT_TRUE(scheduler_->CancelJob(job.id()).ok());
  pb::Job plain = Submit(2);
  const pb::StartRank plain_a = Beat("a").start(0);
  ASSERT_TRUE(scheduler_->CancelJob(plain.id()).ok());
  EXPECT_FALSE(StopOrder("a", plain_a).save_step());
  pb::Job again = Submit(2, 0, true);
  const pb::StartRank again_a = Beat("a").start(0);
  const pb::StartRank again_c = Beat("c").start(0);
  Beat("c", {Report(again_c, pb::RANK_STATE_EXITED, 75)});
  ASSERT_TRUE(scheduler_->CancelJob(again.id()).ok());
  EXPECT_FALSE(StopOrder("a", again_a).save_step());
}

TEST_F(SchedulerTest, ANewGenerationStartsOnceThePreviousRanksHaveStopped) {
  AddNode("a");
  AddNode("b");
  AddNode("c");
  const pb::Job job = Submit(2, 0, /*checkpoints=*/true);
  const pb::StartRank on_a = Beat("a").start(0), on_b = Beat("b").start(0);
  ASSERT_TRUE(scheduler_->DrainNode("b", /*move_jobs=*/true).ok());
  ASSERT_EQ(Get(job.id()).generation(), 2);
  // Generation 1's ranks are saving the step generation 2 resumes from: c, free, gets
  // no start until both have stopped, and the job says so.
  EXPECT_EQ(Beat("c").start_size(), 0);
  EXPECT_EQ(Get(job.id()).reason(), "generation 2 on a, c; its ranks start once the previous generation's on a, b "
                                    "have saved their step and stopped");
  EXPECT_EQ(StopOrder("b", on_b).generation(), 1);
  EXPECT_EQ(Beat("a", {Report(on_a, pb::RANK_STATE_EXITED, 75)}).start_size(), 0);
  EXPECT_EQ(Beat("c").start_size(), 0);
  pb::RankReport saved = Report(on_b, pb::RANK_STATE_EXITED, 128 + 15);
  Beat("b", {saved}, /*stopping=*/false);
  EXPECT_EQ(Beat("c").start_size(), 1);
  EXPECT_EQ(Beat("a").start_size(), 1);
  EXPECT_EQ(Get(job.id()).reason(), "generation 2 on a, c");

  // A rank that never stops (stuck in the kernel) holds the next generation back for
  // previous_ranks_wait_ms (10 minutes) at most.
  ASSERT_TRUE(scheduler_->CancelJob(job.id()).ok());
  const pb::Job next = Submit(2, 0, true);
  const pb::StartRank stuck = Beat("a").start(0), on_c = Beat("c").start(0);
  ASSERT_TRUE(scheduler_->DrainNode("a", true).ok());
  auto beat_all = [&] {  // starts on c and d
    Beat("a", {Report(stuck, pb::RANK_STATE_RUNNING)});
    Beat("b");
    return Beat("c").start_size() + Beat("d").start_size();
  };
  Beat("c", {Report(on_c, pb::RANK_STATE_EXITED, 75)});
  // While the job waits in the queue, a's rank of generation 1 still runs.
  ASSERT_EQ(Get(next.id()).state(), pb::JOB_STATE_QUEUED);
  Beat("a", {Report(stuck, pb::RANK_STATE_RUNNING)});
  AddNode("d");  // room for generation 2 (b stays drained)
  scheduler_->Tick();
  ASSERT_EQ(Get(next.id()).generation(), 2) << Get(next.id()).reason();
  int starts = 0;
  for (int s = 0; s < 599 && starts == 0; ++s) {
    clock_.Advance(1000);
    starts = beat_all();
  }
  EXPECT_EQ(starts, 0) << "started before the wait ran out";
  for (int s = 0; s < 3 && starts == 0; ++s) {
    clock_.Advance(1000);
    starts = beat_all();
  }
  EXPECT_EQ(starts, 2);
}

TEST_F(SchedulerTest, AShrunkJobGrowsBackWhenItsNodeReturns) {
  for (auto n : {"a", "b", "c"}) AddNode(n);
  auto submit = [&](bool checkpoints) {
    pb::SubmitJobRequest r;
    r.set_spec_yaml(Spec(3) + "  min_nodes: 2\n" + (checkpoints ? "checkpoint: {dir: ckpt, interval: 10}\n" : ""));
    r.set_spec_origin("/jobs/gang.yaml");
    return *scheduler_->SubmitJob(r);
  };
  // Time passes in heartbeats of the nodes given.
  auto pass = [&](int64_t ms, std::vector<std::string> alive) {
    for (int64_t t = 0; t < ms; t += 1000) {
      clock_.Advance(1000);
      for (const auto& n : alive) Beat(n);
      scheduler_->Tick();
    }
  };
  const pb::Job job = submit(true);
  ASSERT_EQ(Get(job.id()).placement_size(), 3);
  pass(6000, {"a", "b"});  // c's lease runs out: the job shrinks to a and b
  ASSERT_EQ(Get(job.id()).generation(), 2);
  ASSERT_EQ(Get(job.id()).placement_size(), 2);
  Beat("c");  // c is back
  pass(50'000, {"a", "b", "c"});
  EXPECT_EQ(Get(job.id()).generation(), 2);  // not before grow_after_ms (60 s)
  pass(12'000, {"a", "b", "c"});
  pb::Job grown = Get(job.id());
  EXPECT_EQ(grown.generation(), 3) << grown.reason();
  EXPECT_EQ(grown.placement_size(), 3) << grown.reason();
  EXPECT_EQ(grown.state(), pb::JOB_STATE_RUNNING);
  auto events = scheduler_->WaitJobUpdates(job.id(), 0, 0, 0);
  ASSERT_TRUE(events.ok());
  bool said = false;
  for (const auto& e : events->events) said |= e.message().find("growing from 2 node(s): c free again") == 0;
  EXPECT_TRUE(said);
  // Generation 2's ranks, all alive, save the step they stop after; generation 3 goes on
  // from it. So do a cancelled job's.
  auto stop_of = [&](const pb::Job& j, int64_t generation) {
    pb::RankReport rank;
    rank.set_job_id(j.id());
    rank.set_generation(generation);
    rank.set_rank(0);
    rank.set_state(pb::RANK_STATE_RUNNING);
    const pb::HeartbeatResponse orders = Beat("a", {rank});
    EXPECT_EQ(orders.stop_size(), 1);
    return orders.stop_size() == 1 ? orders.stop(0) : pb::StopRank();
  };
  EXPECT_TRUE(stop_of(job, 2).save_step());
  ASSERT_TRUE(scheduler_->CancelJob(job.id()).ok());
  EXPECT_TRUE(stop_of(job, 3).save_step());

  // A job that saves no checkpoints would start over: it stays on the nodes it has.
  const pb::Job plain = submit(false);
  pass(6000, {"a", "b"});
  ASSERT_EQ(Get(plain.id()).placement_size(), 2);
  Beat("c");
  pass(70'000, {"a", "b", "c"});
  EXPECT_EQ(Get(plain.id()).generation(), 2);
  EXPECT_EQ(Get(plain.id()).placement_size(), 2);

  // A spare device on a node the job already has is no room to grow: with c gone for
  // good and a second device on a, the job stays as it is (no restart every minute).
  ASSERT_TRUE(scheduler_->CancelJob(plain.id()).ok());
  AddNode("a", 2);
  const pb::Job spare = submit(true);
  ASSERT_EQ(Get(spare.id()).placement_size(), 3);
  pass(6000, {"a", "b"});
  ASSERT_EQ(Get(spare.id()).generation(), 2);
  pass(130'000, {"a", "b"});
  EXPECT_EQ(Get(spare.id()).generation(), 2) << Get(spare.id()).reason();
}

TEST_F(SchedulerTest, RestartLosesNoJobNodeOrEvent) {
  AddNode("a");
  pb::Job running = Submit(1);
  pb::Job queued = Submit(1);
  const pb::StartRank start = Beat("a").start(0);
  pb::RankReport said = Report(start, pb::RANK_STATE_RUNNING);
  said.add_log_lines("before the restart");
  Beat("a", {said});
  auto events_before = scheduler_->WaitJobUpdates(running.id(), 0, 0, 0);
  ASSERT_TRUE(events_before.ok());
  ASSERT_FALSE(events_before->events.empty());
  Reopen();
  EXPECT_EQ(Get(running.id()).state(), pb::JOB_STATE_RUNNING);
  EXPECT_EQ(Get(queued.id()).state(), pb::JOB_STATE_QUEUED);
  EXPECT_EQ(scheduler_->ListNodes().size(), 1u);
  auto events_after = scheduler_->WaitJobUpdates(running.id(), 0, 0, 0);
  ASSERT_TRUE(events_after.ok());
  EXPECT_EQ(events_after->events.size(), events_before->events.size());
  // The node's rank is still expected; new ids continue after the old ones.
  EXPECT_EQ(Beat("a").start_size(), 1);
  EXPECT_GT(Submit(1).id(), queued.id());
  // New events and log lines continue after the stored ones, and overwrite none.
  said.set_log_lines(0, "after the restart");
  Beat("a", {said});
  ASSERT_TRUE(scheduler_->CancelJob(running.id()).ok());
  auto events_then = scheduler_->WaitJobUpdates(running.id(), 0, 0, 0);
  ASSERT_TRUE(events_then.ok());
  ASSERT_EQ(events_then->events.size(), events_before->events.size() + 1);
  for (size_t i = 0; i < events_before->events.size(); ++i) {
    EXPECT_EQ(events_then->events[i].message(), events_before->events[i].message()) << i;
  }
  EXPECT_EQ(events_then->events.back().seq(), events_before->events.back().seq() + 1);
  EXPECT_EQ(events_then->events.back().kind(), "cancelled");
  auto logs = scheduler_->GetLogs(running.id(), 0, 0);
  ASSERT_TRUE(logs.ok()) << logs.status();
  ASSERT_EQ(logs->size(), 2u);
  EXPECT_EQ((*logs)[0].text(), "before the restart");
  EXPECT_EQ((*logs)[1].text(), "after the restart");
  EXPECT_EQ((*logs)[1].seq(), (*logs)[0].seq() + 1);
}

TEST_F(SchedulerTest, DamagedCountersAreDataLossAndLoseNothing) {
  const pb::Job job = Submit(1);
  scheduler_.reset();
  // Writes `value` under `key` (or deletes the key when nullopt) in the stored state.
  auto store = [&](const std::string& key, std::optional<std::string> value) {
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), (dir_ / "state").string(), &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    const rocksdb::WriteOptions w;
    ASSERT_TRUE((value ? db->Put(w, key, *value) : db->Delete(w, key)).ok());
  };
  auto expect_damaged = [&](const std::string& needle) {
    SchedulerOptions options;
    options.data_dir = dir_.string();
    auto opened = Scheduler::Open(options, &clock_);
    ASSERT_FALSE(opened.ok()) << needle;
    EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(opened.status().message().find(needle), std::string::npos) << opened.status();
  };
  for (const std::string damaged : {"x7", "", "7x", "0", "99999999999999999999"}) {
    store("meta/next_job", damaged);
    expect_damaged("meta/next_job is damaged");
  }
  store("meta/next_job", "2");
  // The job's last event and first log line: their keys end in the sequence number.
  for (const std::string key : {"event/" + job.id() + "/zz", "log/" + job.id() + "/-1"}) {
    store(key, "");
    expect_damaged("key " + key + " is damaged");
    store(key, std::nullopt);
  }
  Reopen();
  EXPECT_EQ(Get(job.id()).id(), job.id());
}

TEST_F(SchedulerTest, MalformedSpecNamesTheField) {
  pb::SubmitJobRequest r;
  r.set_spec_origin("/jobs/bad.yaml");
  r.set_spec_yaml(Spec(1) + "  devices_per_nod: 2\n");
  auto job = scheduler_->SubmitJob(r);
  ASSERT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(job.status().message().find("resources.devices_per_nod"), std::string::npos) << job.status();
  r.set_spec_yaml(Spec(0));
  job = scheduler_->SubmitJob(r);
  ASSERT_EQ(job.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(job.status().message().find("resources.nodes"), std::string::npos) << job.status();
  EXPECT_TRUE(scheduler_->ListJobs(true, 0).empty());
}

TEST_F(SchedulerTest, RendezvousWaitsForKeysAndIsScopedByGeneration) {
  AddNode("a");
  pb::Job job = Submit(1);
  pb::RendezvousScope scope;
  scope.set_job_id(job.id());
  scope.set_generation(1);
  std::thread setter([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_TRUE(scheduler_->RendezvousSet(scope, "rank0", "addr").ok());
  });
  auto values = scheduler_->RendezvousGet(scope, {"rank0"}, 5000);
  setter.join();
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ((*values)[0], "addr");
  pb::RendezvousScope old = scope;
  old.set_generation(0);
  // An ended generation's keys can no longer be set: a wait for them ends at once.
  EXPECT_EQ(scheduler_->RendezvousGet(old, {"rank0"}, 30'000).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(scheduler_->RendezvousGet(scope, {"never-set"}, 10).status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(*scheduler_->RendezvousAdd(scope, "n", 2), 2);
  EXPECT_EQ(*scheduler_->RendezvousAdd(scope, "n", 3), 5);
  // Numbers from the wire are checked: a sum past int64, a timeout out of range, and
  // an ended generation's add are refused, and the count is what it was.
  EXPECT_EQ(scheduler_->RendezvousAdd(scope, "n", INT64_MAX).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(scheduler_->RendezvousAdd(old, "n", 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(*scheduler_->RendezvousAdd(scope, "n", 0), 5);
  ASSERT_TRUE(scheduler_->RendezvousSet(scope, "not-a-number", "5x").ok());
  EXPECT_EQ(scheduler_->RendezvousAdd(scope, "not-a-number", 1).status().code(), absl::StatusCode::kFailedPrecondition);
  for (const int64_t timeout_ms : {int64_t{-1}, Scheduler::kMaxRendezvousWaitMs + 1, INT64_MAX}) {
    EXPECT_EQ(scheduler_->RendezvousGet(scope, {"rank0"}, timeout_ms).status().code(),
              absl::StatusCode::kInvalidArgument) << timeout_ms;
  }
  // A caller that goes away ends its wait within a second, long before its timeout.
  std::atomic<bool> gone = false;
  std::thread leaver([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    gone = true;
  });
  const auto start = std::chrono::steady_clock::now();
  auto abandoned = scheduler_->RendezvousGet(scope, {"never-set"}, 30'000,
                                             [&] { return gone.load(); });
  leaver.join();
  EXPECT_EQ(abandoned.status().code(), absl::StatusCode::kCancelled) << abandoned.status();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));  // half the timeout
}

TEST_F(SchedulerTest, ClientSequenceNumbersAndWorkerStepsOutOfRangeAreRefused) {
  AddNode("a");
  pb::Job job = Submit(1);
  for (const int64_t after : {int64_t{-1}, INT64_MAX}) {
    EXPECT_EQ(scheduler_->WaitJobUpdates(job.id(), after, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(scheduler_->GetLogs(job.id(), after, 0).status().code(), absl::StatusCode::kInvalidArgument);
  }
  // A negative step in rank 0's metric line is not progress.
  const pb::StartRank start = Beat("a").start(0);
  for (const int64_t step : {int64_t{3}, int64_t{-1}}) {
    pb::RankReport line = Report(start, pb::RANK_STATE_RUNNING);
    line.add_metric_lines(fmt::format(R"({{"step": {}, "loss": 2.5}})", step));
    Beat("a", {line});
  }
  EXPECT_EQ(Get(job.id()).progress().step(), 3);
}

// The workers' hand-encoded messages are what the generated classes read and write.
TEST(RendezvousWire, MatchesTheGeneratedClasses) {
  pb::RendezvousSetRequest set;
  ASSERT_TRUE(set.ParseFromString(daemon::wire::EncodeSetRequest("j-000007", 3, "rank1", std::string("a\0b", 3))));
  EXPECT_EQ(set.scope().job_id(), "j-000007");
  EXPECT_EQ(set.scope().generation(), 3);
  EXPECT_EQ(set.key(), "rank1");
  EXPECT_EQ(set.value(), std::string("a\0b", 3));
  pb::RendezvousGetRequest get;
  ASSERT_TRUE(get.ParseFromString(daemon::wire::EncodeGetRequest("j-1", 300, {"x", "y"}, 123456)));
  EXPECT_EQ(get.scope().generation(), 300);
  ASSERT_EQ(get.keys_size(), 2);
  EXPECT_EQ(get.keys(1), "y");
  EXPECT_EQ(get.timeout_ms(), 123456);
  pb::RendezvousGetResponse response;
  response.add_values(std::string(300, 'v'));
  response.add_values("");
  auto values = daemon::wire::DecodeGetResponse(response.SerializeAsString());
  ASSERT_TRUE(values.has_value());
  ASSERT_EQ(values->size(), 2u);
  EXPECT_EQ((*values)[0], std::string(300, 'v'));
  EXPECT_FALSE(daemon::wire::DecodeGetResponse("\x0a\x05" "ab").has_value());
}

}  // namespace
}  // namespace llamad::scheduler
