// A last resort around a call that may never return (ncclCommAbort waits for GPU work
// that may hang): the process ends with a given status unless the guard is destroyed
// within its limit. For where nothing else can end the wait: the caller holds what any
// other way out would need.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

namespace llamad {

class ExitUnlessDoneWithin {
 public:
  // Past `limit`, prints "llama-train: <message> (not done in <limit> s): exiting" and
  // ends the process with `exit_code` (no destructors run: other threads may hold locks).
  // Where no thread can be started to watch the limit (a process short of threads or
  // memory, as it may be on the failure paths this guards), it ends at once, with the same
  // status: nothing else could end the wait.
  ExitUnlessDoneWithin(std::chrono::milliseconds limit, int exit_code, const std::string& message) {
    try {
      thread_ = std::thread([this, limit, exit_code, message] {
        std::unique_lock lock(mu_);
        if (!done_cv_.wait_for(lock, limit, [&] { return done_; })) Exit(exit_code, message, limit, nullptr);
      });
    } catch (const std::exception& e) {  // system_error from the thread, bad_alloc before it
      Exit(exit_code, message, limit, e.what());
    }
  }
  ExitUnlessDoneWithin(const ExitUnlessDoneWithin&) = delete;
  ExitUnlessDoneWithin& operator=(const ExitUnlessDoneWithin&) = delete;
  ~ExitUnlessDoneWithin() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    done_cv_.notify_all();
    thread_.join();
  }

 private:
  // Prints why (past the limit, or `cannot_watch` it) and ends the process. Formats
  // nothing on the heap: memory may be what ran out.
  [[noreturn]] static void Exit(int exit_code, const std::string& message, std::chrono::milliseconds limit,
                                const char* cannot_watch) {
    const double seconds = std::chrono::duration<double>(limit).count();
    if (cannot_watch == nullptr) {
      std::fprintf(stderr, "llama-train: %s (not done in %.1f s): exiting\n", message.c_str(), seconds);
    } else {
      std::fprintf(stderr, "llama-train: %s (cannot watch the %.1f s limit: %s): exiting\n", message.c_str(), seconds,
                   cannot_watch);
    }
    std::fflush(stderr);
    std::_Exit(exit_code);
  }

  std::mutex mu_;
  std::condition_variable done_cv_;
  bool done_ = false;
  std::thread thread_;  // started in the constructor, once the members above exist
};

}  // namespace llamad
