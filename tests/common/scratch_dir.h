// A folder of this test process's own in the temp directory, removed when the process
// exits normally, so that what the tests write there does not pile up run after run.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <string>

namespace llamad::testing {

// TMP/<prefix>-<pid>, created on first use.
inline std::filesystem::path ScratchDir(const std::string& prefix) {
  struct Removed {
    std::filesystem::path path;
    ~Removed() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static std::mutex mu;
  static std::map<std::string, Removed> dirs;
  std::lock_guard lock(mu);
  auto [it, fresh] = dirs.try_emplace(prefix);
  if (fresh) {
    it->second.path = std::filesystem::temp_directory_path() / (prefix + "-" + std::to_string(::getpid()));
  }
  std::filesystem::create_directories(it->second.path);
  return it->second.path;
}

}  // namespace llamad::testing
