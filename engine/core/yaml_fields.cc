#include "core/yaml_fields.h"

#include <algorithm>
#include <charconv>
#include <cmath>

#include "core/strings.h"

namespace llamad {
namespace {

size_t EditDistance(std::string_view a, std::string_view b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string Quote(const YAML::Node& value) {
  if (value.IsScalar()) return StrCat("'", value.Scalar(), "'");
  if (value.IsSequence()) return "a list";
  if (value.IsMap()) return "a mapping";
  return "nothing";
}

}  // namespace

std::string ClosestKey(std::string_view key, const std::vector<std::string>& known) {
  std::string best;
  size_t best_distance = std::max<size_t>(2, key.size() / 3) + 1;
  for (const auto& k : known) {
    const size_t d = EditDistance(key, k);
    if (d < best_distance) best_distance = d, best = k;
  }
  return best;
}

absl::Status ConfigError(std::string_view source, std::string_view message) {
  return absl::InvalidArgumentError(StrCat(source, ": ", message));
}

YamlSection::YamlSection(const YAML::Node& node, std::string source, std::string path)
    : node_(node), source_(std::move(source)), path_(std::move(path)) {
  if (node_ && !node_.IsNull() && !node_.IsMap()) {
    status_ = ConfigError(source_, StrCat(path_.empty() ? "the document" : path_,
                                                ": expected a mapping of keys, got ", Quote(node_)));
  }
}

std::string YamlSection::PathOf(std::string_view key) const {
  return path_.empty() ? std::string(key) : StrCat(path_, ".", key);
}

void YamlSection::Fail(std::string_view key, std::string_view message) {
  if (status_.ok()) status_ = ConfigError(source_, StrCat(PathOf(key), ": ", message));
}

void YamlSection::TypeError(std::string_view key, const YAML::Node& value,
                            std::string_view expected) {
  Fail(key, StrCat("expected ", expected, ", got ", Quote(value)));
}

void YamlSection::Allow(std::string_view key) { known_.emplace_back(key); }

std::optional<YAML::Node> YamlSection::Find(std::string_view key) {
  known_.emplace_back(key);
  if (!node_ || !node_.IsMap()) return std::nullopt;
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    if (it->first.IsScalar() && it->first.Scalar() == key) return it->second;
  }
  return std::nullopt;
}

bool YamlSection::Get(std::string_view key, int64_t* out) {
  const std::optional<YAML::Node> v = Find(key);
  if (!v) return false;
  const std::string& s = v->IsScalar() ? v->Scalar() : std::string();
  const std::optional<int64_t> value = ParseInt64(s);
  if (!v->IsScalar() || !value) {
    // Accept integral floats written in exponent form ("1e6").
    double d = 0;
    auto [dend, dec] = std::from_chars(s.data(), s.data() + s.size(), d);
    if (v->IsScalar() && dec == std::errc() && dend == s.data() + s.size() && std::isfinite(d) &&
        d == std::floor(d) && std::fabs(d) < 9.0e18) {
      *out = static_cast<int64_t>(d);
      return true;
    }
    TypeError(key, *v, "an integer");
    return true;
  }
  *out = *value;
  return true;
}

bool YamlSection::Get(std::string_view key, uint64_t* out) {
  int64_t value = static_cast<int64_t>(*out);
  if (!Get(key, &value)) return false;
  if (value < 0) {
    Fail(key, StrCat("must not be negative, got ", value));
    return true;
  }
  *out = static_cast<uint64_t>(value);
  return true;
}

bool YamlSection::Get(std::string_view key, double* out) {
  const std::optional<YAML::Node> v = Find(key);
  if (!v) return false;
  const std::string& s = v->IsScalar() ? v->Scalar() : std::string();
  double value = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (!v->IsScalar() || ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) {
    TypeError(key, *v, "a finite number");
    return true;
  }
  *out = value;
  return true;
}

bool YamlSection::Get(std::string_view key, bool* out) {
  const std::optional<YAML::Node> v = Find(key);
  if (!v) return false;
  const std::string s = v->IsScalar() ? v->Scalar() : std::string();
  if (s == "true" || s == "True" || s == "yes" || s == "on") {
    *out = true;
  } else if (s == "false" || s == "False" || s == "no" || s == "off") {
    *out = false;
  } else {
    TypeError(key, *v, "true or false");
  }
  return true;
}

bool YamlSection::Get(std::string_view key, std::string* out) {
  const std::optional<YAML::Node> v = Find(key);
  if (!v) return false;
  if (!v->IsScalar()) {
    TypeError(key, *v, "a string");
    return true;
  }
  *out = v->Scalar();
  return true;
}

absl::Status YamlSection::Finish() {
  if (!status_.ok()) return status_;
  if (!node_ || !node_.IsMap()) return absl::OkStatus();
  for (auto it = node_.begin(); it != node_.end(); ++it) {
    const std::string key = it->first.IsScalar() ? it->first.Scalar() : "?";
    if (std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
    std::string message = StrCat("unknown key '", PathOf(key), "'");
    const std::string hint = ClosestKey(key, known_);
    if (!hint.empty()) StrAppend(&message, " (did you mean '", PathOf(hint), "'?)");
    return ConfigError(source_, message);
  }
  return absl::OkStatus();
}

}  // namespace llamad
