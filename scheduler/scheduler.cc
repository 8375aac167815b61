#include "scheduler/scheduler.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <set>
#include <string_view>
#include <filesystem>

#include "core/durations.h"
#include "core/exit_codes.h"
#include "core/strings.h"
#include "proto/rpc.h"
#include "train/jobspec.h"

namespace llamad::scheduler {
namespace {

// RocksDB keys. Numbers are zero-padded so that keys sort in numeric order.
std::string JobKey(const std::string& id) { return "job/" + id; }
std::string NodeKey(const std::string& id) { return "node/" + id; }
std::string EventKey(const std::string& job, int64_t seq) { return fmt::format("event/{}/{:016d}", job, seq); }
std::string LogKey(const std::string& job, int64_t seq) { return fmt::format("log/{}/{:016d}", job, seq); }
constexpr char kNextJobKey[] = "meta/next_job";
// How a GPU fault's words (and so its drain reason) begin: Load marks the nodes that
// earlier versions drained for one.
constexpr std::string_view kGpuFaultDrainPrefix = "the GPU of rank ";

// The sequence number that ends a stored event or log line's key.
absl::StatusOr<int64_t> SeqOfKey(std::string_view key) {
  const std::optional<int64_t> seq = ParseInt64(key.substr(key.rfind('/') + 1));
  if (!seq || *seq < 0 || *seq == std::numeric_limits<int64_t>::max()) {
    return absl::DataLossError(fmt::format("scheduler state: key {} is damaged (no sequence number)", key));
  }
  return *seq;
}

absl::Status FromRocks(const rocksdb::Status& s, std::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::InternalError(fmt::format("scheduler state: {}: {}", what, s.ToString()));
}

rocksdb::WriteOptions Synced() {
  rocksdb::WriteOptions o;
  o.sync = true;
  return o;
}

// A client's "after this seq": the next one must exist as an int64.
absl::Status CheckAfterSeq(int64_t after_seq) {
  if (after_seq < 0 || after_seq == std::numeric_limits<int64_t>::max()) {
    return absl::InvalidArgumentError(fmt::format("after_seq {} is not within [0, 2^63 - 2]", after_seq));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsFinished(pb::JobState state) {
  return state == pb::JOB_STATE_SUCCEEDED || state == pb::JOB_STATE_FAILED || state == pb::JOB_STATE_CANCELLED;
}

std::string JobStateName(pb::JobState state) {
  switch (state) {
    case pb::JOB_STATE_QUEUED: return "queued";
    case pb::JOB_STATE_RUNNING: return "running";
    case pb::JOB_STATE_SUCCEEDED: return "succeeded";
    case pb::JOB_STATE_FAILED: return "failed";
    case pb::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

std::string NodeStateName(pb::NodeState state) {
  switch (state) {
    case pb::NODE_STATE_READY: return "ready";
    case pb::NODE_STATE_DRAINING: return "draining";
    case pb::NODE_STATE_LOST: return "lost";
    default: return "unknown";
  }
}

absl::StatusOr<pb::Job> JobFromSpec(const std::string& spec_yaml, const std::string& spec_origin) {
  if (spec_yaml.empty()) return absl::InvalidArgumentError("spec_yaml: empty job spec");
  const std::string origin = spec_origin.empty() ? std::string("job.yaml") : spec_origin;
  auto spec = ParseJobSpec(spec_yaml, origin);
  if (!spec.ok()) return absl::InvalidArgumentError(spec.status().message());
  pb::Job job;
  job.set_name(spec->name);
  job.set_spec_yaml(spec_yaml);
  job.set_spec_origin(origin);
  pb::Resources* r = job.mutable_resources();
  r->set_nodes(int32_t(spec->resources.nodes));
  r->set_devices_per_node(int32_t(spec->resources.devices_per_node));
  r->set_min_nodes(int32_t(spec->resources.min_nodes > 0 ? spec->resources.min_nodes : spec->resources.nodes));
  r->set_max_nodes(int32_t(spec->resources.max_nodes > 0 ? spec->resources.max_nodes : spec->resources.nodes));
  r->set_priority(int32_t(spec->resources.priority));
  job.mutable_progress()->set_total_steps(spec->training.steps);
  job.set_failed_rank(-1);
  return job;
}

Scheduler::Scheduler(const SchedulerOptions& options, Clock* clock) : options_(options), clock_(clock) {}
Scheduler::~Scheduler() = default;

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Open(const SchedulerOptions& options, Clock* clock) {
  if (options.data_dir.empty()) return absl::InvalidArgumentError("scheduler: data_dir is empty");
  // Bounded, so that the sums of durations and clock times taken from them stay in int64.
  for (const auto& [name, value] : {std::pair{"heartbeat_interval_ms", options.heartbeat_interval_ms},
                                    std::pair{"lease_timeout_ms", options.lease_timeout_ms},
                                    std::pair{"forget_lost_nodes_after_ms", options.forget_lost_nodes_after_ms},
                                    std::pair{"grow_after_ms", options.grow_after_ms},
                                    std::pair{"previous_ranks_wait_ms", options.previous_ranks_wait_ms}}) {
    if (value < 0 || value > kMaxDurationMs) {
      return absl::InvalidArgumentError(
          fmt::format("scheduler: {} {} is not within [0, {}]", name, value, kMaxDurationMs));
    }
  }
  if (options.heartbeat_interval_ms <= 0 || options.lease_timeout_ms <= options.heartbeat_interval_ms) {
    return absl::InvalidArgumentError(fmt::format(
        "scheduler: lease_timeout_ms ({}) must exceed heartbeat_interval_ms ({}) > 0",
        options.lease_timeout_ms, options.heartbeat_interval_ms));
  }
  if (options.max_fault_drained_percent < 0 || options.max_fault_drained_percent > 100) {
    return absl::InvalidArgumentError(fmt::format("scheduler: max_fault_drained_percent {} is not between 0 and 100",
                                                  options.max_fault_drained_percent));
  }
  std::error_code ec;
  std::filesystem::create_directories(options.data_dir, ec);
  if (ec) return absl::InvalidArgumentError(fmt::format("{}: cannot create: {}", options.data_dir, ec.message()));
  std::unique_ptr<Scheduler> s(new Scheduler(options, clock));
  rocksdb::Options db_options;
  db_options.create_if_missing = true;
  rocksdb::DB* db = nullptr;
  const std::string path = (std::filesystem::path(options.data_dir) / "state").string();
  if (auto st = FromRocks(rocksdb::DB::Open(db_options, path, &db), "open " + path); !st.ok()) return st;
  s->db_.reset(db);
  if (auto st = s->Load(); !st.ok()) return st;
  return s;
}

absl::Status Scheduler::Load() {
  std::lock_guard lock(mu_);
  const int64_t now = clock_->NowMs();
  std::string value;
  if (db_->Get(rocksdb::ReadOptions(), kNextJobKey, &value).ok()) {
    const std::optional<int64_t> next = ParseInt64(value);
    if (!next || *next < 1) {
      return absl::DataLossError(fmt::format("scheduler state: record {} is damaged (not a job number)", kNextJobKey));
    }
    next_job_number_ = *next;
  }
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek("job/"); it->Valid() && it->key().starts_with("job/"); it->Next()) {
    pb::Job job;
    if (!job.ParseFromArray(it->value().data(), int(it->value().size()))) {
      return absl::DataLossError(fmt::format("scheduler state: record {} is damaged", it->key().ToString()));
    }
    // Stored before restarts were counted in the job: from its latest step on.
    if (!job.has_restarts_in_a_row()) job.mutable_restarts_in_a_row()->set_furthest_step(job.progress().step());
    jobs_[job.id()] = job;
  }
  for (it->Seek("node/"); it->Valid() && it->key().starts_with("node/"); it->Next()) {
    pb::NodeInfo node;
    if (!node.ParseFromArray(it->value().data(), int(it->value().size()))) {
      return absl::DataLossError(fmt::format("scheduler state: record {} is damaged", it->key().ToString()));
    }
    // Drained before drains had reasons: still drained.
    if (node.state() == pb::NODE_STATE_DRAINING && node.drain_reason().empty()) {
      node.set_drain_reason("drained with llamactl drain");
    }
    // Drained for a GPU fault before such drains were marked: they count.
    if (node.drain_reason().starts_with(kGpuFaultDrainPrefix)) node.set_drained_for_gpu_fault(true);
    NodeRuntime& n = nodes_[node.id()];
    n.info = node;
    // A fresh lease: daemons have lease_timeout_ms to come back. A lost node keeps the
    // time it was last heard of (ForgetLostNodesLocked counts from it).
    n.last_heartbeat_ms =
        node.state() == pb::NODE_STATE_LOST && node.last_heartbeat_unix_ms() > 0 ? node.last_heartbeat_unix_ms() : now;
    n.ready_since_ms = now;     // unknown while the scheduler was down: from now
  }
  // Sequence numbers continue after the last stored event and log line of each job.
  for (const auto& [id, job] : jobs_) {
    JobRuntime& rt = job_runtime_[id];
    for (auto [prefix, next] : {std::pair{"event/" + id + "/", &rt.next_event_seq},
                                std::pair{"log/" + id + "/", &rt.next_log_seq}}) {
      it->SeekForPrev(prefix + "~");
      if (!it->Valid() || !it->key().starts_with(prefix)) continue;
      const absl::StatusOr<int64_t> last = SeqOfKey(it->key().ToStringView());
      if (!last.ok()) return last.status();
      *next = *last + 1;
    }
    it->Seek("log/" + id + "/");
    if (it->Valid() && it->key().starts_with("log/" + id + "/")) {
      const absl::StatusOr<int64_t> first = SeqOfKey(it->key().ToStringView());
      if (!first.ok()) return first.status();
      rt.first_log_seq = *first;
    }
  }
  // The ranks running jobs should have, from their placements.
  for (auto& [id, job] : jobs_) {
    if (job.state() != pb::JOB_STATE_RUNNING) continue;
    std::set<int32_t> finished(job.finished_ranks().begin(), job.finished_ranks().end());
    for (const pb::Placement& p : job.placement()) {
      for (int32_t local = 0; local < p.devices(); ++local) {
        const int32_t rank = p.first_rank() + local;
        if (!finished.contains(rank)) ExpectRankLocked({id, job.generation(), rank}, {p.node_id(), local, true});
      }
    }
  }
  for (it->Seek("rdv/"); it->Valid() && it->key().starts_with("rdv/"); it->Next()) {
    const std::string key = it->key().ToString();
    const size_t split = key.find('\x1f');
    if (split == std::string::npos) continue;
    rendezvous_[key.substr(4, split - 4)][key.substr(split + 1)] = it->value().ToString();
  }
  return it->status().ok() ? absl::OkStatus() : FromRocks(it->status(), "load");
}

pb::Job* Scheduler::FindJobLocked(const std::string& id_or_name) {
  if (auto it = jobs_.find(id_or_name); it != jobs_.end()) return &it->second;
  pb::Job* newest = nullptr;
  for (auto& [id, job] : jobs_) {
    if (job.name() == id_or_name) newest = &job;  // ids sort in submission order
  }
  return newest;
}

absl::Status Scheduler::PersistJobLocked(const pb::Job& job, const std::string& event_kind,
                                         const std::string& message) {
  placement_dirty_ = true;
  rocksdb::WriteBatch own;
  rocksdb::WriteBatch& batch = group_ != nullptr ? *group_ : own;
  batch.Put(JobKey(job.id()), job.SerializeAsString());
  if (!event_kind.empty()) {
    JobRuntime& rt = job_runtime_[job.id()];
    pb::JobEvent event;
    event.set_job_id(job.id());
    event.set_seq(rt.next_event_seq);
    event.set_unix_ms(clock_->NowMs());
    event.set_kind(event_kind);
    event.set_message(message);
    *event.mutable_job() = job;
    event.mutable_job()->clear_spec_yaml();  // the spec is in the job record
    batch.Put(EventKey(job.id(), rt.next_event_seq), event.SerializeAsString());
    if (group_ != nullptr) {
      // Readers of events hold mu_, which the group's owner keeps until its commit.
      ++rt.next_event_seq;
      return absl::OkStatus();
    }
    auto s = FromRocks(db_->Write(Synced(), &batch), "write job " + job.id());
    if (!s.ok()) return s;
    ++rt.next_event_seq;
    changed_.notify_all();
    return absl::OkStatus();
  }
  if (group_ != nullptr) return absl::OkStatus();
  return FromRocks(db_->Write(Synced(), &batch), "write job " + job.id());
}

absl::Status Scheduler::PersistNodeLocked(const pb::NodeInfo& node) {
  placement_dirty_ = true;
  if (group_ != nullptr) {
    group_->Put(NodeKey(node.id()), node.SerializeAsString());
    return absl::OkStatus();
  }
  return FromRocks(db_->Put(Synced(), NodeKey(node.id()), node.SerializeAsString()), "write node " + node.id());
}

absl::Status Scheduler::CommitGroupLocked(rocksdb::WriteBatch& group) {
  group_ = nullptr;
  if (group.Count() == 0) return absl::OkStatus();
  auto s = FromRocks(db_->Write(Synced(), &group), "write the state changes of a heartbeat");
  if (!s.ok()) {
    // Memory already holds these changes (and event numbers) that the disk refused.
    // Going on would serve state that a restart forgets; restarting reloads the last
    // durable state, and the nodes, level-triggered, report their ranks again.
    std::fprintf(stderr, "llamad scheduler: %s; stopping so that a restart reloads the durable state\n",
                 std::string(s.message()).c_str());
    std::abort();
  }
  changed_.notify_all();
  return s;
}

void Scheduler::FlushUnsyncedLocked(rocksdb::WriteBatch& own) {
  if (own.Count() > 0) db_->Write(rocksdb::WriteOptions(), &own);  // WAL, not fsync: see the header
}

// ---- jobs -----------------------------------------------------------------------------

absl::StatusOr<pb::Job> Scheduler::SubmitJob(const pb::SubmitJobRequest& request) {
  auto job = JobFromSpec(request.spec_yaml(), request.spec_origin());
  if (!job.ok()) return job.status();
  std::lock_guard lock(mu_);
  const int64_t number = next_job_number_;
  job->set_id(fmt::format("j-{:06d}", number));
  job->set_owner(request.owner());
  job->set_state(pb::JOB_STATE_QUEUED);
  job->set_reason("waiting for the scheduler to place it");
  job->set_submitted_unix_ms(clock_->NowMs());
  // The counter and the job in one synced batch: an id is never handed out twice.
  rocksdb::WriteBatch batch;
  batch.Put(kNextJobKey, std::to_string(number + 1));
  if (auto s = FromRocks(db_->Write(Synced(), &batch), "job counter"); !s.ok()) return s;
  next_job_number_ = number + 1;
  jobs_[job->id()] = *job;
  job_runtime_[job->id()];
  const auto& r = job->resources();
  if (auto s = PersistJobLocked(*job, "submitted",
                                fmt::format("{} node(s) x {} device(s), priority {}", r.nodes(),
                                            r.devices_per_node(), r.priority()));
      !s.ok()) {
    jobs_.erase(job->id());
    return s;
  }
  TickLocked();
  return jobs_[job->id()];
}

absl::StatusOr<pb::Job> Scheduler::GetJob(const std::string& id_or_name) {
  std::lock_guard lock(mu_);
  pb::Job* job = FindJobLocked(id_or_name);
  if (job == nullptr) return absl::NotFoundError(fmt::format("no job '{}'", id_or_name));
  return *job;
}

std::vector<pb::Job> Scheduler::ListJobs(bool include_finished, int limit) {
  std::lock_guard lock(mu_);
  std::vector<pb::Job> out;
  if (limit <= 0) limit = 100;
  for (auto it = jobs_.rbegin(); it != jobs_.rend() && int(out.size()) < limit; ++it) {
    if (!include_finished && IsFinished(it->second.state())) continue;
    out.push_back(it->second);
    out.back().clear_spec_yaml();
  }
  return out;
}

void Scheduler::EndGenerationLocked(pb::Job& job) {
  for (auto it = expected_.begin(); it != expected_.end();) {
    if (it->first.job_id == job.id()) {
      it = ForgetRankLocked(it);
    } else {
      ++it;
    }
  }
  pb::RendezvousScope scope;
  scope.set_job_id(job.id());
  scope.set_generation(job.generation());
  const std::string scope_key = ScopeKey(scope);
  if (auto it = rendezvous_.find(scope_key); it != rendezvous_.end()) {
    rocksdb::WriteBatch batch;
    for (const auto& [key, value] : it->second) batch.Delete("rdv/" + scope_key + '\x1f' + key);
    db_->Write(rocksdb::WriteOptions(), &batch);  // best effort: stale keys are never read again
    rendezvous_.erase(it);
  }
  job.clear_placement();
  job.clear_finished_ranks();
}

void Scheduler::AwaitSavingRanksLocked(const std::string& job_id, const std::string& node_id) {
  saving_ranks_of_job_[job_id].try_emplace(node_id, clock_->NowMs());  // an earlier note keeps its time
  saving_ranks_on_node_[node_id].insert(job_id);
}

void Scheduler::ForgetSavingRanksLocked(const std::string& job_id, const std::string& node_id) {
  if (auto node = saving_ranks_on_node_.find(node_id); node != saving_ranks_on_node_.end()) {
    node->second.erase(job_id);
    if (node->second.empty()) saving_ranks_on_node_.erase(node);
  }
  auto waiting = saving_ranks_of_job_.find(job_id);
  if (waiting == saving_ranks_of_job_.end()) return;
  waiting->second.erase(node_id);
  if (!waiting->second.empty()) return;
  saving_ranks_of_job_.erase(waiting);
  // A running job's reason said that it waited: it no longer does.
  auto job = jobs_.find(job_id);
  if (job == jobs_.end() || job->second.state() != pb::JOB_STATE_RUNNING) return;
  std::string reason = RunningReasonLocked(job->second);
  if (job->second.reason() == reason) return;
  job->second.set_reason(std::move(reason));
  rocksdb::WriteBatch own;
  UnsyncedBatchLocked(own).Put(JobKey(job_id), job->second.SerializeAsString());
  FlushUnsyncedLocked(own);
}

void Scheduler::ForgetSavingRanksOnNodeLocked(const std::string& node_id) {
  auto node = saving_ranks_on_node_.find(node_id);
  if (node == saving_ranks_on_node_.end()) return;
  for (const std::string& job_id : std::set<std::string>(node->second)) ForgetSavingRanksLocked(job_id, node_id);
}

std::string Scheduler::RunningReasonLocked(const pb::Job& job) {
  std::vector<std::string> nodes;
  for (const pb::Placement& p : job.placement()) nodes.push_back(p.node_id());
  std::string reason = fmt::format("generation {} on {}", job.generation(), fmt::join(nodes, ", "));
  if (auto waiting = saving_ranks_of_job_.find(job.id()); waiting != saving_ranks_of_job_.end()) {
    std::vector<std::string> saving;
    for (const auto& [node_id, since] : waiting->second) saving.push_back(node_id);
    reason += fmt::format("; its ranks start once the previous generation's on {} have saved their step and stopped",
                          fmt::join(saving, ", "));
  }
  return reason;
}

bool Scheduler::PreviousRanksRunLocked(const std::string& job_id) {
  auto job = saving_ranks_of_job_.find(job_id);
  if (job == saving_ranks_of_job_.end()) return false;
  const int64_t now = clock_->NowMs();
  std::vector<std::string> overdue;  // waited long enough (a rank stuck in the kernel?)
  for (const auto& [node_id, since] : job->second) {
    if (now - since >= options_.previous_ranks_wait_ms) overdue.push_back(node_id);
  }
  for (const std::string& node_id : overdue) ForgetSavingRanksLocked(job_id, node_id);
  return saving_ranks_of_job_.contains(job_id);
}

void Scheduler::EndGenerationSavingLocked(pb::Job& job) {
  bool can_save = job.state() == pb::JOB_STATE_RUNNING && SavesCheckpointsLocked(job);
  std::set<std::string> nodes;  // of its ranks
  for (auto it = expected_.lower_bound({job.id(), job.generation(), std::numeric_limits<int32_t>::min()});
       can_save && it != expected_.end() && it->first.job_id == job.id() && it->first.generation == job.generation();
       ++it) {
    can_save = !it->second.lost_peer;  // its peers' step may never finish
    nodes.insert(it->second.node_id);
  }
  if (can_save) {
    job.add_saving_generations(job.generation());
    if (job.saving_generations_size() > 4) job.mutable_saving_generations()->erase(job.saving_generations().begin());
    for (const std::string& node_id : nodes) AwaitSavingRanksLocked(job.id(), node_id);
  }
  EndGenerationLocked(job);
}

std::set<std::string> Scheduler::JobsWithRanksOnLocked(const std::string& node_id) const {
  std::set<std::string> jobs;
  if (auto ranks = expected_by_node_.find(node_id); ranks != expected_by_node_.end()) {
    for (const RankKey& key : ranks->second) jobs.insert(key.job_id);
  }
  return jobs;
}

bool Scheduler::SavesCheckpointsLocked(const pb::Job& job) {
  JobRuntime& rt = job_runtime_[job.id()];
  if (!rt.saves_checkpoints) {
    auto spec = ParseJobSpec(job.spec_yaml(), job.spec_origin());
    rt.saves_checkpoints = spec.ok() && !spec->checkpoint.dir.empty() && spec->checkpoint.interval > 0;
  }
  return *rt.saves_checkpoints;
}

absl::StatusOr<pb::Job> Scheduler::CancelJob(const std::string& id_or_name) {
  std::lock_guard lock(mu_);
  pb::Job* job = FindJobLocked(id_or_name);
  if (job == nullptr) return absl::NotFoundError(fmt::format("no job '{}'", id_or_name));
  if (IsFinished(job->state())) {
    return absl::FailedPreconditionError(
        fmt::format("job {} already ended ({})", job->id(), JobStateName(job->state())));
  }
  pb::Job updated = *job;
  EndGenerationSavingLocked(updated);
  updated.set_state(pb::JOB_STATE_CANCELLED);
  updated.set_reason("cancelled by a user");
  updated.set_finished_unix_ms(clock_->NowMs());
  if (auto s = PersistJobLocked(updated, "cancelled", "cancelled by a user"); !s.ok()) return s;
  *job = updated;
  TickLocked();
  return *job;
}

absl::StatusOr<pb::Job> Scheduler::ResumeJob(const std::string& id_or_name) {
  std::lock_guard lock(mu_);
  pb::Job* job = FindJobLocked(id_or_name);
  if (job == nullptr) return absl::NotFoundError(fmt::format("no job '{}'", id_or_name));
  if (job->state() != pb::JOB_STATE_FAILED && job->state() != pb::JOB_STATE_CANCELLED) {
    return absl::FailedPreconditionError(fmt::format(
        "job {} is {}: only failed or cancelled jobs resume", job->id(), JobStateName(job->state())));
  }
  pb::Job updated = *job;
  updated.set_state(pb::JOB_STATE_QUEUED);
  updated.set_reason("resumed; waiting for nodes");
  updated.set_finished_unix_ms(0);
  updated.set_exit_code(0);
  updated.set_failed_rank(-1);
  updated.clear_last_log_lines();
  // A person looked at it: earlier restarts in a row no longer count against it.
  updated.mutable_restarts_in_a_row()->set_lost_peers(0);
  updated.mutable_restarts_in_a_row()->set_gpu_faults(0);
  if (auto s = PersistJobLocked(updated, "resumed", "back in the queue; ranks restore the latest checkpoint");
      !s.ok()) {
    return s;
  }
  *job = updated;
  TickLocked();
  return *job;
}

absl::StatusOr<Scheduler::JobUpdates> Scheduler::WaitJobUpdates(const std::string& job_id, int64_t after_seq,
                                                                 int64_t progress_after_ms, int64_t wait_ms) {
  if (auto s = CheckAfterSeq(after_seq); !s.ok()) return s;
  std::unique_lock lock(mu_);
  pb::Job* job = FindJobLocked(job_id);
  if (job == nullptr) return absl::NotFoundError(fmt::format("no job '{}'", job_id));
  const std::string id = job->id();
  auto progressed = [&] { return jobs_[id].progress().unix_ms() > progress_after_ms; };
  changed_.wait_for(lock, std::chrono::milliseconds(wait_ms),
                    [&] { return job_runtime_[id].next_event_seq > after_seq + 1 || progressed(); });
  JobUpdates updates;
  if (progressed()) {
    updates.progressed = jobs_[id];
    updates.progressed->clear_spec_yaml();
  }
  std::vector<pb::JobEvent>& events = updates.events;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix = "event/" + id + "/";
  for (it->Seek(EventKey(id, after_seq + 1)); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    pb::JobEvent& e = events.emplace_back();
    if (!e.ParseFromArray(it->value().data(), int(it->value().size()))) {
      return absl::DataLossError(fmt::format("scheduler state: event {} is damaged", it->key().ToString()));
    }
  }
  return updates;
}

absl::StatusOr<std::vector<pb::LogLine>> Scheduler::GetLogs(const std::string& id_or_name, int64_t after_seq,
                                                            int tail) {
  if (auto s = CheckAfterSeq(after_seq); !s.ok()) return s;
  std::lock_guard lock(mu_);
  pb::Job* job = FindJobLocked(id_or_name);
  if (job == nullptr) return absl::NotFoundError(fmt::format("no job '{}'", id_or_name));
  const JobRuntime& rt = job_runtime_[job->id()];
  int64_t from = after_seq + 1;
  if (after_seq == 0) from = std::max<int64_t>(rt.first_log_seq, rt.next_log_seq - (tail > 0 ? tail : 100));
  std::vector<pb::LogLine> lines;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix = "log/" + job->id() + "/";
  for (it->Seek(LogKey(job->id(), from)); it->Valid() && it->key().starts_with(prefix) && lines.size() < 10000;
       it->Next()) {
    lines.emplace_back().ParseFromArray(it->value().data(), int(it->value().size()));
  }
  return lines;
}

// ---- nodes ----------------------------------------------------------------------------

std::vector<pb::NodeInfo> Scheduler::ListNodes() {
  std::lock_guard lock(mu_);
  std::vector<pb::NodeInfo> out;
  for (auto& [id, n] : nodes_) {
    out.push_back(n.info);
    out.back().set_devices_in_use(DevicesInUseLocked(id));
    out.back().set_last_heartbeat_unix_ms(n.last_heartbeat_ms);
  }
  return out;
}

absl::StatusOr<pb::NodeInfo> Scheduler::DrainNode(const std::string& node_id, bool move_jobs,
                                                  const std::string& reason) {
  std::lock_guard lock(mu_);
  auto it = nodes_.find(node_id);
  if (it == nodes_.end()) return absl::NotFoundError(fmt::format("no node '{}'", node_id));
  if (reason.size() > kMaxDrainReason) {
    return absl::InvalidArgumentError(
        fmt::format("reason: {} characters, more than the {} a node keeps", reason.size(), kMaxDrainReason));
  }
  std::string why = reason.empty() ? "drained with llamactl drain" : "drained with llamactl drain: " + reason;
  // An operator's drain of a node a GPU fault drained takes it over: the node stays out,
  // and no longer counts against max_fault_drained_percent.
  const pb::NodeInfo& before = it->second.info;
  if (before.drained_for_gpu_fault()) why += "; before that: " + before.drain_reason();
  if (auto s = DrainNodeLocked(it->second, why, /*gpu_fault=*/false); !s.ok()) return s;
  pb::NodeInfo info = it->second.info;
  if (move_jobs) {
    for (const std::string& job_id : JobsWithRanksOnLocked(node_id)) {
      pb::Job& job = jobs_[job_id];
      // Some of its ranks finished: it is ending by itself, and a restart would redo it.
      if (job.finished_ranks_size() > 0) continue;
      pb::Job updated = job;
      EndGenerationSavingLocked(updated);
      RequeueLocked(job, updated, fmt::format("node {} drained", node_id));
    }
    TickLocked();  // placed on the other nodes now, not at the next tick
  }
  info.set_devices_in_use(DevicesInUseLocked(node_id));
  return info;
}

absl::Status Scheduler::DrainNodeLocked(NodeRuntime& node, const std::string& reason, bool gpu_fault) {
  if (!node.info.drain_reason().empty() && !gpu_fault && !node.info.drained_for_gpu_fault()) return absl::OkStatus();
  pb::NodeInfo info = node.info;
  info.set_drain_reason(reason);
  info.set_drained_for_gpu_fault(gpu_fault);
  // A lost node stays lost until it heartbeats, and then comes back draining.
  if (info.state() == pb::NODE_STATE_READY) info.set_state(pb::NODE_STATE_DRAINING);
  if (auto s = PersistNodeLocked(info); !s.ok()) return s;
  node.info = info;
  return absl::OkStatus();
}

Scheduler::FaultDrains Scheduler::GpuFaultDrains() {
  std::lock_guard lock(mu_);
  return GpuFaultDrainsLocked();
}

Scheduler::FaultDrains Scheduler::GpuFaultDrainsLocked() const {
  FaultDrains f;
  f.known = static_cast<int64_t>(nodes_.size());
  const int percent = options_.max_fault_drained_percent;
  f.limit = percent <= 0 ? 0 : std::max<int64_t>(1, f.known * percent / 100);
  f.drained = std::count_if(nodes_.begin(), nodes_.end(),
                            [](const auto& n) { return n.second.info.drained_for_gpu_fault(); });
  return f;
}

std::string Scheduler::FaultDrainRefusalLocked(const NodeRuntime& node) const {
  const FaultDrains f = GpuFaultDrainsLocked();
  if (f.limit == 0) return "GPU faults drain no node here (max_fault_drained_percent 0)";
  if (!node.info.drain_reason().empty()) return "";  // out of service already: nothing more is lost
  if (f.drained < f.limit) return "";
  return fmt::format("{} of the {} known nodes are drained for GPU faults already, and GPU faults drain at most {} "
                     "(max_fault_drained_percent {}, at least one); many faults at once may share one cause, so "
                     "look into them, then undrain what is sound or drain what is not with llamactl drain",
                     f.drained, f.known, f.limit, options_.max_fault_drained_percent);
}

absl::StatusOr<pb::NodeInfo> Scheduler::UndrainNode(const std::string& node_id) {
  std::lock_guard lock(mu_);
  auto it = nodes_.find(node_id);
  if (it == nodes_.end()) return absl::NotFoundError(fmt::format("no node '{}'", node_id));
  NodeRuntime& node = it->second;
  pb::NodeInfo info = node.info;
  if (!info.drain_reason().empty()) {
    info.clear_drain_reason();
    info.clear_drained_for_gpu_fault();
    if (info.state() == pb::NODE_STATE_DRAINING) info.set_state(pb::NODE_STATE_READY);
    if (auto s = PersistNodeLocked(info); !s.ok()) return s;
    if (info.state() == pb::NODE_STATE_READY) node.ready_since_ms = clock_->NowMs();
    node.info = info;
    // Queued jobs may fit now. The tick may forget the node (lost long enough, and no
    // longer drained): `node` is not used after it.
    TickLocked();
  }
  info.set_devices_in_use(DevicesInUseLocked(node_id));
  return info;
}

absl::StatusOr<pb::RegisterNodeResponse> Scheduler::RegisterNode(const pb::RegisterNodeRequest& request) {
  if (auto s = rpc::CheckNodeId(request.node_id()); !s.ok()) return s;
  if (auto s = rpc::CheckNodeDescription(request.hostname(), request.device_kind()); !s.ok()) return s;
  if (request.devices() < 1 || request.devices() > kMaxDevicesPerNode) {
    return absl::InvalidArgumentError(
        fmt::format("devices: {} is not within [1, {}]", request.devices(), kMaxDevicesPerNode));
  }
  std::lock_guard lock(mu_);
  const int64_t now = clock_->NowMs();
  NodeRuntime& n = nodes_[request.node_id()];
  pb::NodeInfo info = n.info;
  const bool known = !info.id().empty();
  info.set_id(request.node_id());
  info.set_hostname(request.hostname());
  info.set_devices(request.devices());
  info.set_device_kind(request.device_kind());
  // A node comes back ready, unless it was drained: that lasts until it is undrained.
  info.set_state(info.drain_reason().empty() ? pb::NODE_STATE_READY : pb::NODE_STATE_DRAINING);
  if (!known) info.set_registered_unix_ms(now);
  if (auto s = PersistNodeLocked(info); !s.ok()) {
    if (!known) nodes_.erase(request.node_id());
    return s;
  }
  if (info.state() == pb::NODE_STATE_READY && (!known || n.info.state() != pb::NODE_STATE_READY)) {
    n.ready_since_ms = now;
  }
  n.info = info;
  n.last_heartbeat_ms = now;
  n.stopping = false;  // a daemon that registers has started afresh, without ranks
  ForgetSavingRanksOnNodeLocked(request.node_id());
  pb::RegisterNodeResponse response;
  response.set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
  response.set_lease_timeout_ms(options_.lease_timeout_ms);
  TickLocked();
  return response;
}

int32_t Scheduler::DevicesInUseLocked(const std::string& node_id) const {
  auto it = expected_by_node_.find(node_id);
  return it == expected_by_node_.end() ? 0 : int32_t(it->second.size());
}

void Scheduler::ExpectRankLocked(const RankKey& key, const ExpectedRank& rank) {
  if (auto old = expected_.find(key); old != expected_.end() && old->second.node_id != rank.node_id) {
    expected_by_node_[old->second.node_id].erase(key);
  }
  expected_.insert_or_assign(key, rank);
  expected_by_node_[rank.node_id].insert(key);
  placement_dirty_ = true;
}

std::map<Scheduler::RankKey, Scheduler::ExpectedRank>::iterator Scheduler::ForgetRankLocked(
    std::map<RankKey, ExpectedRank>::iterator it) {
  auto by_node = expected_by_node_.find(it->second.node_id);
  if (by_node != expected_by_node_.end()) {
    by_node->second.erase(it->first);
    if (by_node->second.empty()) expected_by_node_.erase(by_node);
  }
  placement_dirty_ = true;
  return expected_.erase(it);
}

void Scheduler::AppendLogsLocked(pb::Job& job, const pb::RankReport& report) {
  JobRuntime& rt = job_runtime_[job.id()];
  rocksdb::WriteBatch own;
  rocksdb::WriteBatch& batch = UnsyncedBatchLocked(own);
  auto append = [&](const std::string& text) {
    pb::LogLine line;
    line.set_seq(rt.next_log_seq);
    line.set_rank(report.rank());
    line.set_generation(report.generation());
    line.set_text(text);
    batch.Put(LogKey(job.id(), rt.next_log_seq), line.SerializeAsString());
    ++rt.next_log_seq;
    auto& recent = rt.recent_stderr[report.rank()];
    recent.push_back(text);
    if (int(recent.size()) > options_.failure_log_lines) recent.pop_front();
  };
  if (report.dropped_log_lines() > 0) {
    append(fmt::format("[llamad: {} lines of rank {} not forwarded; the node keeps them on disk]",
                       report.dropped_log_lines(), report.rank()));
  }
  for (const std::string& text : report.log_lines()) append(text);
  if (rt.next_log_seq - rt.first_log_seq > options_.log_lines_kept) {
    const int64_t new_first = rt.next_log_seq - options_.log_lines_kept;
    batch.DeleteRange(LogKey(job.id(), rt.first_log_seq), LogKey(job.id(), new_first));
    rt.first_log_seq = new_first;
  }
  FlushUnsyncedLocked(own);
}

void Scheduler::RecordRankReportLocked(const std::string& node_id, const pb::RankReport& report,
                                       std::set<RankKey>& running_on_node) {
  const RankKey key{report.job_id(), report.generation(), report.rank()};
  if (report.state() == pb::RANK_STATE_RUNNING) running_on_node.insert(key);
  // A rank whose GPU failed drains its node whatever became of its job meanwhile (a
  // peer's failure may have ended the generation, or a stop the rank was saving for).
  // Not when its node was shutting down: a GPU reset on the way down is no fault.
  const bool gpu_failed = report.state() == pb::RANK_STATE_EXITED && report.exit_code() == kExitDeviceFault &&
                          !report.preempted();
  const std::string gpu_failure =
      gpu_failed ? fmt::format("{}{} (device {}) failed", kGpuFaultDrainPrefix, report.rank(),
                               report.device().empty() ? std::to_string(report.local_rank()) : report.device())
                 : "";
  std::string node_fate;  // what became of the node, for the job's event
  if (gpu_failed) {
    node_fate = "which is drained";
    if (auto node = nodes_.find(node_id); node != nodes_.end()) {
      if (std::string refusal = FaultDrainRefusalLocked(node->second); !refusal.empty()) {
        node_fate = "which is not drained: " + refusal;
        job_runtime_[report.job_id()].undrained_fault_nodes.insert(node_id);
        std::fprintf(stderr, "llamad scheduler: %s under job %s on node %s, %s\n", gpu_failure.c_str(),
                     report.job_id().c_str(), node_id.c_str(), node_fate.c_str());
      } else {
        DrainNodeLocked(node->second,
                        fmt::format("{} under job {}; see that job's log, then llamactl undrain {}", gpu_failure,
                                    report.job_id(), node_id),
                        /*gpu_fault=*/true)
            .IgnoreError();  // the job's requeue below is what must not be lost
      }
    }
  }
  auto job_it = jobs_.find(report.job_id());
  if (job_it == jobs_.end()) return;
  pb::Job& job = job_it->second;
  if (report.generation() != job.generation()) return;  // a rank of an ended generation
  if (!report.log_lines().empty() || report.dropped_log_lines() > 0) AppendLogsLocked(job, report);
  auto expected = expected_.find(key);
  if (expected == expected_.end() || job.state() != pb::JOB_STATE_RUNNING) return;
  if (expected->second.node_id != node_id) return;
  if (report.state() == pb::RANK_STATE_RUNNING) expected->second.seen_running = true;

  // Rank 0's step lines are the job's progress.
  if (report.rank() == 0 && !report.metric_lines().empty()) {
    auto line = nlohmann::json::parse(report.metric_lines().rbegin()->c_str(), nullptr, false);
    // A worker's line is input: a field of another type (a diverged loss prints as
    // null) reads as 0 rather than throwing.
    auto number = [&](const char* key) {
      auto it = line.find(key);
      return it != line.end() && it->is_number() ? it->get<double>() : 0.0;
    };
    const int64_t step = line.is_object() && line.contains("step") && line["step"].is_number_integer()
                             ? line["step"].get<int64_t>()
                             : -1;
    if (step >= 0 && step != job.progress().step()) {
      pb::Progress* p = job.mutable_progress();
      p->set_step(step);
      p->set_loss(number("loss"));
      p->set_lr(number("lr"));
      p->set_tokens_per_s(number("tokens_per_s"));
      p->set_mfu(number("mfu"));
      // Strictly increasing, so a watcher that saw one update never misses the next.
      p->set_unix_ms(std::max(clock_->NowMs(), p->unix_ms() + 1));
      // Past the furthest step so far it trains: earlier restarts were not a loop. Steps
      // done again after a restart do not count, or a hang at a fixed step (which every
      // rank may report as a lost peer) would restart the job forever.
      if (p->step() > job.restarts_in_a_row().furthest_step()) {
        pb::Job::RestartsInARow* restarts = job.mutable_restarts_in_a_row();
        restarts->set_furthest_step(p->step());
        restarts->set_lost_peers(0);
        restarts->set_gpu_faults(0);
      }
      rocksdb::WriteBatch own;
      UnsyncedBatchLocked(own).Put(JobKey(job.id()), job.SerializeAsString());
      FlushUnsyncedLocked(own);
      changed_.notify_all();
    }
  }
  if (report.state() != pb::RANK_STATE_EXITED) return;

  pb::Job updated = job;
  const int64_t now = clock_->NowMs();
  if (report.exit_code() == kExitPeerLost && !report.preempted()) {
    // Not this rank's fault: wait for the cause. Another rank's failure fails the job
    // with its own reason; a lost node's lease expiry restarts it. Only when every rank
    // left of the generation lost its peers is there nobody else to hear from.
    expected->second.lost_peer = true;
    expected->second.lost_peer_ms = now;
    for (auto it = expected_.lower_bound({job.id(), job.generation(), std::numeric_limits<int32_t>::min()});
         it != expected_.end() && it->first.job_id == job.id() && it->first.generation == job.generation(); ++it) {
      if (!it->second.lost_peer) return;
    }
    RestartLostPeersLocked(job, report.rank(),
                           fmt::format("every rank lost its peers (rank {} on node {} last)", report.rank(), node_id),
                           now);
    return;
  }
  if (report.exit_code() == 0) {
    ForgetRankLocked(expected);
    updated.add_finished_ranks(report.rank());
    const int32_t world = [&] {
      int32_t w = 0;
      for (const auto& p : updated.placement()) w += p.devices();
      return w;
    }();
    if (updated.finished_ranks_size() < world) {
      if (PersistJobLocked(updated, "", "").ok()) job = updated;
      return;
    }
    EndGenerationLocked(updated);
    updated.set_state(pb::JOB_STATE_SUCCEEDED);
    updated.set_reason(fmt::format("all {} ranks finished", world));
    updated.set_finished_unix_ms(now);
    if (PersistJobLocked(updated, "succeeded", updated.reason()).ok()) job = updated;
    return;
  }
  EndGenerationLocked(updated);
  if (gpu_failed) {
    // Not the job's fault: it restarts on other nodes (this one is drained above, unless
    // too many are). Its other ranks are stopped at once: their step cannot finish.
    pb::Job::RestartsInARow* restarts = updated.mutable_restarts_in_a_row();
    restarts->set_gpu_faults(restarts->gpu_faults() + 1);
    if (restarts->gpu_faults() <= options_.gpu_fault_restarts) {
      RequeueLocked(job, updated, fmt::format("{} on node {}, {}", gpu_failure, node_id, node_fate));
      return;
    }
    FailJobLocked(job, updated, kExitDeviceFault, report.rank(),
                  fmt::format("GPUs failed under it {} times in a row without it getting past step {}, the "
                              "last: {} on node {}, {}: a fault that follows the job may be its own or its "
                              "build's (drained nodes stay drained until undrained; see the job's events)",
                              restarts->gpu_faults(), restarts->furthest_step(), gpu_failure, node_id, node_fate),
                  now);
    return;
  }
  if (report.preempted()) {
    // The node is going away (SIGTERM to its daemon): restart elsewhere, from the
    // latest checkpoint, instead of failing the job.
    RequeueLocked(job, updated, fmt::format("node {} stopped (preempted)", node_id));
    return;
  }
  FailJobLocked(job, updated, report.exit_code(), report.rank(),
                report.exit_code() > 128
                    ? fmt::format("rank {} on node {} was killed by signal {}", report.rank(), node_id,
                                  report.exit_code() - 128)
                    : fmt::format("rank {} on node {} exited with status {}", report.rank(), node_id,
                                  report.exit_code()),
                now);
}

void Scheduler::FailJobLocked(pb::Job& job, pb::Job& updated, int32_t exit_code, int32_t rank,
                              const std::string& reason, int64_t now) {
  updated.set_state(pb::JOB_STATE_FAILED);
  updated.set_exit_code(exit_code);
  updated.set_failed_rank(rank);
  updated.set_finished_unix_ms(now);
  updated.clear_last_log_lines();
  for (const std::string& line : job_runtime_[job.id()].recent_stderr[rank]) updated.add_last_log_lines(line);
  updated.set_reason(reason);
  if (PersistJobLocked(updated, "failed", updated.reason()).ok()) job = updated;
}

absl::StatusOr<pb::HeartbeatResponse> Scheduler::Heartbeat(const pb::HeartbeatRequest& request) {
  std::lock_guard lock(mu_);
  pb::HeartbeatResponse response;
  auto node_it = nodes_.find(request.node_id());
  if (node_it == nodes_.end()) {
    response.set_reregister(true);
    return response;
  }
  NodeRuntime& node = node_it->second;
  node.last_heartbeat_ms = clock_->NowMs();
  node.stopping = request.stopping();
  // Every state change of this heartbeat (its ranks' exits, the jobs that end or start
  // because of them) goes to disk in one synced write before the node hears the answer:
  // a node whose eight ranks finish together costs one fsync, not eight.
  rocksdb::WriteBatch group;
  group_ = &group;
  struct CloseGroup {  // group_ never outlives `group`, whatever leaves this function
    rocksdb::WriteBatch*& group;
    ~CloseGroup() { group = nullptr; }
  } close_group{group_};
  if (node.info.state() == pb::NODE_STATE_LOST) {
    // It came back after its lease expired: its old ranks were given up (they are
    // stopped below), and it takes new work again unless it was drained.
    node.info.set_state(node.info.drain_reason().empty() ? pb::NODE_STATE_READY : pb::NODE_STATE_DRAINING);
    node.ready_since_ms = node.last_heartbeat_ms;
    PersistNodeLocked(node.info).IgnoreError();
  }
  std::set<RankKey> running;
  for (const pb::RankReport& report : request.ranks()) RecordRankReportLocked(request.node_id(), report, running);
  // Ranks told to save that this node no longer runs: any of the job's that it runs and
  // that are not of its current generation here (expected_) are still stopping.
  if (auto waiting = saving_ranks_on_node_.find(request.node_id()); waiting != saving_ranks_on_node_.end()) {
    for (const std::string& job_id : std::set<std::string>(waiting->second)) {
      const bool still_runs = std::ranges::any_of(running, [&](const RankKey& key) {
        auto current = expected_.find(key);
        return key.job_id == job_id && (current == expected_.end() || current->second.node_id != request.node_id());
      });
      if (!still_runs) ForgetSavingRanksLocked(job_id, request.node_id());
    }
  }
  PlaceJobsIfChangedLocked(clock_->NowMs());

  // What the node should run, minus what it runs: start; what it runs but should not: stop.
  static const std::set<RankKey> kNone;
  auto mine = expected_by_node_.find(request.node_id());
  for (const RankKey& key : mine == expected_by_node_.end() ? kNone : mine->second) {
    if (running.contains(key)) continue;
    const ExpectedRank& rank = expected_.at(key);
    if (rank.lost_peer) continue;  // it exited; the job's fate is pending, not its restart
    if (PreviousRanksRunLocked(key.job_id)) continue;
    const pb::Job& job = jobs_[key.job_id];
    pb::StartRank* start = response.add_start();
    start->set_job_id(key.job_id);
    start->set_generation(key.generation);
    start->set_rank(key.rank);
    int32_t world = 0;
    for (const auto& p : job.placement()) world += p.devices();
    start->set_world_size(world);
    start->set_local_rank(rank.local_rank);
    start->set_spec_yaml(job.spec_yaml());
    start->set_spec_origin(job.spec_origin());
    start->set_nodes(job.placement_size());
    start->set_job_name(job.name());
  }
  for (const RankKey& key : running) {
    auto it = expected_.find(key);
    if (it != expected_.end() && it->second.node_id == request.node_id()) continue;
    pb::StopRank* stop = response.add_stop();
    stop->set_job_id(key.job_id);
    stop->set_generation(key.generation);
    stop->set_rank(key.rank);
    auto job = jobs_.find(key.job_id);
    stop->set_reason(job == jobs_.end() ? "unknown job"
                                        : fmt::format("job is {} (generation {})", JobStateName(job->second.state()),
                                                      job->second.generation()));
    stop->set_save_step(job != jobs_.end() && std::ranges::find(job->second.saving_generations(), key.generation) !=
                                                  job->second.saving_generations().end());
  }
  response.set_state(node.info.state());
  if (auto s = CommitGroupLocked(group); !s.ok()) return s;
  return response;
}

// ---- placement and leases ------------------------------------------------------------

void Scheduler::Tick() {
  std::lock_guard lock(mu_);
  TickLocked();
}

void Scheduler::TickLocked() {
  const int64_t now = clock_->NowMs();
  ExpireLeasesLocked(now);
  ForgetLostNodesLocked(now);
  ExpireLostPeersLocked(now);
  GrowJobsLocked(now);
  PlaceJobsLocked(now);
}

void Scheduler::RestartLostPeersLocked(pb::Job& job, int32_t rank, const std::string& cause, int64_t now) {
  pb::Job updated = job;
  EndGenerationLocked(updated);
  pb::Job::RestartsInARow* restarts = updated.mutable_restarts_in_a_row();
  restarts->set_lost_peers(restarts->lost_peers() + 1);
  if (restarts->lost_peers() > options_.peer_lost_restarts) {
    FailJobLocked(job, updated, kExitPeerLost, rank,
                  fmt::format("the ranks lost their peers {} times in a row without getting past step {}; the "
                              "last time: {}",
                              restarts->lost_peers(), restarts->furthest_step(), cause),
                  now);
    return;
  }
  RequeueLocked(job, updated, cause);
}

void Scheduler::RequeueLocked(pb::Job& job, pb::Job& updated, const std::string& cause) {
  updated.set_state(pb::JOB_STATE_QUEUED);
  updated.set_reason(fmt::format("{}; restarting from the latest checkpoint", cause));
  job_runtime_[job.id()].requeue_cause = updated.reason();
  if (PersistJobLocked(updated, "requeued", updated.reason()).ok()) job = updated;
}

void Scheduler::ExpireLostPeersLocked(int64_t now) {
  const int64_t grace = options_.lease_timeout_ms + 2 * options_.heartbeat_interval_ms;
  // The first rank of each job whose lost peers have waited out the grace (copied: the
  // restarts below forget their jobs' expected ranks).
  struct Overdue {
    int32_t rank;
    std::string node_id;
    int64_t waited_ms;
  };
  std::map<std::string, Overdue> overdue;
  // Jobs with a rank still running on a node that shuts down: that rank is saving the
  // step its peers stopped after, and its exit (or the node's lease) is the cause.
  std::set<std::string> saving;
  for (const auto& [key, rank] : expected_) {
    if (rank.lost_peer && now - rank.lost_peer_ms > grace) {
      overdue.try_emplace(key.job_id, Overdue{key.rank, rank.node_id, now - rank.lost_peer_ms});
    }
    if (auto node = nodes_.find(rank.node_id); !rank.lost_peer && node != nodes_.end() && node->second.stopping) {
      saving.insert(key.job_id);
    }
  }
  for (const auto& [job_id, first] : overdue) {
    auto job = jobs_.find(job_id);
    if (job == jobs_.end() || job->second.state() != pb::JOB_STATE_RUNNING || saving.contains(job_id)) continue;
    RestartLostPeersLocked(job->second, first.rank,
                           fmt::format("rank {} on node {} lost its peers and no other rank reported a cause within "
                                       "{} ms (a peer its host cannot reach?)",
                                       first.rank, first.node_id, first.waited_ms),
                           now);
  }
}

void Scheduler::GrowJobsLocked(int64_t now) {
  if (options_.grow_after_ms <= 0) return;
  // Each tick: first the cheap questions, whether any job could grow at all and whether
  // any is queued (queued jobs have the first claim on free nodes).
  auto shrunk = [&](const pb::Job& job) {
    return job.state() == pb::JOB_STATE_RUNNING && job.placement_size() < job.resources().nodes() &&
           job.finished_ranks_size() == 0 && now - job.started_unix_ms() >= options_.grow_after_ms;
  };
  bool any_shrunk = false;
  for (const auto& [id, job] : jobs_) {
    if (job.state() == pb::JOB_STATE_QUEUED) return;
    any_shrunk |= shrunk(job);
  }
  if (!any_shrunk) return;
  // Nodes a job may grow onto: ready for grow_after_ms too, so that a node that keeps
  // dropping out does not cost a restart each time it returns.
  std::map<std::string, int32_t> free;
  for (const auto& [id, node] : nodes_) {
    if (TakesRanks(node) && now - node.ready_since_ms >= options_.grow_after_ms) {
      free[id] = node.info.devices() - DevicesInUseLocked(id);
    }
  }
  // One job per tick, the highest priority first: placement re-places a requeued job
  // from every free node, so two grown at once could take each other's.
  pb::Job* chosen = nullptr;
  std::vector<std::string> chosen_extra;
  for (auto& [id, job] : jobs_) {
    const pb::Resources& r = job.resources();
    if (!shrunk(job)) continue;
    if (chosen != nullptr && r.priority() <= chosen->resources().priority()) continue;
    if (!SavesCheckpointsLocked(job)) continue;  // a restart would start it over
    // What it keeps (its nodes that are still ready) and what it gains (other nodes).
    std::set<std::string> own;
    int32_t kept = 0;
    for (const pb::Placement& p : job.placement()) {
      own.insert(p.node_id());
      auto node = nodes_.find(p.node_id());
      kept += node != nodes_.end() && TakesRanks(node->second);
    }
    std::vector<std::string> extra;
    for (const auto& [node_id, devices] : free) {
      if (!own.contains(node_id) && devices >= r.devices_per_node() && kept + int32_t(extra.size()) < r.nodes()) {
        extra.push_back(node_id);
      }
    }
    if (kept + int32_t(extra.size()) <= job.placement_size()) continue;  // no larger than now
    chosen = &job;
    chosen_extra = std::move(extra);
  }
  if (chosen == nullptr) return;
  pb::Job updated = *chosen;
  EndGenerationSavingLocked(updated);
  RequeueLocked(*chosen, updated,
                fmt::format("growing from {} node(s): {} free again", chosen->placement_size(),
                            fmt::join(chosen_extra, ", ")));
}

void Scheduler::ExpireLeasesLocked(int64_t now) {
  for (auto& [id, node] : nodes_) {
    if (node.info.state() == pb::NODE_STATE_LOST || now - node.last_heartbeat_ms <= options_.lease_timeout_ms) continue;
    node.info.set_state(pb::NODE_STATE_LOST);
    node.info.set_last_heartbeat_unix_ms(node.last_heartbeat_ms);  // kept across a restart
    PersistNodeLocked(node.info).IgnoreError();
    // Every job with a rank there loses its generation and goes back to the queue.
    for (const std::string& job_id : JobsWithRanksOnLocked(id)) {
      pb::Job updated = jobs_[job_id];
      EndGenerationLocked(updated);
      RequeueLocked(jobs_[job_id], updated,
                    fmt::format("node {} lost (no heartbeat for {} ms)", id, now - node.last_heartbeat_ms));
    }
    // Nothing more is heard of its ranks: no job waits for them to stop.
    ForgetSavingRanksOnNodeLocked(id);
  }
}

void Scheduler::ForgetLostNodesLocked(int64_t now) {
  if (options_.forget_lost_nodes_after_ms <= 0) return;
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    const NodeRuntime& node = it->second;
    const bool forget = node.info.state() == pb::NODE_STATE_LOST && node.info.drain_reason().empty() &&
                        now - node.last_heartbeat_ms > options_.forget_lost_nodes_after_ms &&
                        DevicesInUseLocked(it->first) == 0;
    if (!forget) {
      ++it;
      continue;
    }
    const std::string id = it->first;
    absl::Status s = absl::OkStatus();
    if (group_ != nullptr) {
      group_->Delete(NodeKey(id));
    } else {
      s = FromRocks(db_->Delete(Synced(), NodeKey(id)), "forget node " + id);
    }
    if (!s.ok()) {
      std::fprintf(stderr, "llamad scheduler: %s\n", std::string(s.message()).c_str());
      ++it;
      continue;
    }
    std::fprintf(stderr, "llamad scheduler: forgot node %s, lost for %lld s\n", id.c_str(),
                 static_cast<long long>((now - node.last_heartbeat_ms) / 1000));
    it = nodes_.erase(it);
  }
}

void Scheduler::PlaceJobsIfChangedLocked(int64_t now) {
  if (placement_dirty_) PlaceJobsLocked(now);
}

void Scheduler::PlaceJobsLocked(int64_t now) {
  // Changes made by this pass (the jobs it starts) are already accounted for in it.
  struct Clean {
    bool& dirty;
    ~Clean() { dirty = false; }
  } clean{placement_dirty_};
  std::vector<pb::Job*> queue;
  for (auto& [id, job] : jobs_) {
    if (job.state() == pb::JOB_STATE_QUEUED) queue.push_back(&job);
  }
  // Priority first, then submission order (ids increase with submission).
  std::stable_sort(queue.begin(), queue.end(), [](const pb::Job* a, const pb::Job* b) {
    return a->resources().priority() > b->resources().priority();
  });
  std::map<std::string, int32_t> free;
  int32_t ready = 0;
  for (auto& [id, node] : nodes_) {
    if (!TakesRanks(node)) continue;
    ++ready;
    free[id] = node.info.devices() - DevicesInUseLocked(id);
  }
  const pb::Job* blocker = nullptr;
  for (pb::Job* job : queue) {
    const pb::Resources& r = job->resources();
    std::string reason;
    if (blocker != nullptr) {
      // Strict order: a job never overtakes one that came before it at the same or a
      // higher priority, so a large job cannot starve behind a stream of small ones.
      reason = fmt::format("behind job {} (priority {}), which waits for nodes", blocker->id(),
                           blocker->resources().priority());
    } else {
      std::vector<std::string> fit;
      for (const auto& [id, devices] : free) {
        if (devices >= r.devices_per_node()) fit.push_back(id);
      }
      // Nodes whose GPU failed under this job and stayed in service go last.
      const std::set<std::string>& suspect = job_runtime_[job->id()].undrained_fault_nodes;
      std::stable_partition(fit.begin(), fit.end(), [&](const std::string& id) { return !suspect.contains(id); });
      // A first start takes the requested size; a restart after a lost node may shrink
      // to min_nodes (the global batch stays; accumulation absorbs the difference).
      const int32_t need = job->generation() == 0 ? r.nodes() : r.min_nodes();
      if (int32_t(fit.size()) >= need) {
        const int32_t take = std::min<int32_t>(int32_t(fit.size()), job->generation() == 0 ? r.nodes() : r.max_nodes());
        pb::Job updated = *job;
        updated.set_generation(job->generation() + 1);
        updated.set_state(pb::JOB_STATE_RUNNING);
        updated.set_started_unix_ms(now);
        updated.clear_placement();
        updated.clear_finished_ranks();
        for (int32_t i = 0; i < take; ++i) {
          pb::Placement* p = updated.add_placement();
          p->set_node_id(fit[i]);
          p->set_first_rank(i * r.devices_per_node());
          p->set_devices(r.devices_per_node());
        }
        updated.set_reason(RunningReasonLocked(updated));
        if (!PersistJobLocked(updated, "started", updated.reason()).ok()) continue;
        *job = updated;
        job_runtime_[job->id()].requeue_cause.clear();
        for (const pb::Placement& p : job->placement()) {
          free[p.node_id()] -= p.devices();
          for (int32_t local = 0; local < p.devices(); ++local) {
            ExpectRankLocked({job->id(), job->generation(), p.first_rank() + local}, {p.node_id(), local, false});
          }
        }
        continue;
      }
      reason = fmt::format("waiting for {} node(s) with {} free device(s) each: {} of {} ready node(s) have them",
                           need, r.devices_per_node(), fit.size(), ready);
      if (const std::string& cause = job_runtime_[job->id()].requeue_cause; !cause.empty()) {
        reason = cause + "; " + reason;
      }
      blocker = job;
    }
    if (job->reason() != reason) {
      job->set_reason(reason);
      rocksdb::WriteBatch own;
      UnsyncedBatchLocked(own).Put(JobKey(job->id()), job->SerializeAsString());
      FlushUnsyncedLocked(own);
    }
  }
}

// ---- rendezvous -----------------------------------------------------------------------

std::string Scheduler::ScopeKey(const pb::RendezvousScope& scope) const {
  return fmt::format("{}/{:010d}", scope.job_id(), scope.generation());
}

absl::Status Scheduler::CheckScopeRunningLocked(const pb::RendezvousScope& scope) const {
  auto job = jobs_.find(scope.job_id());
  if (job == jobs_.end() || job->second.generation() != scope.generation() ||
      job->second.state() != pb::JOB_STATE_RUNNING) {
    return absl::FailedPreconditionError(fmt::format("rendezvous: job {} generation {} is not running",
                                                     scope.job_id(), scope.generation()));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::RendezvousSetLocked(const pb::RendezvousScope& scope, const std::string& key,
                                            const std::string& value) {
  if (auto s = CheckScopeRunningLocked(scope); !s.ok()) return s;
  const std::string scope_key = ScopeKey(scope);
  db_->Put(rocksdb::WriteOptions(), "rdv/" + scope_key + '\x1f' + key, value);
  rendezvous_[scope_key][key] = value;
  changed_.notify_all();
  return absl::OkStatus();
}

absl::Status Scheduler::RendezvousSet(const pb::RendezvousScope& scope, const std::string& key,
                                      const std::string& value) {
  std::lock_guard lock(mu_);
  return RendezvousSetLocked(scope, key, value);
}

absl::StatusOr<std::vector<std::string>> Scheduler::RendezvousGet(const pb::RendezvousScope& scope,
                                                                  const std::vector<std::string>& keys,
                                                                  int64_t timeout_ms,
                                                                  const std::function<bool()>& abandoned) {
  if (timeout_ms < 0 || timeout_ms > kMaxRendezvousWaitMs) {
    return absl::InvalidArgumentError(fmt::format("rendezvous get: timeout_ms {} is not within [0, {}]", timeout_ms,
                                                  kMaxRendezvousWaitMs));
  }
  std::unique_lock lock(mu_);
  const std::string scope_key = ScopeKey(scope);
  auto all_present = [&] {
    auto it = rendezvous_.find(scope_key);
    if (it == rendezvous_.end()) return keys.empty();
    for (const std::string& k : keys) {
      if (!it->second.contains(k)) return false;
    }
    return true;
  };
  if (timeout_ms == 0) timeout_ms = 30000;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  // In slices, so that a caller that went away (or a server shutting down, which waits
  // for its calls) is not held for the whole timeout.
  while (!all_present()) {
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) {
      return absl::DeadlineExceededError(fmt::format("rendezvous: job {} generation {}: keys not set within {} ms",
                                                     scope.job_id(), scope.generation(), timeout_ms));
    }
    if (abandoned && abandoned()) {
      return absl::CancelledError(fmt::format("rendezvous: job {} generation {}: the wait was abandoned",
                                              scope.job_id(), scope.generation()));
    }
    // Keys of a generation that is not running can no longer be set.
    if (auto s = CheckScopeRunningLocked(scope); !s.ok()) return s;
    changed_.wait_until(lock, std::min(deadline, now + std::chrono::seconds(1)));
  }
  std::vector<std::string> values;
  for (const std::string& k : keys) values.push_back(rendezvous_[scope_key][k]);
  return values;
}

absl::StatusOr<int64_t> Scheduler::RendezvousAdd(const pb::RendezvousScope& scope, const std::string& key,
                                                 int64_t delta) {
  std::lock_guard lock(mu_);
  int64_t value = 0;
  // find, not []: an add for an ended generation (refused below) leaves no entry behind.
  if (auto store = rendezvous_.find(ScopeKey(scope)); store != rendezvous_.end()) {
    if (auto it = store->second.find(key); it != store->second.end()) {
      const std::optional<int64_t> stored = ParseInt64(it->second);
      if (!stored) {
        return absl::FailedPreconditionError(fmt::format("rendezvous: key '{}' does not hold a number", key));
      }
      value = *stored;
    }
  }
  if (__builtin_add_overflow(value, delta, &value)) {
    return absl::OutOfRangeError(fmt::format("rendezvous: adding {} to key '{}' overflows int64", delta, key));
  }
  if (auto s = RendezvousSetLocked(scope, key, std::to_string(value)); !s.ok()) return s;
  return value;
}

}  // namespace llamad::scheduler
