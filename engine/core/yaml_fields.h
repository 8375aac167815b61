// Typed, path-aware reading of YAML mappings for configs: every error names the key path
// and the offending value, and unknown keys (typos) are refused with a suggestion.
#pragma once

#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace llamad {

// The known key closest to `key` by edit distance, or "" when none is close.
std::string ClosestKey(std::string_view key, const std::vector<std::string>& known);

// Reads the scalar fields of one YAML mapping. Errors accumulate; Finish() returns the
// first one (or an unknown-key error). Not thread-safe; cheap to construct.
class YamlSection {
 public:
  // `node` is the mapping (null or undefined: empty); `path` is the dotted key path of `node` used in
  // messages ("" for the document root); `source` names the file.
  YamlSection(const YAML::Node& node, std::string source, std::string path);

  // Each Get reads `key` into *out when present (leaving *out untouched otherwise) and
  // returns whether it was present. A value of the wrong type is an error.
  bool Get(std::string_view key, int64_t* out);
  bool Get(std::string_view key, uint64_t* out);
  bool Get(std::string_view key, double* out);
  bool Get(std::string_view key, bool* out);
  bool Get(std::string_view key, std::string* out);
  // Marks `key` as known without reading it (sections handled by another reader).
  void Allow(std::string_view key);
  // The full path of `key` for messages: "training.batch_size".
  std::string PathOf(std::string_view key) const;
  // Records a validation error about `key`.
  void Fail(std::string_view key, std::string_view message);
  // OK, or the first error; unknown keys are errors naming the closest known key.
  absl::Status Finish();

 private:
  std::optional<YAML::Node> Find(std::string_view key);
  void TypeError(std::string_view key, const YAML::Node& value, std::string_view expected);

  YAML::Node node_;  // A handle (cheap to copy).
  std::string source_;
  std::string path_;
  std::vector<std::string> known_;
  absl::Status status_;
};

// "file: message" — the prefix every config error carries.
absl::Status ConfigError(std::string_view source, std::string_view message);

}  // namespace llamad
