// One helper thread that runs posted tasks one at a time, in the order they were posted.
//
// Data parallelism overlaps collectives with compute by running them here: every rank
// posts its collectives in the same program order, so they reach the communicator in the
// same order on every rank, and no two of them ever run at once on one rank.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>

namespace llamad {

class SerialWorker {
 public:
  SerialWorker() : thread_([this] { Run(); }) {}
  // Runs what was posted, then stops.
  ~SerialWorker() {
    {
      std::lock_guard lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  SerialWorker(const SerialWorker&) = delete;
  SerialWorker& operator=(const SerialWorker&) = delete;

  // Queues `task`; the future is ready once it ran (and rethrows what it threw).
  std::shared_future<void> Post(std::function<void()> task) {
    std::packaged_task<void()> packaged(std::move(task));
    std::shared_future<void> done = packaged.get_future().share();
    {
      std::lock_guard lock(mu_);
      tasks_.push_back(std::move(packaged));
    }
    cv_.notify_one();
    return done;
  }

 private:
  void Run() {
    std::unique_lock lock(mu_);
    while (true) {
      cv_.wait(lock, [&] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and nothing left
      std::packaged_task<void()> task = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      task();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<void()>> tasks_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the rest exists
};

}  // namespace llamad
