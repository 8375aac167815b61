// The NVMe tier against fio on the same disk, with the same block size and queue depth,
// in the same run: sequential write and read of a swap file (io_uring, O_DIRECT), the
// update pass the optimizer runs (read ahead, update, write behind), and AdamW over
// moments streamed from the swap next to AdamW over moments in memory.
//
//   bench-nvme [--dir DIR] [--size-mb 2048] [--block-kb 1024] [--queue-depth 32]
//              [--chunk-mb 64] [--runs 3]
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "offload/swap_file.h"

namespace {
namespace fs = std::filesystem;
using llamad::offload::SwapFile;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }
double MiBps(double bytes, double seconds) { return bytes / double(1 << 20) / seconds; }

// fio's bandwidth (MiB/s) for `rw` (write or read) with io_uring, direct I/O, the same
// block size and queue depth, on a file of the same size in the same folder.
double Fio(const std::string& rw, const fs::path& dir, size_t bytes, size_t block, int depth) {
  const fs::path file = dir / "bench-nvme-fio.tmp";
  const std::string command = "fio --name=llamad --output-format=json --ioengine=io_uring --direct=1 --rw=" + rw +
                              " --bs=" + std::to_string(block) + " --iodepth=" + std::to_string(depth) +
                              " --size=" + std::to_string(bytes) + " --filename=" + file.string() + " 2>/dev/null";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(::popen(command.c_str(), "r"), &::pclose);
  std::string out;
  std::array<char, 4096> buffer;
  while (pipe && std::fgets(buffer.data(), int(buffer.size()), pipe.get()) != nullptr) out += buffer.data();
  auto json = nlohmann::json::parse(out, nullptr, false);
  if (!json.is_object() || !json.contains("jobs")) return 0;
  return json["jobs"][0][rw == "write" ? "write" : "read"].value("bw_bytes", 0.0) / double(1 << 20);
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> opt = {{"dir", fs::temp_directory_path().string()},
                                            {"size-mb", "2048"},
                                            {"block-kb", "1024"},
                                            {"queue-depth", "32"},
                                            {"chunk-mb", "64"},
                                            {"runs", "3"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = std::string(argv[i]).substr(2);
    if (!std::string(argv[i]).starts_with("--") || !opt.contains(key)) {
      std::fprintf(stderr, "bench-nvme: unknown flag %s\n", argv[i]);
      return 2;
    }
    opt[key] = argv[i + 1];
  }
  const size_t bytes = size_t(std::stoll(opt["size-mb"])) << 20;
  llamad::offload::SwapOptions options;
  options.block_bytes = size_t(std::stoll(opt["block-kb"])) << 10;
  options.queue_depth = std::stoi(opt["queue-depth"]);
  options.chunk_bytes = size_t(std::stoll(opt["chunk-mb"])) << 20;
  const int runs = std::max(1, std::stoi(opt["runs"]));
  auto swap = SwapFile::Create(opt["dir"], bytes, options);
  if (!swap.ok()) {
    std::fprintf(stderr, "bench-nvme: %s\n", std::string(swap.status().message()).c_str());
    return 1;
  }
  std::printf("NVMe tier: %s MiB swap in %s, %s KiB requests, queue depth %s, %s MiB chunks; %d runs, medians\n",
              opt["size-mb"].c_str(), opt["dir"].c_str(), opt["block-kb"].c_str(), opt["queue-depth"].c_str(),
              opt["chunk-mb"].c_str(), runs);

  auto fill = [&](size_t c, char* data) { std::memset(data, int(c), (*swap)->chunk_size(c)); };
  auto touch = [&](size_t, char* data) { data[0] ^= 1; };
  std::vector<double> write, read, update, fio_write, fio_read;
  for (int r = 0; r < runs; ++r) {
    auto t = Clock::now();
    if (!(*swap)->Stream(fill, SwapFile::Mode::kWrite).ok()) return 1;
    write.push_back(MiBps(double(bytes), Seconds(t)));
    t = Clock::now();
    if (!(*swap)->Stream(touch, SwapFile::Mode::kRead).ok()) return 1;
    read.push_back(MiBps(double(bytes), Seconds(t)));
    t = Clock::now();
    if (!(*swap)->Stream(touch, SwapFile::Mode::kUpdate).ok()) return 1;
    update.push_back(MiBps(double(bytes), Seconds(t)));  // bytes read (and as many written)
    fio_write.push_back(Fio("write", opt["dir"], bytes, options.block_bytes, options.queue_depth));
    fio_read.push_back(Fio("read", opt["dir"], bytes, options.block_bytes, options.queue_depth));
  }
  std::error_code ec;
  fs::remove(fs::path(opt["dir"]) / "bench-nvme-fio.tmp", ec);
  const double fw = Median(fio_write), fr = Median(fio_read);
  std::printf("%-34s %10s %10s\n", "", "MiB/s", "of fio");
  std::printf("%-34s %10.0f %9.0f%%\n", "swap write (sequential)", Median(write), fw > 0 ? 100 * Median(write) / fw : 0);
  std::printf("%-34s %10.0f %9.0f%%\n", "swap read (sequential)", Median(read), fr > 0 ? 100 * Median(read) / fr : 0);
  std::printf("%-34s %10.0f %10s\n", "swap update pass (read + write)", Median(update), "");
  std::printf("%-34s %10.0f\n", "fio write (io_uring, direct)", fw);
  std::printf("%-34s %10.0f\n", "fio read (io_uring, direct)", fr);
  if (fw == 0 || fr == 0) std::printf("(fio did not run: install fio for the comparison)\n");

  // AdamW over the swap: the moments of `elements` parameters streamed through memory,
  // against the same update with the moments in memory.
  const size_t elements = bytes / 2 / sizeof(float);
  auto backend = llamad::MakeCpuBackend({llamad::DType::kF32, 0});
  std::vector<float> params(elements, 0.5f), grads(elements, 0.01f), m(elements), v(elements);
  const llamad::AdamWStep step{1e-4, 0.9, 0.95, 1e-8, 0.1, 1, 1.0};
  auto t = Clock::now();
  backend->AdamW(params.data(), nullptr, grads.data(), m.data(), v.data(), elements, step);
  const double in_memory = Seconds(t);
  const size_t per_chunk = (*swap)->chunk_bytes() / 2 / sizeof(float);
  t = Clock::now();
  auto s = (*swap)->Stream([&](size_t c, char* data) {
    const size_t lo = c * per_chunk, count = std::min(per_chunk, elements - std::min(elements, lo));
    if (count == 0) return;
    float* cm = reinterpret_cast<float*>(data);
    backend->AdamW(params.data() + lo, nullptr, grads.data() + lo, cm, cm + per_chunk, count, step);
  });
  if (!s.ok()) return 1;
  const double streamed = Seconds(t);
  std::printf("AdamW over %.0fM parameters: moments in memory %.3f s, streamed from the swap %.3f s (%.0f MiB/s "
              "of moments each way)\n",
              double(elements) / 1e6, in_memory, streamed, MiBps(double(bytes), streamed));
  return 0;
}
