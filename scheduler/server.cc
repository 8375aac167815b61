#include "scheduler/server.h"

#include <fmt/format.h>

#include <chrono>
#include <limits>

#include "llamad/v1/llamad.grpc.pb.h"

namespace llamad::scheduler {
namespace {

// Runs `body` when the call carries the token; the one place results become grpc::Status.
template <typename Body>
grpc::Status Authorized(grpc::ServerContext* context, const std::string& token, Body&& body) {
  if (grpc::Status s = rpc::CheckToken(*context, token); !s.ok()) return s;
  return rpc::ToGrpc(body());
}

}  // namespace

class SchedulerServer::SchedulerService final : public pb::Scheduler::Service {
 public:
  SchedulerService(Scheduler* s, std::string token, const std::atomic<bool>* stopping)
      : s_(s), token_(std::move(token)), stopping_(stopping) {}

  grpc::Status SubmitJob(grpc::ServerContext* c, const pb::SubmitJobRequest* req, pb::SubmitJobResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto job = s_->SubmitJob(*req);
      if (!job.ok()) return job.status();
      *resp->mutable_job() = *job;
      return absl::OkStatus();
    });
  }
  grpc::Status GetJob(grpc::ServerContext* c, const pb::GetJobRequest* req, pb::Job* resp) override {
    return Authorized(c, token_, [&] { return Fill(s_->GetJob(req->job_id()), resp); });
  }
  grpc::Status ListJobs(grpc::ServerContext* c, const pb::ListJobsRequest* req, pb::ListJobsResponse* resp) override {
    return Authorized(c, token_, [&] {
      for (pb::Job& job : s_->ListJobs(req->include_finished(), req->limit())) *resp->add_jobs() = std::move(job);
      return absl::OkStatus();
    });
  }
  grpc::Status CancelJob(grpc::ServerContext* c, const pb::CancelJobRequest* req, pb::Job* resp) override {
    return Authorized(c, token_, [&] { return Fill(s_->CancelJob(req->job_id()), resp); });
  }
  grpc::Status ResumeJob(grpc::ServerContext* c, const pb::ResumeJobRequest* req, pb::Job* resp) override {
    return Authorized(c, token_, [&] { return Fill(s_->ResumeJob(req->job_id()), resp); });
  }
  grpc::Status WatchJob(grpc::ServerContext* c, const pb::WatchJobRequest* req,
                        grpc::ServerWriter<pb::JobEvent>* writer) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      int64_t after = req->after_seq(), progress_ms = 0;
      if (req->stored_only()) {
        auto updates = s_->WaitJobUpdates(req->job_id(), after, std::numeric_limits<int64_t>::max(), 0);
        if (!updates.ok()) return updates.status();
        for (const pb::JobEvent& e : updates->events) {
          if (!writer->Write(e)) break;  // the client went away
        }
        return absl::OkStatus();
      }
      while (!c->IsCancelled() && !stopping_->load()) {
        auto updates = s_->WaitJobUpdates(req->job_id(), after, progress_ms, 1000);
        if (!updates.ok()) return updates.status();
        for (const pb::JobEvent& e : updates->events) {
          if (!writer->Write(e)) return absl::OkStatus();  // the client went away
          after = e.seq();
          if (IsFinished(e.job().state())) return absl::OkStatus();
        }
        if (updates->events.empty() && !updates->progressed) {
          // Quiet: a watcher that asked from past the job's end has nothing more coming.
          auto job = s_->GetJob(req->job_id());
          if (!job.ok()) return job.status();
          if (IsFinished(job->state())) return absl::OkStatus();
          continue;
        }
        if (updates->progressed) {
          // Not stored: it carries the seq of the last stored event the watcher has.
          const pb::Job& job = *updates->progressed;
          pb::JobEvent e;
          e.set_job_id(job.id());
          e.set_seq(after);
          e.set_unix_ms(job.progress().unix_ms());
          e.set_kind("progress");
          e.set_message(fmt::format("step {}/{}", job.progress().step(), job.progress().total_steps()));
          *e.mutable_job() = job;
          if (!writer->Write(e)) return absl::OkStatus();
          progress_ms = job.progress().unix_ms();
        }
      }
      return absl::OkStatus();
    });
  }
  grpc::Status GetLogs(grpc::ServerContext* c, const pb::GetLogsRequest* req, pb::GetLogsResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto lines = s_->GetLogs(req->job_id(), req->after_seq(), req->tail());
      if (!lines.ok()) return lines.status();
      for (pb::LogLine& line : *lines) *resp->add_lines() = std::move(line);
      return absl::OkStatus();
    });
  }
  grpc::Status ListNodes(grpc::ServerContext* c, const pb::ListNodesRequest*, pb::ListNodesResponse* resp) override {
    return Authorized(c, token_, [&] {
      for (pb::NodeInfo& node : s_->ListNodes()) *resp->add_nodes() = std::move(node);
      const Scheduler::FaultDrains drains = s_->GpuFaultDrains();
      resp->set_gpu_fault_drained(static_cast<int32_t>(drains.drained));
      resp->set_gpu_fault_drain_limit(static_cast<int32_t>(drains.limit));
      resp->set_max_fault_drained_percent(s_->options().max_fault_drained_percent);
      return absl::OkStatus();
    });
  }
  grpc::Status DrainNode(grpc::ServerContext* c, const pb::DrainNodeRequest* req, pb::NodeInfo* resp) override {
    return Authorized(c, token_, [&] { return Fill(s_->DrainNode(req->node_id(), req->move_jobs(), req->reason()), resp); });
  }
  grpc::Status UndrainNode(grpc::ServerContext* c, const pb::UndrainNodeRequest* req, pb::NodeInfo* resp) override {
    return Authorized(c, token_, [&] { return Fill(s_->UndrainNode(req->node_id()), resp); });
  }

 private:
  template <typename T>
  static absl::Status Fill(absl::StatusOr<T> result, T* out) {
    if (!result.ok()) return result.status();
    *out = std::move(*result);
    return absl::OkStatus();
  }
  Scheduler* s_;
  std::string token_;
  const std::atomic<bool>* stopping_;
};

class SchedulerServer::NodeService final : public pb::Node::Service {
 public:
  NodeService(Scheduler* s, std::string token) : s_(s), token_(std::move(token)) {}
  grpc::Status RegisterNode(grpc::ServerContext* c, const pb::RegisterNodeRequest* req,
                            pb::RegisterNodeResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto r = s_->RegisterNode(*req);
      if (!r.ok()) return r.status();
      *resp = *r;
      return absl::OkStatus();
    });
  }
  grpc::Status Heartbeat(grpc::ServerContext* c, const pb::HeartbeatRequest* req, pb::HeartbeatResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto r = s_->Heartbeat(*req);
      if (!r.ok()) return r.status();
      *resp = std::move(*r);
      return absl::OkStatus();
    });
  }

 private:
  Scheduler* s_;
  std::string token_;
};

class SchedulerServer::RendezvousService final : public pb::Rendezvous::Service {
 public:
  RendezvousService(Scheduler* s, std::string token, const std::atomic<bool>* stopping)
      : s_(s), token_(std::move(token)), stopping_(stopping) {}
  grpc::Status Set(grpc::ServerContext* c, const pb::RendezvousSetRequest* req, pb::RendezvousSetResponse*) override {
    return Authorized(c, token_, [&] { return s_->RendezvousSet(req->scope(), req->key(), req->value()); });
  }
  grpc::Status Get(grpc::ServerContext* c, const pb::RendezvousGetRequest* req, pb::RendezvousGetResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto values = s_->RendezvousGet(req->scope(), {req->keys().begin(), req->keys().end()}, req->timeout_ms(),
                                      [&] { return c->IsCancelled() || stopping_->load(); });
      if (!values.ok()) return values.status();
      for (std::string& v : *values) resp->add_values(std::move(v));
      return absl::OkStatus();
    });
  }
  grpc::Status Add(grpc::ServerContext* c, const pb::RendezvousAddRequest* req, pb::RendezvousAddResponse* resp) override {
    return Authorized(c, token_, [&]() -> absl::Status {
      auto value = s_->RendezvousAdd(req->scope(), req->key(), req->delta());
      if (!value.ok()) return value.status();
      resp->set_value(*value);
      return absl::OkStatus();
    });
  }

 private:
  Scheduler* s_;
  std::string token_;
  const std::atomic<bool>* stopping_;
};

absl::StatusOr<std::unique_ptr<SchedulerServer>> SchedulerServer::Start(Scheduler* scheduler,
                                                                        const ServerOptions& options) {
  if (options.token.empty()) return absl::InvalidArgumentError("scheduler server: empty bearer token");
  auto credentials = rpc::MakeServerCredentials(options.tls);
  if (!credentials.ok()) return credentials.status();
  std::unique_ptr<SchedulerServer> server(new SchedulerServer());
  server->scheduler_ = scheduler;
  server->scheduler_service_ = std::make_unique<SchedulerService>(scheduler, options.token, &server->stopping_);
  server->node_service_ = std::make_unique<NodeService>(scheduler, options.token);
  server->rendezvous_service_ = std::make_unique<RendezvousService>(scheduler, options.token, &server->stopping_);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen_address, *credentials, &port);
  builder.RegisterService(server->scheduler_service_.get());
  builder.RegisterService(server->node_service_.get());
  builder.RegisterService(server->rendezvous_service_.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  // Clients ping every 30 s during calls (rpc::Dial); gRPC's default would answer pings
  // more often than every 5 minutes with GOAWAY.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 20'000);
  // gRPC sets SO_REUSEPORT by default, which would let a second scheduler bind the same
  // port and take half of the calls; a port in use must be an error instead.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || port == 0) {
    return absl::UnavailableError(fmt::format("scheduler: cannot listen on {} (in use, or not a local address?)",
                                              options.listen_address));
  }
  const std::string host = options.listen_address.substr(0, options.listen_address.rfind(':'));
  server->address_ = fmt::format("{}:{}", host, port);
  // Leases expire even when no node calls: a timer ticks at the heartbeat interval.
  const auto period = std::chrono::milliseconds(std::max<int64_t>(50, scheduler->options().heartbeat_interval_ms / 2));
  server->timer_ = std::thread([s = server.get(), period] {
    std::unique_lock lock(s->timer_mu_);
    while (!s->timer_wake_.wait_for(lock, period, [s] { return s->stopping_.load(); })) {
      lock.unlock();
      s->scheduler_->Tick();
      lock.lock();
    }
  });
  return server;
}

void SchedulerServer::Shutdown() {
  if (stopping_.exchange(true)) return;
  if (server_ == nullptr) return;  // Start failed before the server or its timer existed.
  {
    // Taken after stopping_ is set, so the timer is either waiting (and woken) or sees it.
    std::lock_guard lock(timer_mu_);
  }
  timer_wake_.notify_all();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (timer_.joinable()) timer_.join();
}

SchedulerServer::~SchedulerServer() {
  Shutdown();
  if (timer_.joinable()) timer_.join();
}

}  // namespace llamad::scheduler
