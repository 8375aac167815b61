// A peer that stops answering without dying, for the tests of collective timeouts.
#pragma once

#include <signal.h>

#include <chrono>
#include <string>

#include "common/process_table.h"
#include "common/subprocess.h"

namespace llamad::testing {

// Once the `llama-train --nproc 2` launcher `launcher` prints its first step line, stops
// its rank 1 with SIGSTOP (hung, or cut off with its connections still open) and reads
// on until the launcher says rank 0 exited as having lost a peer (75). Returns the
// seconds from the stop to that line, or -1 when it does not come within `limit_s`.
// Rank 1 is killed before returning; the launcher's output is launcher.output().
inline double SecondsUntilRank0LeavesAStoppedRank1(Subprocess& launcher, double limit_s) {
  bool running = false;
  while (auto line = launcher.ReadLine(120)) {
    if (line->starts_with("{")) {
      running = true;
      break;
    }
  }
  const pid_t rank1 = running ? LaunchedRank(launcher.pid(), 1) : -1;
  if (rank1 <= 0 || ::kill(rank1, SIGSTOP) != 0) return -1;
  const auto stopped = std::chrono::steady_clock::now();
  double seconds = -1;
  while (auto line = launcher.ReadLine(limit_s)) {
    if (line->find("rank 0 of 2 exited with code 75") != std::string::npos) {
      seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - stopped).count();
      break;
    }
  }
  ::kill(rank1, SIGKILL);
  launcher.Drain();
  launcher.Wait();
  return seconds;
}

}  // namespace llamad::testing
