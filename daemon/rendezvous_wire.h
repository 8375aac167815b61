// The Rendezvous service's messages in protobuf wire format, encoded by hand. The
// workers' client (llama-train) cannot link libprotobuf: libsentencepiece carries its
// own protobuf-lite and the two clash at load time. proto/llamad/v1/llamad.proto stays
// the contract; tests check these bytes against the generated classes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace llamad::daemon::wire {

// RendezvousSetRequest{scope{job_id, generation}, key, value}
std::string EncodeSetRequest(const std::string& job_id, int64_t generation, const std::string& key,
                             const std::string& value);
// RendezvousGetRequest{scope{job_id, generation}, keys, timeout_ms}
std::string EncodeGetRequest(const std::string& job_id, int64_t generation, const std::vector<std::string>& keys,
                             int64_t timeout_ms);
// RendezvousGetResponse{values}; nullopt when the bytes are not such a message.
std::optional<std::vector<std::string>> DecodeGetResponse(const std::string& bytes);

}  // namespace llamad::daemon::wire
