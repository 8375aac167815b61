// The losses llama-train printed with --log-format json, by step, and its step lines as
// they come.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "common/subprocess.h"

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

// Reads `p`'s output up to the step line of step `step` or later; returns that step (0
// when the output ends first).
inline int64_t ReadUpToStep(Subprocess& p, int64_t step) {
  while (auto line = p.ReadLine()) {
    if (line->empty() || (*line)[0] != '{') continue;
    if (const auto losses = StepLosses(*line); !losses.empty() && losses.begin()->first >= step) {
      return losses.begin()->first;
    }
  }
  return 0;
}

}  // namespace llamad::testing
