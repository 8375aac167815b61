// llamactl: submit, follow and steer llamad jobs over the Scheduler gRPC API, or run one
// job end to end on this machine (`llamactl run JOB.yaml`: an in-process scheduler and
// node agent on loopback).
//
// Exit codes: 0 success; 1 the job failed or was cancelled (run, submit --wait, resume --wait);
// 2 bad usage or an invalid spec; 3 not found; 4 not authenticated or not allowed;
// 5 the scheduler cannot be reached; 6 another error.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <pwd.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <google/protobuf/util/json_util.h>

#include "core/cli_integers.h"
#include "core/self_executable.h"
#include "train/jobspec.h"
#include "daemon/devices.h"
#include "daemon/node_agent.h"
#include "llamad/v1/llamad.grpc.pb.h"
#include "proto/rpc.h"
#include "scheduler/scheduler.h"
#include "scheduler/server.h"

namespace {

namespace pb = ::llamad::v1;
using llamad::scheduler::IsFinished;
using llamad::scheduler::JobStateName;

int ExitCodeOf(const absl::Status& s) {
  switch (s.code()) {
    case absl::StatusCode::kOk: return 0;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition: return 2;
    case absl::StatusCode::kNotFound: return 3;
    case absl::StatusCode::kUnauthenticated:
    case absl::StatusCode::kPermissionDenied: return 4;
    case absl::StatusCode::kUnavailable:
    case absl::StatusCode::kDeadlineExceeded: return 5;
    default: return 6;
  }
}

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "llamactl: %s\n", std::string(s.message()).c_str());
  return ExitCodeOf(s);
}

std::string Env(const char* name, std::string fallback = "") {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::string(v) : fallback;
}

std::string UserName() {
  const passwd* pw = ::getpwuid(::getuid());
  return pw != nullptr ? pw->pw_name : "unknown";
}

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, options);
  return out;
}

std::string Ago(int64_t unix_ms) {
  if (unix_ms <= 0) return "-";
  const int64_t now =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count();
  const int64_t s = std::max<int64_t>(0, (now - unix_ms) / 1000);
  if (s < 120) return fmt::format("{}s ago", s);
  if (s < 7200) return fmt::format("{}m ago", s / 60);
  return fmt::format("{}h ago", s / 3600);
}

// A connection to the scheduler with the caller's token.
struct Connection {
  std::unique_ptr<pb::Scheduler::Stub> scheduler;  // gRPC's client of the Scheduler service
  std::string token;

  template <typename Request, typename Response, typename Call>
  absl::Status Unary(Call call, const Request& request, Response* response, const std::string& what,
                     int64_t deadline_ms = 30'000) {
    grpc::ClientContext context;
    llamad::rpc::PrepareCall(context, token, deadline_ms);
    return llamad::rpc::FromGrpc((scheduler.get()->*call)(&context, request, response), what);
  }
};

absl::StatusOr<Connection> Connect(const std::string& server, const std::string& token_file,
                                   const llamad::rpc::TlsFiles& tls) {
  auto token = llamad::rpc::ReadToken(token_file);
  if (!token.ok()) return token.status();
  auto channel = llamad::rpc::Dial(server, tls);
  if (!channel.ok()) return channel.status();
  return Connection{pb::Scheduler::NewStub(*channel), *token};
}

void PrintJobs(const std::vector<pb::Job>& jobs) {
  std::printf("%-10s %-16s %-10s %-6s %-12s %-10s %s\n", "JOB", "NAME", "STATE", "GEN", "STEP", "LOSS", "REASON");
  for (const pb::Job& j : jobs) {
    const std::string step = fmt::format("{}/{}", j.progress().step(), j.progress().total_steps());
    const std::string loss = j.progress().step() > 0 ? fmt::format("{:.4f}", j.progress().loss()) : "-";
    std::printf("%-10s %-16s %-10s %-6lld %-12s %-10s %s\n", j.id().c_str(), j.name().c_str(),
                JobStateName(j.state()).c_str(), (long long)j.generation(), step.c_str(), loss.c_str(),
                j.reason().c_str());
  }
}

void PrintJob(const pb::Job& j) {
  std::printf("job        %s (%s), submitted %s by %s\n", j.id().c_str(), j.name().c_str(),
              Ago(j.submitted_unix_ms()).c_str(), j.owner().c_str());
  std::printf("state      %s: %s\n", JobStateName(j.state()).c_str(), j.reason().c_str());
  std::printf("resources  %d node(s) x %d device(s), priority %d\n", j.resources().nodes(),
              j.resources().devices_per_node(), j.resources().priority());
  std::printf("generation %lld", (long long)j.generation());
  for (const auto& p : j.placement()) std::printf("  %s: ranks %d-%d", p.node_id().c_str(), p.first_rank(), p.first_rank() + p.devices() - 1);
  std::printf("\n");
  const pb::Progress& p = j.progress();
  if (p.step() > 0) {
    std::printf("progress   step %lld/%lld  loss %.4f  lr %.3g  %.0f tokens/s  (%s)\n", (long long)p.step(),
                (long long)p.total_steps(), p.loss(), p.lr(), p.tokens_per_s(), Ago(p.unix_ms()).c_str());
  }
  if (j.state() == pb::JOB_STATE_FAILED) {
    std::printf("exit       rank %d, status %d; its last lines:\n", j.failed_rank(), j.exit_code());
    for (const auto& line : j.last_log_lines()) std::printf("  | %s\n", line.c_str());
  }
}

absl::StatusOr<std::string> ReadSpec(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(path + ": cannot open job file");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

absl::StatusOr<pb::Job> Submit(Connection& c, const std::string& path) {
  auto text = ReadSpec(path);
  if (!text.ok()) return text.status();
  pb::SubmitJobRequest request;
  request.set_spec_yaml(*text);
  request.set_spec_origin(std::filesystem::absolute(path).lexically_normal().string());
  request.set_owner(UserName());
  pb::SubmitJobResponse response;
  auto s = c.Unary(&pb::Scheduler::Stub::SubmitJob, request, &response, "submit " + path);
  if (!s.ok()) return s;
  return response.job();
}

// One line of a running job's progress: a bar that redraws itself on a terminal.
void PrintProgress(const pb::Job& job, bool tty) {
  const pb::Progress& p = job.progress();
  const int width = 30;
  // Clamped: the numbers come from the scheduler, and a bar must not throw.
  const double done = p.total_steps() > 0 ? double(p.step()) / double(p.total_steps()) : 0.0;
  const int filled = int(width * std::clamp(done, 0.0, 1.0));
  std::fprintf(stderr, "%s[%s%s] step %lld/%lld loss %.4f %.0f tok/s%s", tty ? "\r\033[K" : "",
               std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(), (long long)p.step(),
               (long long)p.total_steps(), p.loss(), p.tokens_per_s(), tty ? "" : "\n");
}

// A WatchJob stream of the job's events after `after`: the stored ones only, or on to
// the job's end. `context` outlives the reader.
std::unique_ptr<grpc::ClientReader<pb::JobEvent>> WatchJob(Connection& c, grpc::ClientContext& context,
                                                           const std::string& job_id, int64_t after,
                                                           bool stored_only) {
  llamad::rpc::PrepareCall(context, c.token, stored_only ? 30'000 : 0);
  pb::WatchJobRequest request;
  request.set_job_id(job_id);
  request.set_after_seq(after);
  request.set_stored_only(stored_only);
  return c.scheduler->WatchJob(&context, request);
}

// Follows a job's events and progress until it ends: a progress bar on a terminal, one
// line per event (and a progress line every 10 s) otherwise, every event with --json.
// Returns the final job.
absl::StatusOr<pb::Job> Follow(Connection& c, const std::string& job_id, bool json) {
  const bool tty = ::isatty(2);
  int64_t after = 0;
  pb::Job last;
  auto last_progress_line = std::chrono::steady_clock::now() - std::chrono::hours(1);
  while (true) {
    grpc::ClientContext context;
    auto reader = WatchJob(c, context, job_id, after, /*stored_only=*/false);
    pb::JobEvent event;
    while (reader->Read(&event)) {
      after = event.seq();
      last = event.job();
      if (json) {
        std::printf("%s\n", Json(event).c_str());
        std::fflush(stdout);
      } else if (event.kind() == "progress") {
        const auto now = std::chrono::steady_clock::now();
        if (tty || now - last_progress_line >= std::chrono::seconds(10)) {
          PrintProgress(last, tty);
          last_progress_line = now;
        }
      } else {
        if (tty) std::fprintf(stderr, "\r\033[K");
        std::fprintf(stderr, "%s: %s\n", event.kind().c_str(), event.message().c_str());
      }
      if (IsFinished(last.state())) break;
    }
    if (IsFinished(last.state())) break;
    auto s = llamad::rpc::FromGrpc(reader->Finish(), "watch " + job_id);
    if (!s.ok()) return s;
    // The stream ended without the job ending (the scheduler is stopping): look, then watch on.
    pb::GetJobRequest get;
    get.set_job_id(job_id);
    pb::Job job;
    if (auto g = c.Unary(&pb::Scheduler::Stub::GetJob, get, &job, "status " + job_id); !g.ok()) return g;
    last = job;
    if (IsFinished(job.state())) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  if (tty && !json) std::fprintf(stderr, "\r\033[K");
  return last;
}

// The job's history (`llamactl events`): every stored event, one line each (the time,
// the generation, the kind, the message), or one JSON object each with --json.
int PrintEvents(Connection& c, const std::string& job_id, bool json) {
  grpc::ClientContext context;
  auto reader = WatchJob(c, context, job_id, 0, /*stored_only=*/true);
  pb::JobEvent event;
  while (reader->Read(&event)) {
    if (json) {
      std::printf("%s\n", Json(event).c_str());
      continue;
    }
    const std::time_t seconds = std::time_t(event.unix_ms() / 1000);
    std::tm local{};
    ::localtime_r(&seconds, &local);
    char when[32];
    std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &local);
    std::printf("%s  gen %-3lld %-10s %s\n", when, (long long)event.job().generation(), event.kind().c_str(),
                event.message().c_str());
  }
  auto s = llamad::rpc::FromGrpc(reader->Finish(), "events of " + job_id);
  return s.ok() ? 0 : Fail(s);
}

// Exports checkpoint `step` (-1: the latest) of `job` into `out` by running
// `llama-train export` (next to llamactl) on the job's checkpoint folder, which must be
// reachable from here (the same machine, or a shared file system).
int ExportJob(const pb::Job& job, int64_t step, const std::string& out) {
  auto spec = llamad::ParseJobSpec(job.spec_yaml(), job.spec_origin());
  if (!spec.ok()) return Fail(spec.status());
  if (spec->checkpoint.dir.empty() || spec->checkpoint.interval <= 0) {
    return Fail(absl::FailedPreconditionError(fmt::format(
        "job {} ({}) saves no checkpoints: its spec sets no checkpoint.dir and checkpoint.interval", job.id(),
        job.name())));
  }
  const std::string load = fmt::format("{}/{}/{}", spec->checkpoint.dir, spec->name,
                                       step >= 0 ? fmt::format("step-{}", step) : std::string("latest"));
  std::vector<std::string> args = {
      std::filesystem::path(llamad::SelfExecutable()).parent_path().string() + "/llama-train", "export", "--load",
      load, "--hf", std::filesystem::absolute(out).string()};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::execv(argv[0], argv.data());
    std::fprintf(stderr, "llamactl: cannot run %s: %s\n", argv[0], std::strerror(errno));
    ::_exit(127);
  }
  int status = 0;
  if (pid < 0 || ::waitpid(pid, &status, 0) != pid) {
    return Fail(absl::InternalError(fmt::format("cannot run {}: {}", args[0], std::strerror(errno))));
  }
  // llama-train's 2 (bad input: no such checkpoint, damaged data) stays 2; other failures are 1.
  return WIFEXITED(status) ? (WEXITSTATUS(status) == 0 ? 0 : WEXITSTATUS(status) == 2 ? 2 : 1) : 1;
}

// Follows a job to its end, prints it (unless --json) and returns llamactl's exit code.
int FollowToEnd(Connection& c, const std::string& job_id, bool json) {
  auto final_job = Follow(c, job_id, json);
  if (!final_job.ok()) return Fail(final_job.status());
  if (!json) PrintJob(*final_job);
  return final_job->state() == pb::JOB_STATE_SUCCEEDED ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("llamactl: submit, follow and steer llamad training jobs");
  app.require_subcommand(1);
  std::string server = Env("LLAMACTL_SERVER", "127.0.0.1:7070");
  std::string token_file = Env("LLAMACTL_TOKEN_FILE", "/var/lib/llamad/token");
  llamad::rpc::TlsFiles tls{Env("LLAMACTL_TLS_CA"), Env("LLAMACTL_TLS_CERT"), Env("LLAMACTL_TLS_KEY")};
  bool json = false;
  app.add_option("--server", server, "Scheduler host:port (env LLAMACTL_SERVER)");
  app.add_option("--token-file", token_file, "Bearer token file (env LLAMACTL_TOKEN_FILE)");
  app.add_option("--tls-ca", tls.ca, "CA certificate of the scheduler");
  app.add_option("--tls-cert", tls.cert, "Client certificate (mutual TLS)");
  app.add_option("--tls-key", tls.key, "Client key (mutual TLS)");
  app.add_flag("--json", json, "Machine-readable output");

  std::string spec_path, job_id, node_id, data_dir, devices = "auto";
  bool all = false, follow = false, wait = false;
  int tail = 100;
  CLI::App* run = app.add_subcommand("run", "Run a job on this machine to its end (embedded scheduler and node)");
  run->add_option("spec", spec_path, "Job spec YAML")->required();
  run->add_option("--data-dir", data_dir, "Scheduler state and rank logs (default: a temporary folder)");
  run->add_option("--devices", devices, "auto, cpu:N or cuda:N");
  CLI::App* submit = app.add_subcommand("submit", "Submit a job");
  submit->add_option("spec", spec_path, "Job spec YAML")->required();
  submit->add_flag("--wait", wait, "Follow the job to its end");
  CLI::App* status = app.add_subcommand("status", "One job in detail, or the active jobs");
  status->add_option("job", job_id, "Job id or name");
  CLI::App* list = app.add_subcommand("list", "Jobs, newest first");
  list->add_flag("-a,--all", all, "Include finished jobs");
  CLI::App* events = app.add_subcommand("events", "A job's history: submitted, started, requeued (and why), ended");
  events->add_option("job", job_id, "Job id or name")->required();
  CLI::App* logs = app.add_subcommand("logs", "A job's log lines");
  logs->add_option("job", job_id, "Job id or name")->required();
  logs->add_flag("-f,--follow", follow, "Keep printing new lines until the job ends");
  logs->add_option("--tail", tail, "Lines to show first");
  CLI::App* cancel = app.add_subcommand("cancel", "Stop a job");
  cancel->add_option("job", job_id, "Job id or name")->required();
  CLI::App* resume = app.add_subcommand("resume", "Requeue a failed or cancelled job from its latest checkpoint");
  resume->add_option("job", job_id, "Job id or name")->required();
  std::string hf_out;
  int64_t export_step = -1;
  CLI::App* exp = app.add_subcommand("export", "Write a job's checkpoint as a Hugging Face model (llama-train export)");
  exp->add_option("job", job_id, "Job id or name")->required();
  exp->add_option("--hf", hf_out, "Output folder")->required();
  exp->add_option("--step", export_step, "Checkpoint step (default: the latest)");
  CLI::App* nodes = app.add_subcommand("nodes", "The cluster's nodes");
  CLI::App* drain = app.add_subcommand("drain", "Let a node finish its ranks and take no new ones");
  drain->add_option("node", node_id, "Node id")->required();
  bool drain_now = false;
  drain->add_flag("--now", drain_now,
                  "Move its jobs now: their ranks save the step they stop after, and they restart on other nodes");
  std::string drain_reason;
  drain->add_option("--reason", drain_reason, "Why, shown by llamactl nodes until the node is undrained");
  CLI::App* undrain = app.add_subcommand("undrain", "Let a drained node take new ranks again");
  undrain->add_option("node", node_id, "Node id")->required();
  llamad::StrictIntegers(app);
  CLI11_PARSE(app, argc, argv);
  ::signal(SIGPIPE, SIG_IGN);

  if (*run) {
    // Embedded mode: a scheduler and a node agent in this process, on loopback only.
    auto text = ReadSpec(spec_path);
    if (!text.ok()) return Fail(text.status());
    const std::string origin = std::filesystem::absolute(spec_path).lexically_normal().string();
    auto job = llamad::scheduler::JobFromSpec(*text, origin);
    if (!job.ok()) return Fail(job.status());
    auto found = llamad::daemon::ResolveDevices(devices);
    if (!found.ok()) return Fail(found.status());
    if (job->resources().nodes() > 1) {
      return Fail(absl::InvalidArgumentError(fmt::format(
          "{}: resources.nodes: {} needs a cluster; `llamactl run` runs on this machine only (use submit)",
          origin, job->resources().nodes())));
    }
    const int slots = std::max(found->count, job->resources().devices_per_node());
    if (data_dir.empty()) {
      char tmpl[] = "/tmp/llamactl-run-XXXXXX";
      if (::mkdtemp(tmpl) == nullptr) return Fail(absl::InternalError("cannot create a temporary folder"));
      data_dir = tmpl;
    }
    llamad::scheduler::SystemClock clock;
    llamad::scheduler::SchedulerOptions options;
    options.data_dir = data_dir + "/scheduler";
    options.heartbeat_interval_ms = 200;
    options.lease_timeout_ms = 5000;
    auto token = llamad::rpc::LoadOrCreateToken(data_dir + "/token");
    if (!token.ok()) return Fail(token.status());
    auto scheduler = llamad::scheduler::Scheduler::Open(options, &clock);
    if (!scheduler.ok()) return Fail(scheduler.status());
    auto srv = llamad::scheduler::SchedulerServer::Start(scheduler->get(), {"127.0.0.1:0", *token, {}});
    if (!srv.ok()) return Fail(srv.status());
    llamad::daemon::NodeAgentOptions agent_options;
    agent_options.scheduler_address = (*srv)->address();
    agent_options.token = *token;
    agent_options.token_file = data_dir + "/token";
    agent_options.node_id = "local";
    agent_options.hostname = "localhost";
    agent_options.devices = found->kind == "cpu" ? slots : found->count;
    agent_options.device_kind = found->kind;
    agent_options.data_dir = data_dir;
    agent_options.worker_binary =
        std::filesystem::path(llamad::SelfExecutable()).parent_path().string() + "/llama-train";
    llamad::daemon::NodeAgent agent(agent_options);
    agent.Start();
    auto conn = Connect((*srv)->address(), data_dir + "/token", {});
    if (!conn.ok()) return Fail(conn.status());
    auto submitted = Submit(*conn, spec_path);
    if (!submitted.ok()) return Fail(submitted.status());
    std::fprintf(stderr, "llamactl: running job %s (%s) on this machine: %d %s slot(s); logs in %s/jobs/%s\n",
                 submitted->id().c_str(), submitted->name().c_str(), agent_options.devices,
                 found->kind.c_str(), data_dir.c_str(), submitted->id().c_str());
    const int code = FollowToEnd(*conn, submitted->id(), json);
    agent.Stop(false);
    (*srv)->Shutdown();
    std::fprintf(stderr, "llamactl: rank logs in %s/jobs/%s\n", data_dir.c_str(), submitted->id().c_str());
    // The result: the job's checkpoints, when its spec saves any.
    if (auto spec = llamad::ParseJobSpec(*text, origin); spec.ok() && spec->checkpoint.interval > 0) {
      std::fprintf(stderr,
                   "llamactl: checkpoints in %s/%s (llama-train export --load %s/%s/step-<n> --hf OUT for "
                   "Hugging Face)\n",
                   spec->checkpoint.dir.c_str(), spec->name.c_str(), spec->checkpoint.dir.c_str(),
                   spec->name.c_str());
    } else if (code == 0) {
      std::fprintf(stderr, "llamactl: no checkpoints were saved (checkpoint.interval is 0 in %s)\n", origin.c_str());
    }
    return code;
  }

  auto conn = Connect(server, token_file, tls);
  if (!conn.ok()) return Fail(conn.status());
  Connection& c = *conn;

  if (*submit) {
    auto job = Submit(c, spec_path);
    if (!job.ok()) return Fail(job.status());
    if (json) {
      std::printf("%s\n", Json(*job).c_str());
    } else {
      std::printf("%s\n", job->id().c_str());
      std::fprintf(stderr, "llamactl: submitted %s (%s): %s\n", job->id().c_str(), job->name().c_str(),
                   job->reason().c_str());
    }
    return wait ? FollowToEnd(c, job->id(), json) : 0;
  }
  if (*status && !job_id.empty()) {
    pb::GetJobRequest request;
    request.set_job_id(job_id);
    pb::Job job;
    if (auto s = c.Unary(&pb::Scheduler::Stub::GetJob, request, &job, "status " + job_id); !s.ok()) return Fail(s);
    job.clear_spec_yaml();
    json ? (void)std::printf("%s\n", Json(job).c_str()) : PrintJob(job);
    return 0;
  }
  if (*events) return PrintEvents(c, job_id, json);
  if (*status || *list) {
    pb::ListJobsRequest request;
    request.set_include_finished(*list && all);
    pb::ListJobsResponse response;
    if (auto s = c.Unary(&pb::Scheduler::Stub::ListJobs, request, &response, "list jobs"); !s.ok()) return Fail(s);
    if (json) {
      std::printf("%s\n", Json(response).c_str());
    } else {
      PrintJobs({response.jobs().begin(), response.jobs().end()});
    }
    return 0;
  }
  if (*logs) {
    int64_t after = 0;
    while (true) {
      pb::GetLogsRequest request;
      request.set_job_id(job_id);
      request.set_after_seq(after);
      request.set_tail(tail);
      pb::GetLogsResponse response;
      if (auto s = c.Unary(&pb::Scheduler::Stub::GetLogs, request, &response, "logs " + job_id); !s.ok()) return Fail(s);
      for (const pb::LogLine& line : response.lines()) {
        if (json) {
          std::printf("%s\n", Json(line).c_str());
        } else {
          std::printf("[rank %d] %s\n", line.rank(), line.text().c_str());
        }
        after = line.seq();
      }
      std::fflush(stdout);
      if (!follow) return 0;
      if (response.lines().empty()) {
        pb::GetJobRequest get;
        get.set_job_id(job_id);
        pb::Job job;
        if (auto s = c.Unary(&pb::Scheduler::Stub::GetJob, get, &job, "status " + job_id); !s.ok()) return Fail(s);
        if (IsFinished(job.state())) return 0;
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
      }
    }
  }
  if (*cancel || *resume) {
    pb::Job job;
    absl::Status s;
    if (*cancel) {
      pb::CancelJobRequest request;
      request.set_job_id(job_id);
      s = c.Unary(&pb::Scheduler::Stub::CancelJob, request, &job, "cancel " + job_id);
    } else {
      pb::ResumeJobRequest request;
      request.set_job_id(job_id);
      s = c.Unary(&pb::Scheduler::Stub::ResumeJob, request, &job, "resume " + job_id);
    }
    if (!s.ok()) return Fail(s);
    job.clear_spec_yaml();
    json ? (void)std::printf("%s\n", Json(job).c_str())
         : (void)std::printf("%s %s: %s\n", job.id().c_str(), JobStateName(job.state()).c_str(), job.reason().c_str());
    return 0;
  }
  if (*exp) {
    pb::GetJobRequest get;
    get.set_job_id(job_id);
    pb::Job job;
    if (auto s = c.Unary(&pb::Scheduler::Stub::GetJob, get, &job, "status " + job_id); !s.ok()) return Fail(s);
    return ExportJob(job, export_step, hf_out);
  }
  if (*nodes) {
    pb::ListNodesResponse response;
    if (auto s = c.Unary(&pb::Scheduler::Stub::ListNodes, pb::ListNodesRequest(), &response, "nodes"); !s.ok()) {
      return Fail(s);
    }
    if (json) {
      std::printf("%s\n", Json(response).c_str());
      return 0;
    }
    std::printf("%-20s %-10s %-8s %-12s %-14s %s\n", "NODE", "STATE", "KIND", "DEVICES", "HEARTBEAT", "DRAINED");
    for (const pb::NodeInfo& n : response.nodes()) {
      std::printf("%-20s %-10s %-8s %-12s %-14s %s\n", n.id().c_str(),
                  llamad::scheduler::NodeStateName(n.state()).c_str(), n.device_kind().c_str(),
                  fmt::format("{}/{} used", n.devices_in_use(), n.devices()).c_str(),
                  Ago(n.last_heartbeat_unix_ms()).c_str(), n.drain_reason().c_str());
    }
    if (response.gpu_fault_drained() > 0) {
      std::printf("GPU faults drained %d node(s); they drain at most %d (max_fault_drained_percent %d)%s\n",
                  response.gpu_fault_drained(), response.gpu_fault_drain_limit(),
                  response.max_fault_drained_percent(),
                  response.gpu_fault_drained() >= response.gpu_fault_drain_limit()
                      ? ": a node whose GPU fails now stays in service; look into the faults, then undrain what is "
                        "sound or drain what is not with llamactl drain"
                      : "");
    }
    return 0;
  }
  if (*drain || *undrain) {
    pb::NodeInfo node;
    absl::Status s;
    if (*drain) {
      pb::DrainNodeRequest request;
      request.set_node_id(node_id);
      request.set_move_jobs(drain_now);
      request.set_reason(drain_reason);
      s = c.Unary(&pb::Scheduler::Stub::DrainNode, request, &node, "drain " + node_id);
    } else {
      pb::UndrainNodeRequest request;
      request.set_node_id(node_id);
      s = c.Unary(&pb::Scheduler::Stub::UndrainNode, request, &node, "undrain " + node_id);
    }
    if (!s.ok()) return Fail(s);
    json ? (void)std::printf("%s\n", Json(node).c_str())
         : (void)std::printf("%s %s (%d device(s) in use)\n", node.id().c_str(),
                             llamad::scheduler::NodeStateName(node.state()).c_str(), node.devices_in_use());
    return 0;
  }
  return 2;
}
