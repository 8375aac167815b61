#include "gpu_activity.h"

#include <cxxabi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>

namespace llamad {

std::string ShortKernelName(const char* raw) {
  if (raw == nullptr || *raw == '\0') return "?";
  std::string name = raw;
  int status = 0;
  if (char* demangled = abi::__cxa_demangle(raw, nullptr, nullptr, &status)) {
    if (status == 0) name = demangled;
    std::free(demangled);
  }
  // The argument list: the last balanced (...) group.
  if (name.back() == ')') {
    int depth = 0;
    for (size_t i = name.size(); i-- > 0;) {
      if (name[i] == ')') ++depth;
      if (name[i] == '(' && --depth == 0) {
        name.resize(i);
        break;
      }
    }
  }
  // The return type and qualifiers: up to the last space or "::" outside <...> and (...)
  // ("(anonymous namespace)::" holds a space of its own).
  int nesting = 0;
  size_t cut = 0;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (c == '<' || c == '(') ++nesting;
    if (c == '>' || c == ')') --nesting;
    if (nesting == 0 && c == ' ') cut = i + 1;
    if (nesting == 0 && name.compare(i, 2, "::") == 0) cut = i + 2;
  }
  name = name.substr(cut);
  return name.empty() ? "?" : name;
}

namespace {

// For the printed table: library kernels' names run long, and their ends say little.
std::string Clipped(const std::string& name, size_t longest = 64) {
  return name.size() > longest ? name.substr(0, longest - 3) + "..." : name;
}

}  // namespace

nlohmann::json SummarizeGpuActivity(std::vector<GpuActivity> activities, uint64_t begin_ns, uint64_t end_ns,
                                    const TimelineMarks& marks, int top_kernels, int top_gaps, uint64_t dropped) {
  end_ns = std::max(end_ns, begin_ns);
  std::vector<GpuActivity> seen;
  for (GpuActivity& a : activities) {
    if (a.end_ns <= begin_ns || a.start_ns >= end_ns || a.end_ns <= a.start_ns) continue;
    a.start_ns = std::max(a.start_ns, begin_ns);
    a.end_ns = std::min(a.end_ns, end_ns);
    seen.push_back(std::move(a));
  }
  std::stable_sort(seen.begin(), seen.end(),
                   [](const GpuActivity& a, const GpuActivity& b) { return a.start_ns < b.start_ns; });
  auto seconds = [](uint64_t ns) { return double(ns) * 1e-9; };

  // Busy: the union of the activities. Idle gaps lie between its stretches, and before
  // the first and after the last; each gap is named by the activity that ended last
  // before it and the one that starts it.
  struct Gap {
    uint64_t start, end;
    std::string after, before;
  };
  std::vector<Gap> gaps;
  uint64_t busy = 0, cursor = begin_ns, last_end = begin_ns;
  std::string last = "(start)";
  for (const GpuActivity& a : seen) {
    if (a.start_ns > cursor) gaps.push_back({cursor, a.start_ns, last, a.name});
    if (a.end_ns > cursor) {
      busy += a.end_ns - std::max(a.start_ns, cursor);
      cursor = a.end_ns;
    }
    if (a.end_ns >= last_end) {
      last_end = a.end_ns;
      last = a.name;
    }
  }
  if (end_ns > cursor) gaps.push_back({cursor, end_ns, last, "(end)"});

  std::map<std::string, double> by_kind;
  std::map<std::string, std::pair<double, int>> by_kernel;
  for (const GpuActivity& a : seen) {
    by_kind[a.kind] += seconds(a.end_ns - a.start_ns);
    if (a.kind == "kernel") {
      auto& [total, calls] = by_kernel[a.name];
      total += seconds(a.end_ns - a.start_ns);
      ++calls;
    }
  }
  std::vector<std::pair<std::string, std::pair<double, int>>> kernels(by_kernel.begin(), by_kernel.end());
  std::stable_sort(kernels.begin(), kernels.end(),
                   [](const auto& a, const auto& b) { return a.second.first > b.second.first; });

  constexpr uint64_t kCountedGapNs = 10'000;  // shorter ones are the spacing of launches
  int counted = 0;
  uint64_t counted_ns = 0;
  for (const Gap& g : gaps) {
    if (g.end - g.start >= kCountedGapNs) ++counted, counted_ns += g.end - g.start;
  }
  std::stable_sort(gaps.begin(), gaps.end(), [](const Gap& a, const Gap& b) { return a.end - a.start > b.end - b.start; });
  auto phase_at = [&](uint64_t t) {
    std::string phase = "-";
    for (const auto& [when, label] : marks) {
      if (when <= t) phase = label;
    }
    return phase;
  };

  nlohmann::json kernel_rows = nlohmann::json::array();
  for (size_t i = 0; i < kernels.size() && int(i) < top_kernels; ++i) {
    kernel_rows.push_back(
        {{"kernel", kernels[i].first}, {"s", kernels[i].second.first}, {"calls", kernels[i].second.second}});
  }
  nlohmann::json gap_rows = nlohmann::json::array();
  for (size_t i = 0; i < gaps.size() && int(i) < top_gaps; ++i) {
    const Gap& g = gaps[i];
    gap_rows.push_back({{"s", seconds(g.end - g.start)},
                        {"at_s", seconds(g.start - begin_ns)},
                        {"phase", phase_at(g.start)},
                        {"after", g.after},
                        {"before", g.before}});
  }
  return {{"wall_s", seconds(end_ns - begin_ns)},
          {"busy_s", seconds(busy)},
          {"idle_s", seconds(end_ns - begin_ns - busy)},
          {"activities", seen.size()},
          {"dropped", dropped},
          {"gaps_of_10us", counted},
          {"gaps_of_10us_s", seconds(counted_ns)},
          {"busy_by_kind_s", by_kind},
          {"kernels", kernel_rows},
          {"gaps", gap_rows}};
}

void PrintGpuActivitySummary(const nlohmann::json& s) {
  const double wall = s["wall_s"].get<double>(), busy = s["busy_s"].get<double>();
  std::printf("  GPU timeline: %.2f ms wall, busy %.2f ms (%.1f%%), idle %.2f ms; %d idle gaps of 10 us or more, "
              "%.2f ms together; %zu activities\n",
              1e3 * wall, 1e3 * busy, wall > 0 ? 100 * busy / wall : 0.0, 1e3 * s["idle_s"].get<double>(),
              s["gaps_of_10us"].get<int>(), 1e3 * s["gaps_of_10us_s"].get<double>(), s["activities"].get<size_t>());
  if (s.value("dropped", uint64_t{0}) > 0) {
    std::printf("  %llu records were dropped: the GPU was busier than shown\n",
                static_cast<unsigned long long>(s["dropped"].get<uint64_t>()));
  }
  std::printf("  busy by kind (each with its overlaps):");
  for (const auto& [kind, t] : s["busy_by_kind_s"].items()) std::printf(" %s %.2f ms", kind.c_str(), 1e3 * t.get<double>());
  std::printf("\n  %-64s %9s %6s\n", "kernel", "ms", "calls");
  for (const auto& k : s["kernels"]) {
    std::printf("  %-64s %9.2f %6d\n", Clipped(k["kernel"].get<std::string>()).c_str(), 1e3 * k["s"].get<double>(),
                k["calls"].get<int>());
  }
  std::printf("  %9s %9s  %-12s %s\n", "idle ms", "at ms", "host phase", "after -> before");
  for (const auto& g : s["gaps"]) {
    std::printf("  %9.3f %9.2f  %-12s %s -> %s\n", 1e3 * g["s"].get<double>(), 1e3 * g["at_s"].get<double>(),
                g["phase"].get<std::string>().c_str(), Clipped(g["after"].get<std::string>(), 48).c_str(),
                Clipped(g["before"].get<std::string>(), 48).c_str());
  }
}

}  // namespace llamad
