// The losses llama-train printed with --log-format json, by step.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace llamad::testing {

// step -> loss of the JSON lines in `output` (other lines are skipped).
inline std::map<int64_t, double> StepLosses(const std::string& output) {
  std::map<int64_t, double> out;
  std::istringstream in(output);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] != '{') continue;
    const auto j = nlohmann::json::parse(line);
    out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}

}  // namespace llamad::testing
