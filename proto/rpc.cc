#include "proto/rpc.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/support/channel_arguments.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace llamad::rpc {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(what + " " + path + ": cannot open: " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string Trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// Constant-time comparison: the time taken does not tell how much of a guess matched.
bool SameSecret(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

}  // namespace

absl::StatusOr<std::string> ReadToken(const std::string& path) {
  auto text = ReadFile(path, "token file");
  if (!text.ok()) return text.status();
  std::string token = Trim(*text);
  if (token.empty()) return absl::InvalidArgumentError("token file " + path + " is empty");
  return token;
}

absl::StatusOr<std::string> LoadOrCreateToken(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    if ((st.st_mode & 077) != 0) {
      return absl::PermissionDeniedError("token file " + path +
                                         " is readable by other users; chmod 600 it (or remove it to make a new one)");
    }
    return ReadToken(path);
  }
  const std::filesystem::path folder = std::filesystem::path(path).parent_path();
  if (!folder.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(folder, ec);
    if (ec) return absl::InvalidArgumentError("token folder " + folder.string() + ": " + ec.message());
  }
  std::random_device random;
  std::string token;
  for (int i = 0; i < 32; ++i) {
    static constexpr char kHex[] = "0123456789abcdef";
    const unsigned byte = random() & 0xff;
    token += kHex[byte >> 4];
    token += kHex[byte & 15];
  }
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) {
    if (errno == EEXIST) return ReadToken(path);  // another process created it first
    return absl::InvalidArgumentError("token file " + path + ": cannot create: " + std::strerror(errno));
  }
  const std::string line = token + "\n";
  const bool ok = ::write(fd, line.data(), line.size()) == ssize_t(line.size()) && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok) return absl::InternalError("token file " + path + ": cannot write: " + std::strerror(errno));
  return token;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(const TlsFiles& tls) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  if (tls.cert.empty() || tls.key.empty()) {
    return absl::InvalidArgumentError("tls: a server needs both tls_cert and tls_key");
  }
  auto cert = ReadFile(tls.cert, "tls_cert");
  if (!cert.ok()) return cert.status();
  auto key = ReadFile(tls.key, "tls_key");
  if (!key.ok()) return key.status();
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (!tls.ca.empty()) {
    auto ca = ReadFile(tls.ca, "tls_ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  options.pem_key_cert_pairs.push_back({*key, *cert});
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> Dial(const std::string& address, const TlsFiles& tls) {
  if (address.empty() || address.find(':') == std::string::npos) {
    return absl::InvalidArgumentError("address '" + address + "' is not host:port");
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  // Pings while a call is open, so a long stream (WatchJob, a rendezvous wait) to a
  // scheduler that vanished without closing the connection fails instead of hanging.
  // The scheduler accepts a ping every 20 s (scheduler/server.cc).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30'000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
  // Connections of this channel alone: a channel dialled again (the node agent's, after
  // its scheduler stopped answering) must not inherit the old one's reconnect backoff.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  if (!tls.enabled()) return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  grpc::SslCredentialsOptions options;
  if (!tls.ca.empty()) {
    auto ca = ReadFile(tls.ca, "tls_ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
  }
  if (!tls.cert.empty()) {
    auto cert = ReadFile(tls.cert, "tls_cert");
    if (!cert.ok()) return cert.status();
    auto key = ReadFile(tls.key, "tls_key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::CreateCustomChannel(address, grpc::SslCredentials(options), args);
}

void PrepareCall(grpc::ClientContext& context, const std::string& token, int64_t deadline_ms) {
  context.AddMetadata("authorization", "Bearer " + token);
  if (deadline_ms > 0) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
  }
}

grpc::Status CheckToken(const grpc::ServerContext& context, const std::string& token) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string presented(it->second.data(), it->second.size());
  if (!SameSecret(presented, "Bearer " + token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the bearer token is not this scheduler's");
  }
  return grpc::Status::OK;
}

namespace {

// A byte as an error message shows it: itself when printable, else its value, since a
// control character would garble the message it is named in.
std::string ShownByte(unsigned char c) {
  char shown[8];
  std::snprintf(shown, sizeof(shown), c > 0x20 && c < 0x7f ? "'%c'" : "0x%02x", c);
  return shown;
}

}  // namespace

absl::Status CheckNodeId(std::string_view id) {
  if (id.empty()) return absl::InvalidArgumentError("node_id: must not be empty");
  if (id.size() > kMaxNodeIdLength) {
    return absl::InvalidArgumentError("node_id: " + std::to_string(id.size()) + " characters, more than the " +
                                      std::to_string(kMaxNodeIdLength) + " a node's name may have");
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    const bool allowed = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                         c == '-' || c == '_';
    if (!allowed) {
      return absl::InvalidArgumentError("node_id: character " + std::to_string(i + 1) + " is " + ShownByte(c) +
                                        "; a node's name holds only letters, digits, '.', '-' and '_'");
    }
  }
  return absl::OkStatus();
}

absl::Status CheckNodeDescription(std::string_view hostname, std::string_view device_kind) {
  if (hostname.size() > kMaxNodeIdLength) {
    return absl::InvalidArgumentError("hostname: " + std::to_string(hostname.size()) + " characters, more than the " +
                                      std::to_string(kMaxNodeIdLength) + " a host name may have");
  }
  for (size_t i = 0; i < hostname.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(hostname[i]);
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError("hostname: character " + std::to_string(i + 1) + " is " + ShownByte(c) +
                                        ", a control character");
    }
  }
  if (!IsDeviceKind(device_kind)) {
    return absl::InvalidArgumentError("device_kind: '" + std::string(device_kind.substr(0, 32)) +
                                      "' is neither \"cuda\" nor \"cpu\"");
  }
  return absl::OkStatus();
}

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpc(const grpc::Status& status, const std::string& what) {
  if (status.ok()) return absl::OkStatus();
  std::string message = status.error_message();
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE) {
    // A TLS mismatch (either side without TLS, or no client certificate for a scheduler
    // that requires one) shows up as a connection closed during its setup.
    const bool closed_in_setup = message.find("Socket closed") != std::string::npos ||
                                 message.find("andshake") != std::string::npos ||
                                 message.find("Connection reset") != std::string::npos ||
                                 message.find("SSL") != std::string::npos || message.find("ssl") != std::string::npos;
    message += closed_in_setup ? " (the connection was closed while it was set up: when the scheduler serves TLS, "
                                 "pass its CA with --tls-ca, and --tls-cert/--tls-key if it requires client "
                                 "certificates; when it does not, pass none of them)"
                               : " (is the scheduler running there?)";
  }
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), what + ": " + message);
}

}  // namespace llamad::rpc
