// A child process for tests: /bin/sh -c COMMAND with stdout and stderr on one pipe,
// read line by line, killed or waited for.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>

namespace llamad::testing {

class Subprocess {
 public:
  explicit Subprocess(const std::string& command) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      execl("/bin/sh", "sh", "-c", ("exec " + command).c_str(), nullptr);
      _exit(127);
    }
    close(fds[1]);
    fd_ = fds[0];
  }
  ~Subprocess() {
    if (pid_ > 0 && !exited_) {
      Kill(SIGKILL);
      Wait();
    }
    if (fd_ >= 0) close(fd_);
  }

  // The next output line (without '\n'), or nullopt at end of output or after
  // `timeout_s` seconds.
  std::optional<std::string> ReadLine(double timeout_s = 60) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
    while (true) {
      const size_t nl = buffer_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buffer_.substr(0, nl);
        buffer_.erase(0, nl + 1);
        output_ += line + "\n";
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, int(left.count())) <= 0) continue;
      char chunk[4096];
      const ssize_t n = read(fd_, chunk, sizeof(chunk));
      if (n <= 0) {
        if (buffer_.empty()) return std::nullopt;
        buffer_ += '\n';
        continue;
      }
      buffer_.append(chunk, size_t(n));
    }
  }
  // Reads everything left (each line within `timeout_s`); returns all output read so far.
  const std::string& Drain(double timeout_s = 60) {
    while (ReadLine(timeout_s)) {
    }
    return output_;
  }
  pid_t pid() const { return pid_; }
  // Everything ReadLine has returned so far.
  const std::string& output() const { return output_; }
  void Kill(int signal) {
    if (pid_ > 0) kill(pid_, signal);
  }
  // Waits for the exit; returns the exit code, or 128 + signal.
  int Wait() {
    int status = 0;
    waitpid(pid_, &status, 0);
    exited_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  bool exited_ = false;
  std::string buffer_, output_;
};

// Runs `command` to its end: its exit code (or 128 + signal) and everything it printed.
struct CommandResult {
  int exit_code;
  std::string output;  // stdout and stderr
};
inline CommandResult RunCommand(const std::string& command) {
  Subprocess p(command);
  p.Drain(/*timeout_s=*/900);
  return {p.Wait(), p.output()};
}

}  // namespace llamad::testing
