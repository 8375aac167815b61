// The cluster scheduler: jobs, nodes, gang placement, node leases, rank supervision and
// the workers' rendezvous store, with every state change in RocksDB.
//
// Transport-free: the gRPC services (service.h) translate requests into these calls,
// and tests drive it directly with a ManualClock. All methods are thread-safe (one
// mutex; no call blocks on I/O other than a RocksDB write, except the Wait* calls).
//
// Durability: job and node state changes, and events, are synced RocksDB writes; a
// scheduler killed with SIGKILL restarts with every job, node and event it had
// acknowledged. Step progress and log lines are written without fsync (the WAL keeps
// them across a process crash; a machine crash may lose the last ones).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "llamad/v1/llamad.pb.h"
#include "scheduler/clock.h"

namespace rocksdb {
class DB;
class WriteBatch;
}

namespace llamad::scheduler {

namespace pb = ::llamad::v1;

struct SchedulerOptions {
  // Folder of the RocksDB state (created if absent).
  std::string data_dir;
  // How often daemons heartbeat, and the silence after which a node is lost.
  int64_t heartbeat_interval_ms = 1000;
  int64_t lease_timeout_ms = 5000;
  // Log lines kept per job (older ones are deleted).
  int64_t log_lines_kept = 50'000;
  // The last stderr lines of a failed rank copied into the job record.
  int failure_log_lines = 20;
  // Restarts in a row when every rank lost its peers and none failed by itself (or
  // the rest were still waiting for peers after ExpireLostPeersLocked's grace); one
  // more fails the job (a step past the furthest one so far starts the count again).
  int peer_lost_restarts = 3;
  // Restarts in a row after a rank's GPU failed (each drains that node, within
  // max_fault_drained_percent), likewise; one
  // more fails the job: failures that follow a job from node to node without a step in
  // between are more likely the job's or its build's than every GPU's.
  int gpu_fault_restarts = 1;
  // GPU faults drain at most this percent of the known nodes (lost ones included), and
  // at least one node; 0: they drain none. A fault past the limit leaves its node in
  // service (that job takes it last) and restarts (or fails) the job as above:
  // many nodes faulting at once are more likely a shared cause (a driver, a build, a job)
  // than as many broken GPUs, and draining them all would leave nothing to run on.
  // Operators' drains do not count, and one of a fault-drained node takes it over.
  int max_fault_drained_percent = 10;
  // A node lost (no heartbeat) this long, and not drained, is forgotten: it leaves the
  // state, `llamactl nodes` and the count max_fault_drained_percent is a share of.
  // Preemptible machines often come back under new names, and their old ones would
  // pile up. A forgotten node that heartbeats again registers anew. Drained nodes are
  // kept until undrained. The time counts from the last heartbeat, across scheduler
  // restarts (NodeInfo.last_heartbeat_unix_ms of a lost node). 0: never.
  int64_t forget_lost_nodes_after_ms = 24 * 3'600'000;
  // A job that restarted on fewer nodes than it asked for (resources.nodes) grows back
  // when other nodes are free for it and no job waits in the queue, once its generation
  // and those nodes have been up this long: it restarts on more nodes from its latest
  // checkpoint, so the steps since that checkpoint are done again. Only jobs that save
  // checkpoints grow. 0: never.
  int64_t grow_after_ms = 60'000;
  // A job's next generation starts once its previous one's ranks have stopped (they may
  // be saving the step they stopped after, which it resumes from), or after this long.
  int64_t previous_ranks_wait_ms = 600'000;
};

class Scheduler {
 public:
  // Opens (or creates) the state in options.data_dir and loads it. `clock` must outlive
  // the scheduler. Nodes loaded from disk get a fresh lease: daemons that still run
  // keep their jobs by heartbeating within lease_timeout_ms.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Open(const SchedulerOptions& options, Clock* clock);
  ~Scheduler();

  const SchedulerOptions& options() const { return options_; }

  // ---- jobs (the Scheduler service) ----
  // Validates the spec (INVALID_ARGUMENT naming the field), stores and queues the job,
  // and places it when nodes are free.
  absl::StatusOr<pb::Job> SubmitJob(const pb::SubmitJobRequest& request);
  // By id, or by name (the newest job of that name). NOT_FOUND otherwise.
  absl::StatusOr<pb::Job> GetJob(const std::string& id_or_name);
  std::vector<pb::Job> ListJobs(bool include_finished, int limit);
  // Stops a queued or running job's ranks and marks it cancelled. FAILED_PRECONDITION
  // when it already ended.
  absl::StatusOr<pb::Job> CancelJob(const std::string& id_or_name);
  // Puts a failed or cancelled job back in the queue (its ranks resume from the latest
  // checkpoint). FAILED_PRECONDITION for a queued, running or succeeded job.
  absl::StatusOr<pb::Job> ResumeJob(const std::string& id_or_name);
  // What changed in a job: its stored events with seq > after_seq, and the job itself
  // when its progress is newer than `progress_after_ms` (step progress is not stored as
  // events: that would be a synced write per step).
  struct JobUpdates {
    std::vector<pb::JobEvent> events;
    std::optional<pb::Job> progressed;
  };
  // Waits up to `wait_ms` for either; both empty on timeout.
  absl::StatusOr<JobUpdates> WaitJobUpdates(const std::string& job_id, int64_t after_seq, int64_t progress_after_ms,
                                            int64_t wait_ms);
  // Log lines of a job: those after `after_seq`, or the last `tail` when after_seq is 0.
  absl::StatusOr<std::vector<pb::LogLine>> GetLogs(const std::string& id_or_name, int64_t after_seq, int tail);

  // ---- nodes ----
  std::vector<pb::NodeInfo> ListNodes();
  // GPU-fault drains against their limit (max_fault_drained_percent).
  struct FaultDrains {
    int64_t drained = 0;  // nodes drained for a GPU fault now
    int64_t limit = 0;    // the most GPU faults drain (0: none)
    int64_t known = 0;    // nodes the limit is a share of
  };
  FaultDrains GpuFaultDrains();
  // The node takes nothing new, and finishes what it runs or (move_jobs) restarts on other
  // nodes each job with a rank there, from the step its ranks stop after.
  // `reason`: the operator's words for llamactl nodes (at most kMaxDrainReason bytes). A
  // node drained already keeps its reason, unless a GPU fault drained it: the operator's
  // drain takes that over (the fault's words kept after it), and it stops counting
  // against max_fault_drained_percent.
  static constexpr size_t kMaxDrainReason = 1000;
  absl::StatusOr<pb::NodeInfo> DrainNode(const std::string& node_id, bool move_jobs = false,
                                         const std::string& reason = "");
  // A drained node takes new ranks again (a lost one once it heartbeats). NotFound for an
  // unknown node; a node that is not drained is left as it is.
  absl::StatusOr<pb::NodeInfo> UndrainNode(const std::string& node_id);
  absl::StatusOr<pb::RegisterNodeResponse> RegisterNode(const pb::RegisterNodeRequest& request);
  // Records the node's rank reports, renews its lease, and answers with the ranks it
  // should start and stop (level-triggered: what the node should run, minus what it
  // reports, so a lost answer is repaired by the next beat).
  absl::StatusOr<pb::HeartbeatResponse> Heartbeat(const pb::HeartbeatRequest& request);

  // Expires leases and places queued jobs. Called after every state change and by the
  // host's timer (at least every heartbeat interval).
  void Tick();

  // ---- rendezvous (scoped by job and generation) ----
  absl::Status RendezvousSet(const pb::RendezvousScope& scope, const std::string& key, const std::string& value);
  // Waits until every key exists: DEADLINE_EXCEEDED after timeout_ms (0 = 30 s, at most
  // kMaxRendezvousWaitMs), CANCELLED as soon as `abandoned` (checked every second) says
  // the caller has gone or the server is stopping, FAILED_PRECONDITION as soon as the
  // scope's generation is not the job's running one (its keys can no longer be set).
  static constexpr int64_t kMaxRendezvousWaitMs = 86'400'000;
  absl::StatusOr<std::vector<std::string>> RendezvousGet(const pb::RendezvousScope& scope,
                                                         const std::vector<std::string>& keys, int64_t timeout_ms,
                                                         const std::function<bool()>& abandoned = {});
  // Adds `delta` to the number under `key` (0 when unset); OUT_OF_RANGE past int64.
  absl::StatusOr<int64_t> RendezvousAdd(const pb::RendezvousScope& scope, const std::string& key, int64_t delta);

 private:
  struct NodeRuntime {
    pb::NodeInfo info;
    int64_t last_heartbeat_ms = 0;
    int64_t ready_since_ms = 0;  // when it last became ready (or the scheduler started)
    // Its daemon is shutting down (HeartbeatRequest.stopping): its ranks are saving their
    // last step. It takes no new ranks; its next registration clears this.
    bool stopping = false;
  };
  // Whether new ranks may be placed on the node.
  static bool TakesRanks(const NodeRuntime& node) {
    return node.info.state() == pb::NODE_STATE_READY && !node.stopping;
  }
  struct RankKey {
    std::string job_id;
    int64_t generation;
    int32_t rank;
    auto operator<=>(const RankKey&) const = default;
  };
  struct ExpectedRank {
    std::string node_id;
    int32_t local_rank;
    bool seen_running = false;
    // It exited with kPeerLostExitCode: it is not restarted, and the job's fate waits
    // for the cause (another rank's failure, or a lost node), for all ranks to stop, or
    // for the grace of ExpireLostPeersLocked.
    bool lost_peer = false;
    int64_t lost_peer_ms = 0;  // when that exit was reported
  };
  struct JobRuntime {
    int64_t next_event_seq = 1;
    int64_t next_log_seq = 1;
    int64_t first_log_seq = 1;  // the oldest line still stored
    std::map<int32_t, std::deque<std::string>> recent_stderr;  // per rank, for failures
    std::string requeue_cause;  // why a running job went back to the queue (kept in its reason)
    // Nodes where a GPU failed under the job and that max_fault_drained_percent left in
    // service: its placements take them last.
    std::set<std::string> undrained_fault_nodes;
    std::optional<bool> saves_checkpoints;  // from its spec, read once
  };

  Scheduler(const SchedulerOptions& options, Clock* clock);
  absl::Status Load();

  // All below run with mu_ held.
  pb::Job* FindJobLocked(const std::string& id_or_name);
  absl::Status PersistJobLocked(const pb::Job& job, const std::string& event_kind, const std::string& message);
  absl::Status PersistNodeLocked(const pb::NodeInfo& node);
  // Drains `node` for `reason` (NodeInfo.drain_reason): it takes no new ranks, now and
  // when it comes back after a lost lease or a restart. A GPU fault's reason replaces an
  // earlier one (a failed GPU says more than an operator's drain); an operator's replaces
  // only a GPU fault's (DrainNode keeps the fault's words after it).
  absl::Status DrainNodeLocked(NodeRuntime& node, const std::string& reason, bool gpu_fault);
  // Why a GPU fault on `node` leaves it in service (max_fault_drained_percent), or "" when
  // the fault drains it.
  std::string FaultDrainRefusalLocked(const NodeRuntime& node) const;
  FaultDrains GpuFaultDrainsLocked() const;
  // While group_ is set, the two above add to it instead of writing; this writes it
  // (synced) and clears group_.
  absl::Status CommitGroupLocked(rocksdb::WriteBatch& group);
  // Unsynced writes (progress, a queued job's reason, log lines) go into the batch this
  // returns: group_ when a request's group is open (so they neither land before it nor
  // get undone by it), else `own`, which FlushUnsyncedLocked then writes.
  rocksdb::WriteBatch& UnsyncedBatchLocked(rocksdb::WriteBatch& own) { return group_ != nullptr ? *group_ : own; }
  void FlushUnsyncedLocked(rocksdb::WriteBatch& own);
  void TickLocked();
  void ExpireLeasesLocked(int64_t now);
  void ForgetLostNodesLocked(int64_t now);
  // A rank lost its peers and, a lease and two heartbeats later, no cause has come (a
  // failing rank reports within a heartbeat, a lost node within the lease) while other
  // ranks still run: they wait for a peer that will never answer, such as one whose
  // address their host cannot reach, and would do so for the communicator's timeout
  // (minutes). The generation ends as if every rank had lost its peers.
  void ExpireLostPeersLocked(int64_t now);
  // options_.grow_after_ms: requeues the shrunk job (one per tick, the highest priority)
  // that nodes ready for that long can make larger.
  void GrowJobsLocked(int64_t now);
  // Every rank of the job's generation lost its peers (`cause` says how we know): the
  // job restarts from its latest checkpoint, or fails after options_.peer_lost_restarts
  // restarts in a row without getting past its furthest step, with `rank`'s last stderr
  // lines.
  void RestartLostPeersLocked(pb::Job& job, int32_t rank, const std::string& cause, int64_t now);
  // `updated` (`job` with its generation ended) goes back in the queue to restart from
  // its latest checkpoint: "<cause>; restarting from the latest checkpoint" is its
  // reason and event, kept in its reason while it waits.
  void RequeueLocked(pb::Job& job, pb::Job& updated, const std::string& cause);
  // `updated` (`job` with its generation ended) fails for `reason` with `exit_code`,
  // blaming `rank`, whose last stderr lines go into the record; persisted with an event.
  void FailJobLocked(pb::Job& job, pb::Job& updated, int32_t exit_code, int32_t rank, const std::string& reason,
                     int64_t now);
  void PlaceJobsLocked(int64_t now);
  // What a heartbeat runs: placement only when a job, node or allocation changed since
  // the last pass (a pass looks at every queued job and node; 1,000 nodes beating each
  // second must not each pay for one). Leases are checked by the timer's Tick.
  void PlaceJobsIfChangedLocked(int64_t now);
  // expected_ and its index by node change together through these two.
  void ExpectRankLocked(const RankKey& key, const ExpectedRank& rank);
  std::map<RankKey, ExpectedRank>::iterator ForgetRankLocked(std::map<RankKey, ExpectedRank>::iterator it);
  // Ends the job's current generation: forgets its expected ranks (the nodes are told
  // to stop them by the next heartbeat) and drops its rendezvous keys.
  void EndGenerationLocked(pb::Job& job);
  // EndGenerationLocked for a generation whose ranks are all alive (a cancel, a drain, a
  // restart to grow): where they can save the step they stop after (the job runs, saves
  // checkpoints, and no rank has lost its peers), the job records that they should
  // (Job.saving_generations, persisted with it; StopRank.save_step).
  void EndGenerationSavingLocked(pb::Job& job);
  // Ranks told to save the step they stop after (EndGenerationSavingLocked) may still run
  // on these nodes: the job's next generation, which resumes from that step, starts once
  // each node has beaten without them, has lost its lease or registered afresh, or after
  // previous_ranks_wait_ms from when it was noted. Not persisted: after a scheduler
  // restart the ranks' own wait for the checkpoint store remains.
  void AwaitSavingRanksLocked(const std::string& job_id, const std::string& node_id);
  void ForgetSavingRanksLocked(const std::string& job_id, const std::string& node_id);
  void ForgetSavingRanksOnNodeLocked(const std::string& node_id);
  // Whether the job's next generation must still wait (ranks above not all gone).
  bool PreviousRanksRunLocked(const std::string& job_id);
  // A running job's reason: its generation and nodes, and what its ranks wait for.
  std::string RunningReasonLocked(const pb::Job& job);
  bool SavesCheckpointsLocked(const pb::Job& job);
  // The jobs with a rank of their current generation on the node (expected_by_node_).
  std::set<std::string> JobsWithRanksOnLocked(const std::string& node_id) const;
  void RecordRankReportLocked(const std::string& node_id, const pb::RankReport& report,
                              std::set<RankKey>& running_on_node);
  void AppendLogsLocked(pb::Job& job, const pb::RankReport& report);
  int32_t DevicesInUseLocked(const std::string& node_id) const;
  std::string ScopeKey(const pb::RendezvousScope& scope) const;
  // FAILED_PRECONDITION unless scope's generation is its job's current one, running.
  absl::Status CheckScopeRunningLocked(const pb::RendezvousScope& scope) const;
  absl::Status RendezvousSetLocked(const pb::RendezvousScope& scope, const std::string& key,
                                   const std::string& value);

  SchedulerOptions options_;
  Clock* clock_;
  std::unique_ptr<rocksdb::DB> db_;

  std::mutex mu_;
  std::condition_variable changed_;  // an event, or a rendezvous key, was added
  std::map<std::string, pb::Job> jobs_;
  std::map<std::string, JobRuntime> job_runtime_;
  // AwaitSavingRanksLocked's notes, by job and by node (the same entries): job -> node ->
  // since when, and node -> jobs.
  std::map<std::string, std::map<std::string, int64_t>> saving_ranks_of_job_;
  std::map<std::string, std::set<std::string>> saving_ranks_on_node_;
  std::map<std::string, NodeRuntime> nodes_;
  std::map<RankKey, ExpectedRank> expected_;  // ranks that should run, by job/gen/rank
  std::map<std::string, std::set<RankKey>> expected_by_node_;  // the same ranks, by node
  bool placement_dirty_ = true;
  rocksdb::WriteBatch* group_ = nullptr;  // the batch of the request in progress, if any  // something placement depends on changed since its last pass
  std::map<std::string, std::map<std::string, std::string>> rendezvous_;  // scope -> key -> value
  int64_t next_job_number_ = 1;
};

// A job's spec, validated: the resources and name the scheduler needs. Errors are
// INVALID_ARGUMENT naming the field path.
absl::StatusOr<pb::Job> JobFromSpec(const std::string& spec_yaml, const std::string& spec_origin);

// True for succeeded, failed and cancelled jobs.
bool IsFinished(pb::JobState state);

// "queued", "running", ... for tables and JSON.
std::string JobStateName(pb::JobState state);
std::string NodeStateName(pb::NodeState state);

}  // namespace llamad::scheduler
