#pragma once
// The running program's own executable, for re-exec and for finding sibling binaries.
#include <filesystem>
#include <string>
#include <system_error>

namespace llamad {

// The resolved path of this process's executable. Exec'ing it by this path rather than
// through the /proc/self/exe link keeps the program's name: the kernel names a process
// after the file it execs, so the link would show every rerun as "exe" in ps and pgrep.
inline std::string SelfExecutable() {
  std::error_code ec;
  const std::filesystem::path path = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("/proc/self/exe") : path.string();
}

}  // namespace llamad
