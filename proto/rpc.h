// What every side of the control plane shares about its RPCs: the bearer token, TLS
// credentials, dialling, and the one place absl::Status becomes grpc::Status.
// Free of protobuf: llama-train links it, and llama-train also links SentencePiece,
// whose library carries its own copy of protobuf-lite that must not meet libprotobuf.
#pragma once

#include <grpcpp/channel.h>
#include <grpcpp/client_context.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>
#include <grpcpp/support/status.h>

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace llamad::rpc {

// Reads the bearer token in `path`; creates it (32 random bytes as hex, mode 0600, its
// folder 0700) when absent. Refuses a token file that others can read.
absl::StatusOr<std::string> LoadOrCreateToken(const std::string& path);

// Reads an existing token file (clients). NOT_FOUND names the path when it is absent.
absl::StatusOr<std::string> ReadToken(const std::string& path);

// Certificate files. All empty: plain TCP. cert+key: TLS. cert+key+ca on a server:
// mutual TLS (clients must present a certificate signed by ca). On a client, ca
// verifies the server and cert+key are its own certificate for mutual TLS.
struct TlsFiles {
  std::string ca;
  std::string cert;
  std::string key;
  bool enabled() const { return !ca.empty() || !cert.empty(); }
};

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls);

// A channel to "host:port" (not connected yet: the first call connects).
absl::StatusOr<std::shared_ptr<grpc::Channel>> Dial(const std::string& address, const TlsFiles& tls);

// Adds the token to a call and sets its deadline (milliseconds from now; 0 = none).
void PrepareCall(grpc::ClientContext& context, const std::string& token, int64_t deadline_ms);

// OK when the call carries `authorization: Bearer <token>`; UNAUTHENTICATED otherwise.
grpc::Status CheckToken(const grpc::ServerContext& context, const std::string& token);

// A node's name, as it registers with the scheduler and as `llamactl nodes` and log lines
// show it: 1 to kMaxNodeIdLength letters, digits, '.', '-' or '_', what a host name (the
// default name) holds. INVALID_ARGUMENT says which rule `id` breaks.
inline constexpr size_t kMaxNodeIdLength = 253;
absl::Status CheckNodeId(std::string_view id);

// What else a node says of itself when it registers: its host name (shown as given, so at
// most kMaxNodeIdLength bytes and no control characters; empty when unknown) and its
// device kind, "cuda" or "cpu". INVALID_ARGUMENT names the field and what is wrong.
absl::Status CheckNodeDescription(std::string_view hostname, std::string_view device_kind);
inline bool IsDeviceKind(std::string_view kind) { return kind == "cuda" || kind == "cpu"; }

// absl::Status -> grpc::Status with the same code and message.
grpc::Status ToGrpc(const absl::Status& status);

// grpc::Status -> absl::Status, prefixed with what was being done.
absl::Status FromGrpc(const grpc::Status& status, const std::string& what);

}  // namespace llamad::rpc
