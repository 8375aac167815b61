#include "daemon/rendezvous_wire.h"

namespace llamad::daemon::wire {
namespace {

// Wire types of the protobuf encoding.
constexpr int kVarint = 0;
constexpr int kLengthDelimited = 2;

void PutVarint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(char((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(char(v));
}

void PutTag(std::string& out, int field, int wire_type) { PutVarint(out, uint64_t(field) << 3 | wire_type); }

void PutBytes(std::string& out, int field, const std::string& bytes) {
  PutTag(out, field, kLengthDelimited);
  PutVarint(out, bytes.size());
  out += bytes;
}

void PutInt64(std::string& out, int field, int64_t v) {
  if (v == 0) return;  // proto3 leaves defaults out
  PutTag(out, field, kVarint);
  PutVarint(out, uint64_t(v));
}

bool GetVarint(const std::string& in, size_t& pos, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64 && pos < in.size(); shift += 7) {
    const uint8_t byte = uint8_t(in[pos++]);
    v |= uint64_t(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

std::string Scope(const std::string& job_id, int64_t generation) {
  std::string scope;
  if (!job_id.empty()) PutBytes(scope, 1, job_id);
  PutInt64(scope, 2, generation);
  return scope;
}

}  // namespace

std::string EncodeSetRequest(const std::string& job_id, int64_t generation, const std::string& key,
                             const std::string& value) {
  std::string out;
  PutBytes(out, 1, Scope(job_id, generation));
  if (!key.empty()) PutBytes(out, 2, key);
  if (!value.empty()) PutBytes(out, 3, value);
  return out;
}

std::string EncodeGetRequest(const std::string& job_id, int64_t generation, const std::vector<std::string>& keys,
                             int64_t timeout_ms) {
  std::string out;
  PutBytes(out, 1, Scope(job_id, generation));
  for (const std::string& key : keys) PutBytes(out, 2, key);
  PutInt64(out, 3, timeout_ms);
  return out;
}

std::optional<std::vector<std::string>> DecodeGetResponse(const std::string& bytes) {
  std::vector<std::string> values;
  size_t pos = 0;
  while (pos < bytes.size()) {
    uint64_t tag = 0, length = 0;
    if (!GetVarint(bytes, pos, tag)) return std::nullopt;
    const int wire_type = int(tag & 7);
    if (wire_type == kVarint) {
      if (!GetVarint(bytes, pos, length)) return std::nullopt;
      continue;  // an unknown scalar field of a newer scheduler
    }
    if (wire_type != kLengthDelimited || !GetVarint(bytes, pos, length) || length > bytes.size() - pos) {
      return std::nullopt;
    }
    if ((tag >> 3) == 1) values.push_back(bytes.substr(pos, length));
    pos += length;
  }
  return values;
}

}  // namespace llamad::daemon::wire
