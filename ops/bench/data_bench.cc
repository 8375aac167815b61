// Data pipeline benchmark: tokenisation throughput (MB/s of text) of our tokenizer on 1
// and 2 threads against SentencePiece's own spm_encode on the same text and model, the
// whole `prepare` path (read, decompress, tokenize, write shards), and the loader
// (sampled windows out of memory-mapped shards) against what training consumes.
//
//   bench-data [--mb 32] [--seq 2048] [--batch 8]
//
// The text is the bundled sample corpus, repeated to --mb megabytes, one line per input
// line as spm_encode reads it.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/corpus.h"
#include "data/dataset.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "train/token_data.h"

namespace llamad::data {
namespace {

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Main(int argc, char** argv) {
  double mb = 32;
  int seq = 2048, batch = 8;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--mb") mb = std::atof(argv[i + 1]);
    else if (a == "--seq") seq = std::atoi(argv[i + 1]);
    else if (a == "--batch") batch = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "bench-data: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  const std::string work = (std::filesystem::temp_directory_path() / ("llamad-bench-data-" + std::to_string(::getpid()))).string();
  std::filesystem::create_directories(work);
  setenv("LLAMAD_CACHE", (work + "/cache").c_str(), 1);
  auto sample = UnpackSample();
  if (!sample.ok()) {
    std::fprintf(stderr, "bench-data: %s\n", std::string(sample.status().message()).c_str());
    return 1;
  }
  const std::string model = *sample + "/tokenizer.model";
  std::string error;
  auto tok = Tokenizer::Load(model, &error);

  // The corpus as lines, repeated to the requested size.
  std::vector<std::string> corpus_lines;
  CorpusReport report;
  (void)ReadCorpus(*sample + "/sample.jsonl.zst", {}, &report, [&](std::string&& text) {
    std::istringstream in(text);
    for (std::string l; std::getline(in, l);) {
      if (!l.empty()) corpus_lines.push_back(l);
    }
  });
  std::vector<std::string> lines;
  size_t bytes = 0;
  while (bytes < size_t(mb * 1e6)) {
    for (const auto& l : corpus_lines) {
      lines.push_back(l);
      bytes += l.size() + 1;
    }
  }
  const std::string text_path = work + "/text.txt";
  {
    std::ofstream f(text_path);
    for (const auto& l : lines) f << l << '\n';
  }
  std::printf("bench-data: %.1f MB of text (%zu lines, the sample corpus repeated), tokenizer %d pieces, %u cores\n",
              bytes / 1e6, lines.size(), tok->vocab_size(), std::thread::hardware_concurrency());

  for (int threads : {1, 2}) {
    std::vector<std::thread> pool;
    std::vector<size_t> counts(threads, 0);
    const auto t0 = std::chrono::steady_clock::now();
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        for (size_t i = size_t(t); i < lines.size(); i += size_t(threads)) counts[t] += tok->Encode(lines[i]).size();
      });
    }
    for (auto& th : pool) th.join();
    const double s = Seconds(t0);
    size_t ids = 0;
    for (size_t c : counts) ids += c;
    std::printf("  llamad tokenizer, %d thread%s: %7.2f MB/s  (%.2f M tokens/s)\n", threads, threads > 1 ? "s" : " ",
                bytes / 1e6 / s, ids / 1e6 / s);
  }
  {
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = std::system(("spm_encode --model=" + model + " --output_format=id < " + text_path + " > /dev/null").c_str());
    const double s = Seconds(t0);
    if (rc == 0) {
      std::printf("  spm_encode (one process)  : %7.2f MB/s  (includes writing the ids as text)\n", bytes / 1e6 / s);
    } else {
      std::printf("  spm_encode failed (exit %d): is the sentencepiece package installed?\n", rc);
    }
  }
  // The whole prepare path on the same text, as JSONL.
  {
    // One JSONL document per 50 lines.
    const std::string jsonl = work + "/corpus.jsonl";
    {
      std::ofstream f(jsonl);
      for (size_t i = 0; i < lines.size(); i += 50) {
        std::string doc;
        for (size_t k = i; k < std::min(lines.size(), i + 50); ++k) doc += lines[k] + "\n";
        f << nlohmann::json{{"text", doc}}.dump() << '\n';
      }
    }
    for (int threads : {1, 2}) {
      PrepareOptions o;
      o.input = jsonl;
      o.tokenizer = model;
      o.out = work + "/prepared-" + std::to_string(threads);
      o.threads = threads;
      auto r = PrepareDataset(o);
      if (!r.ok()) {
        std::fprintf(stderr, "bench-data: %s\n", std::string(r.status().message()).c_str());
        return 1;
      }
      std::printf("  prepare (read + tokenize + write), %d thread%s: %7.2f MB/s\n", threads, threads > 1 ? "s" : " ",
                  bytes / 1e6 / r->seconds);
    }
  }
  // The loader: random windows out of the mapped shards, as the sampler reads them.
  {
    auto data = PreparedDataset::Open(work + "/prepared-2");
    WindowSampler sampler(data->get(), seq, 1);
    std::vector<int32_t> tokens(size_t(batch) * seq), targets(tokens.size());
    const size_t windows = (*data)->NumWindows(seq);
    const int steps = std::max(20, int(4 * windows / batch));
    const auto t0 = std::chrono::steady_clock::now();
    for (int s = 0; s < steps; ++s) sampler.Next(batch, tokens.data(), targets.data());
    const double sec = Seconds(t0);
    std::printf("  loader: %d batches of %d x %d from %zu windows: %.1f M tokens/s (one thread)\n", steps, batch,
                seq, windows, double(steps) * batch * seq / 1e6 / sec);
  }
  std::filesystem::remove_all(work);
  return 0;
}

}  // namespace
}  // namespace llamad::data

int main(int argc, char** argv) { return llamad::data::Main(argc, argv); }
