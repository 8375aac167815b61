// The workers' side of the Rendezvous service: registers the "grpc" scheme with the
// engine, so that a rank started by llamad with
//   LLAMAD_RENDEZVOUS=grpc://<scheduler host:port>/<job>/<generation>
// meets its peers through the scheduler. The token comes from LLAMAD_TOKEN_FILE and
// TLS files from LLAMAD_TLS_CA/CERT/KEY. Linked whole into llama-train.
#include <fmt/format.h>

#include <cstdlib>
#include <optional>
#include <string_view>

#include <grpcpp/completion_queue.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/support/byte_buffer.h>

#include "comm/communicator.h"
#include "core/strings.h"
#include "daemon/rendezvous_wire.h"
#include "proto/rpc.h"

namespace llamad::daemon {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Unary calls through gRPC's generic stub with the hand-encoded messages.
class GrpcRendezvousStore final : public RendezvousStore {
 public:
  GrpcRendezvousStore(std::shared_ptr<grpc::Channel> channel, std::string token, std::string job_id,
                      int64_t generation)
      : stub_(std::move(channel)), token_(std::move(token)), job_id_(std::move(job_id)), generation_(generation) {}

  absl::Status Set(const std::string& key, const std::string& value) override {
    std::string reply;
    return Call("/llamad.v1.Rendezvous/Set", wire::EncodeSetRequest(job_id_, generation_, key, value), 30'000,
                &reply, "rendezvous set " + key);
  }

  absl::StatusOr<std::vector<std::string>> Get(const std::vector<std::string>& keys,
                                               std::chrono::milliseconds timeout) override {
    std::string reply;
    auto s = Call("/llamad.v1.Rendezvous/Get", wire::EncodeGetRequest(job_id_, generation_, keys, timeout.count()),
                  timeout.count() + 10'000, &reply, "rendezvous get");
    if (!s.ok()) return s;
    auto values = wire::DecodeGetResponse(reply);
    if (!values || values->size() != keys.size()) {
      return absl::DataLossError("rendezvous get: the scheduler's answer is not a RendezvousGetResponse");
    }
    return *values;
  }

 private:
  absl::Status Call(const std::string& method, const std::string& request, int64_t deadline_ms, std::string* reply,
                    const std::string& what) {
    grpc::ClientContext context;
    rpc::PrepareCall(context, token_, deadline_ms);
    grpc::Slice slice(request);
    grpc::ByteBuffer request_buffer(&slice, 1), reply_buffer;
    grpc::CompletionQueue queue;
    grpc::Status status;
    auto call = stub_.PrepareUnaryCall(&context, method, request_buffer, &queue);
    call->StartCall();
    call->Finish(&reply_buffer, &status, reinterpret_cast<void*>(1));
    void* tag = nullptr;
    bool ok = false;
    queue.Next(&tag, &ok);
    queue.Shutdown();
    while (queue.Next(&tag, &ok)) {
    }
    if (!status.ok()) return rpc::FromGrpc(status, what);
    std::vector<grpc::Slice> slices;
    if (!reply_buffer.Dump(&slices).ok()) return absl::DataLossError(what + ": unreadable answer");
    reply->clear();
    for (const grpc::Slice& s : slices) reply->append(reinterpret_cast<const char*>(s.begin()), s.size());
    return absl::OkStatus();
  }

  grpc::GenericStub stub_;
  std::string token_;
  std::string job_id_;
  int64_t generation_;
};

// grpc://ADDRESS/job/generation, ADDRESS as the node agent dials the scheduler (which
// may hold '/' itself: dns:///host:port), so the job and generation are read from the end.
absl::StatusOr<std::unique_ptr<RendezvousStore>> MakeGrpcStore(const std::string& address) {
  const std::string rest = address.substr(address.find("://") + 3);
  const size_t gen_at = rest.rfind('/');
  const size_t job_at = gen_at == std::string::npos || gen_at == 0 ? std::string::npos : rest.rfind('/', gen_at - 1);
  if (job_at == std::string::npos || job_at == 0) {
    return absl::InvalidArgumentError(fmt::format("rendezvous {}: expected grpc://HOST:PORT/JOB/GENERATION", address));
  }
  const std::string job_id = rest.substr(job_at + 1, gen_at - job_at - 1);
  const std::optional<int64_t> generation = ParseInt64(std::string_view(rest).substr(gen_at + 1));
  if (!generation) {
    return absl::InvalidArgumentError(fmt::format("rendezvous {}: the generation is not a whole number", address));
  }
  auto token = rpc::ReadToken(Env("LLAMAD_TOKEN_FILE"));
  if (!token.ok()) return token.status();
  auto channel = rpc::Dial(rest.substr(0, job_at), {Env("LLAMAD_TLS_CA"), Env("LLAMAD_TLS_CERT"), Env("LLAMAD_TLS_KEY")});
  if (!channel.ok()) return channel.status();
  return std::unique_ptr<RendezvousStore>(new GrpcRendezvousStore(*channel, *token, job_id, *generation));
}

const bool registered = [] {
  RegisterRendezvousScheme("grpc", MakeGrpcStore);
  return true;
}();

}  // namespace
}  // namespace llamad::daemon
