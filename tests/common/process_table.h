// Which processes are alive, read from /proc/<pid>/stat: name, state and parent. The
// stat file stays readable while a process maps memory; its command line (what
// `pgrep -f` reads) can briefly read as empty then, which makes pgrep miss it.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace llamad::testing {

// Whether `pid` is a process named `name` that has not exited (zombies do not count);
// sets *ppid to its parent.
inline bool IsLiveProcess(pid_t pid, const std::string& name, pid_t* ppid = nullptr) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  // pid (comm) state ppid ...; comm may hold spaces and parentheses, so take the last ')'.
  const size_t open = line.find('('), close = line.rfind(')');
  if (open == std::string::npos || close == std::string::npos || close < open) return false;
  std::istringstream rest(line.substr(close + 1));
  char state = 0;
  pid_t parent = 0;
  rest >> state >> parent;
  if (ppid != nullptr) *ppid = parent;
  return line.substr(open + 1, close - open - 1) == name && state != 'Z';
}

// Live processes named `name` whose parent is one of `parents`.
inline std::vector<pid_t> LiveChildren(const std::set<pid_t>& parents, const std::string& name) {
  std::vector<pid_t> pids;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc", ec)) {
    const std::string file = entry.path().filename().string();
    if (file.empty() || file.find_first_not_of("0123456789") != std::string::npos) continue;
    pid_t ppid = 0;
    const pid_t pid = std::stoi(file);
    if (IsLiveProcess(pid, name, &ppid) && parents.contains(ppid)) pids.push_back(pid);
  }
  return pids;
}

// The process of rank `rank` that the `llama-train --nproc` launcher `launcher` runs (the
// child whose environment says LLAMAD_RANK=rank), or -1.
inline pid_t LaunchedRank(pid_t launcher, int rank) {
  for (pid_t pid : LiveChildren({launcher}, "llama-train")) {
    std::ifstream environ("/proc/" + std::to_string(pid) + "/environ", std::ios::binary);
    for (std::string entry; std::getline(environ, entry, '\0');) {
      if (entry == "LLAMAD_RANK=" + std::to_string(rank)) return pid;
    }
  }
  return -1;
}

}  // namespace llamad::testing
