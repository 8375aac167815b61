// The data pipeline: tokenizer (against spm_encode), corpus reading with malformed input,
// prepared shards, the sampler's exactly-once order across world-size changes, and how a
// job's data section is opened.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <fmt/format.h>
#include <zstd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "common/subprocess.h"
#include "data/corpus.h"
#include "data/dataset.h"
#include "data/prepare.h"
#include "data/shards.h"
#include "data/tokenizer.h"
#include "train/token_data.h"

namespace llamad::data {
namespace {
namespace fs = std::filesystem;

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("llamad-data-test-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    setenv("LLAMAD_CACHE", (dir_ / "cache").c_str(), 1);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& bytes) {
    const fs::path p = dir_ / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << bytes;
    return p.string();
  }
  static std::string Read(const fs::path& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  }
  static std::set<std::string> FileNames(const fs::path& dir) {
    std::set<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir)) names.insert(entry.path().filename().string());
    return names;
  }
  std::string SampleDir() {
    auto d = UnpackSample();
    EXPECT_TRUE(d.ok()) << d.status();
    return *d;
  }
  std::unique_ptr<Tokenizer> SampleTokenizer() {
    std::string error;
    auto t = Tokenizer::Load(SampleDir() + "/tokenizer.model", &error);
    EXPECT_TRUE(t) << error;
    return t;
  }
  // Options that prepare the sample corpus with its tokenizer into dir_/out.
  PrepareOptions SampleOptions(const std::string& out) {
    const std::string sample = SampleDir();
    PrepareOptions o;
    o.input = sample + "/sample.jsonl.zst";
    o.tokenizer = sample + "/tokenizer.model";
    o.out = (dir_ / out).string();
    return o;
  }
  std::vector<std::string> SampleDocuments() {
    std::vector<std::string> docs;
    CorpusReport report;
    EXPECT_TRUE(ReadCorpus(SampleDir() + "/sample.jsonl.zst", {}, &report,
                           [&](std::string&& t) { docs.push_back(std::move(t)); }).ok());
    return docs;
  }

  fs::path dir_;
};

TEST_F(DataTest, SampleTokenizerHasLlamaLayout) {
  auto tok = SampleTokenizer();
  ASSERT_TRUE(tok);
  EXPECT_EQ(tok->vocab_size(), 4096);
  EXPECT_EQ(tok->unk_id(), 0);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->IdToPiece(0), "<unk>");
  EXPECT_EQ(tok->IdToPiece(1), "<s>");
  EXPECT_EQ(tok->IdToPiece(2), "</s>");
  // LLaMA's byte-fallback pieces follow the specials: <0x00> .. <0xFF> at 3 .. 258.
  for (int b = 0; b < 256; ++b) {
    ASSERT_TRUE(tok->IsByte(3 + b)) << b;
    ASSERT_EQ(tok->IdToPiece(3 + b), fmt::format("<0x{:02X}>", b));
  }
  // Ids outside the model (a tokenizer without BOS says -1) have no piece.
  for (const int id : {-1, 4096, 1 << 30}) {
    EXPECT_EQ(tok->IdToPiece(id), "") << id;
    EXPECT_FALSE(tok->IsByte(id)) << id;
  }
}

// A tokenizer trained here has LLaMA's layout and round-trips text. More threads than
// SentencePiece's trainer takes (128) train on 128, as on a machine with more cores.
TEST_F(DataTest, TrainsATokenizerWithLlamasLayout) {
  const std::vector<std::string> docs = SampleDocuments();
  TokenizerTrainOptions o;
  o.model_prefix = (dir_ / "trained").string();
  o.vocab_size = 600;
  o.threads = 200;
  size_t next = 0;
  const std::string error = TrainTokenizer(o, [&](std::string* line) {
    if (next == 300 || next == docs.size()) return false;
    *line = docs[next++];
    return true;
  });
  ASSERT_EQ(error, "");
  std::string load_error;
  auto tok = Tokenizer::Load(o.model_prefix + ".model", &load_error);
  ASSERT_TRUE(tok) << load_error;
  EXPECT_EQ(tok->vocab_size(), 600);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->IdToPiece(3), "<0x00>");
  const std::string text = "Tokenizers split 12345 digits, and bytes: \xe2\x82\xac.";
  EXPECT_EQ(tok->Decode(tok->Encode(text)), text);
}

TEST_F(DataTest, TokenizerRoundTripsTheWholeCorpus) {
  auto tok = SampleTokenizer();
  const auto docs = SampleDocuments();
  ASSERT_EQ(docs.size(), 3310u);
  int mismatches = 0;
  for (const std::string& d : docs) {
    const auto ids = tok->Encode(d);
    for (int32_t id : ids) ASSERT_TRUE(id > 2 && id < tok->vocab_size());
    if (tok->Decode(ids) != d) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0);
  // Unseen scripts fall back to bytes and still round-trip.
  const std::string other = "Ωμέγα — 漢字 🙂 tab\there";
  EXPECT_EQ(tok->Decode(tok->Encode(other)), other);
}

TEST_F(DataTest, IdsMatchSpmEncode) {
  auto tok = SampleTokenizer();
  const auto docs = SampleDocuments();
  std::string text;
  std::vector<std::string> lines;
  for (size_t i = 0; i < docs.size(); i += 7) {
    std::istringstream in(docs[i]);
    for (std::string l; std::getline(in, l);) {
      if (l.empty()) continue;
      lines.push_back(l);
      text += l + "\n";
    }
  }
  const std::string input = Write("lines.txt", text);
  ::llamad::testing::Subprocess spm("spm_encode --model=" + SampleDir() + "/tokenizer.model --output_format=id < " + input);
  size_t i = 0;
  while (auto line = spm.ReadLine()) {
    ASSERT_LT(i, lines.size()) << "spm_encode printed more lines than it was given";
    std::vector<int32_t> ids;
    std::istringstream in(*line);
    for (int32_t id; in >> id;) ids.push_back(id);
    ASSERT_EQ(ids, tok->Encode(lines[i])) << "line " << i << ": " << lines[i];
    ++i;
  }
  EXPECT_EQ(spm.Wait(), 0) << "spm_encode (Debian package sentencepiece) failed";
  EXPECT_EQ(i, lines.size());
  EXPECT_GT(i, 1000u);
}

std::string Zstd(const std::string& raw) {
  std::string out(ZSTD_compressBound(raw.size()), '\0');
  out.resize(ZSTD_compress(out.data(), out.size(), raw.data(), raw.size(), 3));
  return out;
}

TEST_F(DataTest, MalformedInputIsCountedAndReported) {
  const std::string jsonl =
      "{\"text\": \"first good document\", \"meta\": {}}\n"
      "{\"text\": \"broken json\n"                          // line 2: cut short
      "{\"meta\": {\"no\": \"text\"}}\n"                     // line 3: no text
      "{\"text\": \"\"}\n"                                   // line 4: empty
      "{\"text\": \"bad \xff byte\"}\n"                      // line 5: invalid UTF-8
      "\n"                                                   // line 6: blank, ignored
      "{\"text\": \"" + std::string(100, 'x') + "\"}\n"      // line 7: huge (limit 40)
      "{\"text\": \"last good document\"}";                  // line 8: no final newline
  const std::string folder = (dir_ / "corpus").string();
  Write("corpus/a.jsonl", jsonl);
  // A .zst cut in the middle: the lines before the cut survive.
  std::string lines;
  // Enough varied text for many compressed blocks (a block decodes only when complete).
  std::mt19937 rng(3);
  for (int i = 0; i < 20000; ++i) {
    lines += "{\"text\": \"zstd document " + std::to_string(i) + "\", \"meta\": {\"r\": " + std::to_string(rng()) + "}}\n";
  }
  const std::string z = Zstd(lines);
  Write("corpus/b.jsonl.zst", z.substr(0, z.size() / 2));
  Write("corpus/c.txt", "a text document\n");
  Write("corpus/.hidden.json", "{\"text\": \"never read\"}\n");

  CorpusOptions options;
  options.max_document_bytes = 40;
  CorpusReport report;
  std::vector<std::string> docs;
  ASSERT_TRUE(ReadCorpus(folder, options, &report, [&](std::string&& t) { docs.push_back(t); }).ok());
  EXPECT_EQ(report.files, 3u);
  EXPECT_EQ(report.bad_json, 2u);
  EXPECT_EQ(report.empty, 1u);
  EXPECT_EQ(report.invalid_utf8, 1u);
  EXPECT_EQ(report.split, 1u);
  EXPECT_EQ(report.truncated_files, 1u);
  const std::string summary = report.Summary();
  for (const std::string where : {"a.jsonl:2:", "a.jsonl:3:", "a.jsonl:4:", "a.jsonl:5:", "a.jsonl:7:", "b.jsonl.zst:"}) {
    EXPECT_NE(summary.find(where), std::string::npos) << where << " missing from\n" << summary;
  }
  EXPECT_EQ(docs.front(), "first good document");
  EXPECT_NE(std::find(docs.begin(), docs.end(), "bad \xEF\xBF\xBD byte"), docs.end());
  EXPECT_NE(std::find(docs.begin(), docs.end(), "last good document"), docs.end());
  EXPECT_EQ(std::count(docs.begin(), docs.end(), std::string(40, 'x')), 2);
  EXPECT_EQ(std::count(docs.begin(), docs.end(), std::string(20, 'x')), 1);
  // The truncated file gave a prefix of its documents, in order, and no partial line.
  int zstd_docs = 0;
  for (const auto& d : docs) {
    if (d.starts_with("zstd document ")) EXPECT_EQ(d, "zstd document " + std::to_string(zstd_docs++));
  }
  EXPECT_GT(zstd_docs, 0);
  EXPECT_LT(zstd_docs, 20000);
  EXPECT_EQ(report.documents, docs.size());

  // Lines over max_line_bytes are skipped unparsed, whether or not a newline ends them.
  CorpusOptions short_lines;
  short_lines.max_line_bytes = 1536 << 10;
  const std::string long_line = "{\"text\": \"" + std::string(5 << 20, 'y') + "\"}";
  const std::string just_over = "{\"text\": \"" + std::string(short_lines.max_line_bytes, 'z') + "\"}";
  Write("long/a.jsonl", "{\"text\": \"before\"}\n" + long_line + "\n{\"text\": \"after\"}\n" + just_over + "\n");
  Write("long/b.jsonl", "{\"text\": \"b first\"}\n" + long_line);
  CorpusReport long_report;
  std::vector<std::string> kept;
  ASSERT_TRUE(ReadCorpus((dir_ / "long").string(), short_lines, &long_report,
                         [&](std::string&& t) { kept.push_back(t); }).ok());
  EXPECT_EQ(kept, (std::vector<std::string>{"before", "after", "b first"}));
  EXPECT_EQ(long_report.lines, 6u);
  EXPECT_EQ(long_report.bad_json, 3u);
  for (const std::string where : {"a.jsonl:2: line longer than 1572864 bytes", "a.jsonl:4: line longer",
                                  "b.jsonl:2: line longer"}) {
    EXPECT_NE(long_report.Summary().find(where), std::string::npos)
        << where << " missing from\n" << long_report.Summary();
  }

  // A limit below one character still makes progress, one character per part.
  CorpusOptions tiny_parts;
  tiny_parts.max_document_bytes = 1;
  CorpusReport parts_report;
  std::vector<std::string> parts;
  ASSERT_TRUE(ReadCorpus(Write("utf8.txt", "\xC3\xA9\xE6\xBC\xA2" "a"), tiny_parts, &parts_report,
                         [&](std::string&& t) { parts.push_back(t); }).ok());
  EXPECT_EQ(parts, (std::vector<std::string>{"\xC3\xA9", "\xE6\xBC\xA2", "a"}));

  // --strict: the first problem is an error naming the file and line.
  options.strict = true;
  CorpusReport strict_report;
  const auto status = ReadCorpus(folder, options, &strict_report, [](std::string&&) {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("a.jsonl:2:"), std::string::npos) << status;
}

TEST_F(DataTest, TruncatedGzipAndMissingInputAreReported) {
  // gzip -c of a few lines, cut short (built with zlib through the shell's gzip).
  std::string lines;
  for (int i = 0; i < 3000; ++i) lines += "{\"text\": \"gz document " + std::to_string(i) + "\"}\n";
  const std::string plain = Write("g.jsonl", lines);
  ASSERT_EQ(std::system(("gzip -kf " + plain).c_str()), 0);
  const std::string gz = Read(plain + ".gz");
  const std::string cut = Write("cut/g.jsonl.gz", gz.substr(0, gz.size() * 2 / 3));
  CorpusReport report;
  uint64_t n = 0;
  ASSERT_TRUE(ReadCorpus(cut, {}, &report, [&](std::string&&) { ++n; }).ok());
  EXPECT_EQ(report.truncated_files, 1u);
  EXPECT_GT(n, 0u);
  EXPECT_LT(n, 3000u);
  CorpusReport none;
  const auto missing = ReadCorpus((dir_ / "nothing-here").string(), {}, &none, [](std::string&&) {});
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  fs::create_directories(dir_ / "empty");
  EXPECT_EQ(ReadCorpus((dir_ / "empty").string(), {}, &none, [](std::string&&) {}).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(DataTest, PreparedShardsHoldTheDocumentsInOrder) {
  auto prepare = [&](const std::string& out, int threads, uint64_t shard_tokens) {
    PrepareOptions o = SampleOptions(out);
    o.threads = threads;
    o.shard_tokens = shard_tokens;
    auto r = PrepareDataset(o);
    EXPECT_TRUE(r.ok()) << r.status();
    return o.out;
  };
  const std::string one = prepare("one", 1, uint64_t{1} << 28);
  const std::string many = prepare("many", 2, 100000);
  auto a = PreparedDataset::Open(one);
  auto b = PreparedDataset::Open(many);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->shards().size(), 1u);
  EXPECT_GE((*b)->shards().size(), 5u);
  EXPECT_EQ((*a)->num_tokens(), (*b)->num_tokens());
  EXPECT_EQ((*a)->documents(), 3310u);
  ASSERT_TRUE((*a)->Verify().ok());
  // Documents decode back to the corpus, and each is followed by EOS in the stream.
  auto tok = SampleTokenizer();
  const auto docs = SampleDocuments();
  for (size_t d : {size_t(0), size_t(1), size_t(1234), size_t(3309)}) {
    EXPECT_EQ(tok->Decode((*a)->Document(0, d).value()), docs[d]);
  }
  const int seq = 64;
  std::vector<int32_t> w(seq + 1), stream;
  for (size_t i = 0; i < 3; ++i) {
    (*a)->ReadWindow(i, seq, w.data());
    stream.insert(stream.end(), w.begin(), w.begin() + seq);
  }
  std::vector<int32_t> expected;
  for (size_t d = 0; expected.size() < stream.size(); ++d) {
    const auto ids = tok->Encode(docs[d]);
    expected.insert(expected.end(), ids.begin(), ids.end());
    expected.push_back(2);
  }
  expected.resize(stream.size());
  EXPECT_EQ(stream, expected);
  // The same shard bytes for any thread count.
  const std::string again = prepare("again", 2, uint64_t{1} << 28);
  EXPECT_EQ(Read(one + "/shard-00000.tok"), Read(again + "/shard-00000.tok"));
  // Preparing over an existing dataset needs --overwrite.
  const PrepareOptions o = SampleOptions("one");
  EXPECT_EQ(PrepareDataset(o).status().code(), absl::StatusCode::kAlreadyExists);

  // An overwrite that fails leaves the old dataset whole; one that succeeds replaces it
  // and keeps the other files that were in the folder.
  const std::string index = Read(one + "/index.json");
  std::ofstream(one + "/notes.txt") << "kept";
  PrepareOptions failing = o;
  failing.overwrite = true;
  failing.input = Write("empty.jsonl", "");
  EXPECT_EQ(PrepareDataset(failing).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Read(one + "/index.json"), index);
  ASSERT_TRUE(PreparedDataset::Open(one).ok());
  PrepareOptions smaller = o;
  smaller.overwrite = true;
  smaller.shard_tokens = 50000;
  const auto replaced = PrepareDataset(smaller);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  ASSERT_GT(replaced->shards, 1);
  const auto reopened = PreparedDataset::Open(one);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ((*reopened)->shards().size(), size_t(replaced->shards));
  EXPECT_TRUE((*reopened)->Verify().ok());
  EXPECT_EQ(Read(one + "/notes.txt"), "kept");
  // The folder holds what the new index names, and the other files.
  std::set<std::string> named = {"index.json", "notes.txt", "tokenizer-g1.model"};
  for (const ShardInfo& shard : (*reopened)->shards()) named.insert(shard.file);
  EXPECT_EQ(FileNames(one), named);
}

// A prepare killed partway leaves files beside the dataset in use, which stays whole; the
// next prepare into the folder removes them, by the record the killed one kept, and no
// other files. Overwriting builds under names the dataset in use does not have, and only
// the index's rename switches to them. One prepare at a time.
TEST_F(DataTest, APrepareKilledPartwayLeavesTheDatasetWholeAndTheNextCleansUp) {
  PrepareOptions o = SampleOptions("ds");
  ASSERT_TRUE(PrepareDataset(o).ok());
  const fs::path out = o.out;
  const std::set<std::string> first = FileNames(out);
  EXPECT_TRUE(first.contains("shard-00000.tok") && first.contains("tokenizer.model"));
  const std::string index = Read(out / "index.json");
  // Files of the user's, some named like a dataset's: of another generation, and of none
  // (a leading zero, or a number too large to be one: 2^32 + 1 is not generation 1).
  const std::set<std::string> users = {"shard-notes.txt",         "tokenizer-v2.model",
                                       "notes.txt",               "shard-g2-00000.tok",
                                       "shard-g01-00000.tok",     "shard-g4294967297-00000.tok",
                                       "tokenizer-g4294967297.model", "tokenizer-g99999999999999999999.model"};
  for (const std::string& name : users) std::ofstream(out / name) << "bytes";
  // What an overwrite killed while it wrote generation 1 leaves: its files and its record.
  for (const char* name : {"shard-g1-00000.tok", "tokenizer-g1.model.tmp", "index.json.tmp", "prepare.pending.tmp"}) {
    std::ofstream(out / name) << "bytes";
  }
  std::ofstream(out / "prepare.pending") << R"({"generation": 1, "replaces": ["shard-00000.tok", "tokenizer.model"]})";
  ASSERT_TRUE(PreparedDataset::Open(out.string()).ok());
  EXPECT_EQ(PrepareDataset(o).status().code(), absl::StatusCode::kAlreadyExists);
  std::set<std::string> expected = first;
  expected.insert(users.begin(), users.end());
  EXPECT_EQ(FileNames(out), expected);
  EXPECT_EQ(Read(out / "index.json"), index);

  // A build that fails (here: its index cannot be written) removes what it wrote.
  fs::create_directories(out / "index.json.tmp" / "in-the-way");
  const std::set<std::string> before = FileNames(out);
  o.overwrite = true;
  EXPECT_EQ(PrepareDataset(o).status().code(), absl::StatusCode::kInternal);
  EXPECT_EQ(FileNames(out), before);
  EXPECT_EQ(Read(out / "index.json"), index);
  fs::remove_all(out / "index.json.tmp");

  // While another prepare writes into the folder, a second one is refused.
  const int held = ::open(out.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(held, 0);
  ASSERT_EQ(::flock(held, LOCK_EX), 0);
  o.shard_tokens = 100000;
  const auto refused = PrepareDataset(o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(refused.status().message().find("another prepare"), std::string::npos) << refused.status();
  ::close(held);

  // The overwrite switches to the lowest free generation's files and removes the old ones.
  const auto replaced = PrepareDataset(o);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  auto d = PreparedDataset::Open(out.string());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->tokenizer_path(), (out / "tokenizer-g1.model").string());
  expected = {"index.json", "tokenizer-g1.model"};
  expected.insert(users.begin(), users.end());
  for (const ShardInfo& shard : (*d)->shards()) {
    EXPECT_TRUE(shard.file.starts_with("shard-g1-")) << shard.file;
    expected.insert(shard.file);
  }
  EXPECT_GT((*d)->shards().size(), 1u);
  EXPECT_EQ(FileNames(out), expected);
  // Killed after its index went in: the next prepare removes the files it replaced.
  for (const char* name : {"shard-00000.tok", "tokenizer.model"}) std::ofstream(out / name) << "bytes";
  std::ofstream(out / "prepare.pending") << R"({"generation": 1, "replaces": ["shard-00000.tok", "tokenizer.model"]})";
  o.overwrite = false;
  EXPECT_EQ(PrepareDataset(o).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(FileNames(out), expected);
  // And the next one goes back to the first names, free again.
  o.overwrite = true;
  o.shard_tokens = uint64_t{1} << 28;
  ASSERT_TRUE(PrepareDataset(o).ok());
  expected = first;
  expected.insert(users.begin(), users.end());
  EXPECT_EQ(FileNames(out), expected);
}

// The index alone says which files an overwrite replaces: a dataset that no longer opens
// is replaced whole, and so is what a killed run left beside an index that cannot be read.
TEST_F(DataTest, AnOverwriteReplacesADatasetThatNoLongerOpens) {
  PrepareOptions o = SampleOptions("ds");
  ASSERT_TRUE(PrepareDataset(o).ok());
  const fs::path out = o.out;
  const std::set<std::string> first = FileNames(out);
  // The tokenizer the index names is empty, or a folder, or gone; and a shard is cut short.
  for (bool folder : {false, true}) {
    fs::remove(out / "tokenizer.model");
    if (folder) fs::create_directory(out / "tokenizer.model");
    if (!folder) std::ofstream(out / "tokenizer.model", std::ios::trunc).flush();
    const auto damaged = PreparedDataset::Open(out.string());
    EXPECT_EQ(damaged.status().code(), absl::StatusCode::kDataLoss) << "folder " << folder;
    const std::string why = folder ? "tokenizer.model: read failed: Is a directory (the index names this tokenizer)"
                                   : "tokenizer.model: the index names this tokenizer, which is empty";
    EXPECT_NE(damaged.status().message().find(why), std::string::npos) << damaged.status();
  }
  fs::remove(out / "tokenizer.model");
  const auto no_tokenizer = PreparedDataset::Open(out.string());
  EXPECT_EQ(no_tokenizer.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(no_tokenizer.status().message().find((out / "tokenizer.model").string() +
                                                 ": cannot open: No such file or directory (the index names"),
            std::string::npos)
      << no_tokenizer.status();
  fs::resize_file(out / "shard-00000.tok", 10);
  o.overwrite = true;
  ASSERT_TRUE(PrepareDataset(o).ok());
  EXPECT_EQ(FileNames(out), (std::set<std::string>{"index.json", "tokenizer-g1.model", "shard-g1-00000.tok"}));
  // An index that does not parse, and the record of a run killed while it wrote generation
  // 2 to replace generation 1: the next overwrite replaces both. (The record also names a
  // file of generation 0, which the overwrite is free to write again, and keeps.)
  std::ofstream(out / "index.json", std::ios::trunc) << "{";
  std::ofstream(out / "shard-g2-00000.tok") << "bytes";
  std::ofstream(out / "prepare.pending")
      << R"({"generation": 2, "replaces": ["shard-g1-00000.tok", "tokenizer-g1.model", "shard-00000.tok"]})";
  ASSERT_TRUE(PrepareDataset(o).ok());
  EXPECT_EQ(FileNames(out), first);
  EXPECT_TRUE(PreparedDataset::Open(out.string()).ok());
}

// The tokenizer given to prepare may sit in the output folder under a dataset's name, as
// `tokenizer train --out DIR/tokenizer` leaves it: it is the user's, and stays.
TEST_F(DataTest, PrepareKeepsTheTokenizerItWasGivenInTheOutputFolder) {
  PrepareOptions o = SampleOptions("ds");
  const fs::path out = o.out;
  fs::create_directories(out);
  fs::copy_file(o.tokenizer, out / "tokenizer.model");
  const std::string model = Read(out / "tokenizer.model");
  o.tokenizer = (out / "tokenizer.model").string();
  PrepareOptions failing = o;
  failing.input = Write("empty.jsonl", "");
  EXPECT_EQ(PrepareDataset(failing).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FileNames(out), (std::set<std::string>{"tokenizer.model"}));
  ASSERT_TRUE(PrepareDataset(o).ok());
  o.overwrite = true;
  ASSERT_TRUE(PrepareDataset(o).ok());
  auto d = PreparedDataset::Open(out.string());
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->tokenizer_path(), (out / "tokenizer-g2.model").string());
  EXPECT_EQ(Read(out / "tokenizer.model"), model);
  EXPECT_EQ(FileNames(out), (std::set<std::string>{"index.json", "tokenizer.model", "tokenizer-g2.model",
                                                   "shard-g2-00000.tok"}));
  // Given the dataset's own tokenizer, an overwrite keeps that file too.
  o.tokenizer = (*d)->tokenizer_path();
  ASSERT_TRUE(PrepareDataset(o).ok());
  EXPECT_EQ(FileNames(out), (std::set<std::string>{"index.json", "tokenizer.model", "tokenizer-g1.model",
                                                   "shard-g1-00000.tok", "tokenizer-g2.model"}));
}

// The index alone names the tokenizer: one that names none has none, whatever model file
// lies beside it.
TEST_F(DataTest, AnIndexThatNamesNoTokenizerHasNone) {
  const std::string one = (dir_ / "one").string();
  ASSERT_TRUE(PrepareDataset(SampleOptions("one")).ok());
  ASSERT_TRUE(fs::exists(one + "/tokenizer.model"));
  nlohmann::json index = nlohmann::json::parse(Read(one + "/index.json"));
  index.erase("tokenizer");
  std::ofstream(one + "/index.json", std::ios::trunc) << index.dump();
  auto d = PreparedDataset::Open(one);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->tokenizer_path(), "");
  EXPECT_EQ((*d)->tokenizer_model(), "");
}

// llama-data's command line: numbers in base 10 within their ranges, and inputs of the
// wrong kind, are refused with exit 2 and the flag or file named.
TEST_F(DataTest, BadCommandLinesExitWith2AndNameTheProblem) {
  const std::string tokenizer = SampleDir() + "/tokenizer.model";
  const std::string text = Write("text.txt", "hello world\n");
  const std::string prepare = " prepare -d sample --out " + (dir_ / "cli").string();
  const std::pair<std::string, std::string> cases[] = {
      {prepare + " --threads 100000", "--threads: Value 100000 not in range"},
      {prepare + " --threads 0x10", "--threads: '0x10' is not a whole number in base 10"},
      {prepare + " --shard-tokens 0", "--shard-tokens: Value 0 not in range"},
      {" tokenizer encode --tokenizer " + tokenizer + " --input " + text + " --threads 100000",
       "--threads: Value 100000 not in range"},
      {" tokenizer encode --tokenizer " + tokenizer + " --input " + dir_.string(), "is a folder, not a text file"},
      {" tokenizer train -d sample --out " + (dir_ / "tok").string() + " --threads 129",
       "--threads: Value 129 not in range"},
      {" tokenizer train -d sample --out " + (dir_ / "tok").string() + " --input-sentence-size 100",
       "--input-sentence-size: Value 100 is too small a sample: 0 (all lines) or at least 101"},
      {" tokenizer train -d sample --out " + (dir_ / "tok").string() + " --seed -1",
       "--seed: '-1' is not a non-negative whole number"},
      // Output folders that cannot be made: a file stands in the way.
      {" prepare -d sample --out " + text + "/ds", text + "/ds: cannot create: Not a directory"},
      {" tokenizer train -d sample --out " + text + "/tok", text + ": cannot create: Not a directory"},
  };
  for (const auto& [args, needle] : cases) {
    const auto r = llamad::testing::RunCommand(LLAMA_DATA_BIN + args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << args << "\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(dir_ / "cli" / "index.json"));
  // More threads than lines is fine.
  const auto r = llamad::testing::RunCommand(std::string(LLAMA_DATA_BIN) + " tokenizer encode --tokenizer " +
                                             tokenizer + " --input " + text + " --threads 64");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output, "417 346 3986 1266\n");
}

TEST_F(DataTest, DamagedShardsAreDetected) {
  const PrepareOptions o = SampleOptions("ds");
  ASSERT_TRUE(PrepareDataset(o).ok());
  const std::string shard = o.out + "/shard-00000.tok";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(10000);
    f.put('\x5a');
  }
  auto d = PreparedDataset::Open(o.out);
  ASSERT_TRUE(d.ok());
  const auto verify = (*d)->Verify();
  EXPECT_EQ(verify.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(verify.message().find("shard-00000.tok"), std::string::npos);
  // A truncated shard fails to open, naming it.
  fs::resize_file(shard, fs::file_size(shard) - 8);
  const auto opened = PreparedDataset::Open(o.out);
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(opened.status().message().find("shard-00000.tok"), std::string::npos);
  // No index: not a dataset.
  fs::remove(o.out + "/index.json");
  EXPECT_EQ(PreparedDataset::Open(o.out).status().code(), absl::StatusCode::kNotFound);
}

TEST(SamplerTest, PermutationIsABijection) {
  for (uint64_t n : {1ull, 2ull, 3ull, 17ull, 1000ull, 4097ull, 65536ull}) {
    for (uint64_t epoch : {0ull, 1ull}) {
      std::vector<bool> seen(n, false);
      for (uint64_t i = 0; i < n; ++i) {
        const uint64_t j = PermuteIndex(i, n, 42, epoch);
        ASSERT_LT(j, n);
        ASSERT_FALSE(seen[j]) << "n " << n << " index " << i;
        seen[j] = true;
      }
    }
  }
  // Epochs and seeds give different orders.
  int same_epoch = 0, same_seed = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    same_epoch += PermuteIndex(i, 1000, 42, 0) == PermuteIndex(i, 1000, 42, 1);
    same_seed += PermuteIndex(i, 1000, 42, 0) == PermuteIndex(i, 1000, 43, 0);
  }
  EXPECT_LT(same_epoch, 20);
  EXPECT_LT(same_seed, 20);
}

// A run whose world size changes at step boundaries (each change is a stop and a resume
// from the checkpointed position) reads every window of the epoch exactly once.
TEST(SamplerTest, ExactlyOnceAcrossWorldSizeChanges) {
  const uint64_t windows = 997;  // prime: no batch divides it
  std::vector<int32_t> ids(windows * 8 + 1);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = int32_t(i);
  const TokenDataset data = TokenDataset::FromTokens(ids);
  const std::vector<std::vector<int>> schedules = {
      {4, 3}, {4, 3, 5, 1}, {2, 8, 3, 3, 7}, {1}, {6, 2, 4, 3, 5, 8, 1}};
  std::mt19937 rng(5);
  for (const auto& sizes : schedules) {
    const uint64_t global_batch = 12;
    std::map<uint64_t, int> reads;  // window -> times read, epoch 0 only
    uint64_t position = 0;
    size_t phase = 0;
    while (position < windows) {
      // Each phase runs a random number of steps at its world size, then "resumes" at
      // the next one from the saved position.
      const int world = sizes[phase % sizes.size()];
      const int steps = 1 + int(rng() % 20);
      for (int s = 0; s < steps && position < windows; ++s) {
        for (int r = 0; r < world; ++r) {
          WindowSampler sampler(&data, 8, 1234);  // a fresh sampler per rank, as after a restart
          const auto [begin, end] = WindowSampler::RankSlice(global_batch, r, world);
          for (uint64_t p = position + begin; p < position + end; ++p) {
            if (p < windows) ++reads[sampler.WindowAt(p)];
          }
        }
        position += global_batch;
      }
      ++phase;
    }
    ASSERT_EQ(reads.size(), windows);
    for (const auto& [w, count] : reads) ASSERT_EQ(count, 1) << "window " << w;
  }
  // Rank slices tile the batch.
  for (int world = 1; world <= 9; ++world) {
    uint64_t next = 0;
    for (int r = 0; r < world; ++r) {
      const auto [b, e] = WindowSampler::RankSlice(20, r, world);
      EXPECT_EQ(b, next);
      EXPECT_LE(e - b, 20u / world + 1);
      next = e;
    }
    EXPECT_EQ(next, 20u);
  }
}

TEST_F(DataTest, DamagedIndexesAndOffsetsAreErrorsThatNameTheFile) {
  const PrepareOptions o = SampleOptions("ds");
  ASSERT_TRUE(PrepareDataset(o).ok());
  const std::string index_path = o.out + "/index.json", shard = o.out + "/shard-00000.tok";
  std::string good;
  {
    std::ifstream f(index_path);
    std::stringstream text;
    text << f.rdbuf();
    good = text.str();
  }
  // Index files that parse as JSON but are not an index, or hold fields of the wrong type.
  auto replaced = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const size_t at = text.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return text.replace(at, from.size(), to);
  };
  for (const std::string& index : {std::string("[]"), std::string("null"), std::string("7"),
                                   replaced("\"format\": \"llamad-tokens\"", "\"format\": 1"),
                                   replaced("\"version\": 1", "\"version\": \"1\""),
                                   replaced("\"vocab_size\": 4096", "\"vocab_size\": \"4096\""),
                                   replaced("\"vocab_size\": 4096", "\"vocab_size\": -1"),
                                   replaced("\"tokenizer\": \"tokenizer.model\"", "\"tokenizer\": 3"),
                                   replaced("\"tokenizer\": \"tokenizer.model\"", "\"tokenizer\": \"../x\"")}) {
    Write("ds/index.json", index);
    const auto opened = PreparedDataset::Open(o.out);
    EXPECT_FALSE(opened.ok()) << index.substr(0, 80);
    EXPECT_NE(opened.status().message().find(index_path), std::string::npos) << opened.status();
  }
  Write("ds/index.json", good);
  // A header whose token count, times the id width, wraps to the file's size.
  auto patch = [&](std::streamoff at, uint64_t value) {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(at);
    f.write(reinterpret_cast<const char*>(&value), sizeof(value));
  };
  uint64_t tokens = 0, documents = 0;
  {
    std::ifstream f(shard, std::ios::binary);
    f.seekg(24);  // magic[8], version, id_bytes, vocab_size: then tokens, documents
    f.read(reinterpret_cast<char*>(&tokens), 8);
    f.read(reinterpret_cast<char*>(&documents), 8);
  }
  const uint64_t wrapped = tokens + (uint64_t{1} << 63);  // x 2 bytes: the same product
  patch(24, wrapped);
  Write("ds/index.json", replaced(fmt::format("\"tokens\": {}", tokens), fmt::format("\"tokens\": {}", wrapped)));
  const auto wraps = PreparedDataset::Open(o.out);
  EXPECT_EQ(wraps.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(wraps.status().message().find("shard-00000.tok: header does not match"), std::string::npos)
      << wraps.status();
  patch(24, tokens);
  Write("ds/index.json", good);
  // Damaged document offsets: the document they bound is refused, the others still read.
  const uint64_t offsets_at = 4096 + tokens * 2;
  patch(std::streamoff(offsets_at + 8 * 3), tokens * 4);  // document 2 ends, document 3 starts, far past the end
  auto d = PreparedDataset::Open(o.out);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_TRUE((*d)->Document(0, 1).ok());
  for (const uint64_t bad : {2, 3}) {
    const auto document = (*d)->Document(0, bad);
    EXPECT_EQ(document.status().code(), absl::StatusCode::kDataLoss) << bad;
    EXPECT_NE(document.status().message().find(fmt::format("shard-00000.tok: document {} spans", bad)),
              std::string::npos) << document.status();
  }
  EXPECT_EQ((*d)->Document(0, documents).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*d)->Document((*d)->shards().size(), 0).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_TRUE((*d)->Document(0, documents - 1).ok());
}

TEST_F(DataTest, PreparingAgainLeavesAnOpenDatasetReadable) {
  // A job may still have the shards mapped when a dataset is prepared over: it keeps
  // reading the old files. Also, a corpus path whose bytes are not UTF-8 is a legal name.
  PrepareOptions o = SampleOptions("ds");
  const std::string corpus = (dir_ / "latin\xe9" / "sample.jsonl.zst").string();
  fs::create_directories(fs::path(corpus).parent_path());
  fs::copy_file(o.input, corpus);
  o.input = corpus;
  const auto first = PrepareDataset(o);
  ASSERT_TRUE(first.ok()) << first.status();
  auto d = PreparedDataset::Open(o.out);
  ASSERT_TRUE(d.ok()) << d.status();
  // A job has its tokenizer for its checkpoints from the open, though the overwrite
  // removes the file.
  DataSpec spec;
  spec.dataset = o.out;
  auto job = OpenTrainingData(spec, 4096, [](const std::string&) {});
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string tokenizer_file = (*d)->tokenizer_path(), tokenizer = Read(tokenizer_file);
  ASSERT_FALSE(tokenizer.empty());
  EXPECT_EQ(job->tokenizer_model, tokenizer);
  const int seq = 128;
  const size_t last = (*d)->NumWindows(seq) - 1;
  std::vector<int32_t> before(seq + 1), after(seq + 1);
  (*d)->ReadWindow(last, seq, before.data());
  o.overwrite = true;
  o.shard_tokens = 100000;  // other shard boundaries: the first shard gets shorter
  ASSERT_TRUE(PrepareDataset(o).ok());
  (*d)->ReadWindow(last, seq, after.data());
  EXPECT_EQ(before, after);
  EXPECT_FALSE(fs::exists(tokenizer_file));
  EXPECT_TRUE((*d)->Verify().ok());
  auto again = PreparedDataset::Open(o.out);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_GT((*again)->shards().size(), 1u);
}

TEST_F(DataTest, OpensAJobsDataSection) {
  auto log = [](const std::string&) {};
  DataSpec spec;
  spec.dataset = "sample";
  auto sample = OpenTrainingData(spec, 4096, log);
  ASSERT_TRUE(sample.ok()) << sample.status();
  EXPECT_EQ(sample->source->NumWindows(256), (560681 - 1) / 256u);
  // The second open uses the cache: the same folder, no preparing.
  std::vector<std::string> lines;
  auto again = OpenTrainingData(spec, 4096, [&](const std::string& l) { lines.push_back(l); });
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(lines.empty());
  // A model with fewer ids than the tokenizer.
  const auto small = OpenTrainingData(spec, 1000, log);
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(small.status().message().find("vocab_size"), std::string::npos);
  // A raw corpus without a tokenizer.
  spec.dataset = Write("raw/a.jsonl", "{\"text\": \"hello\"}\n");
  const auto raw = OpenTrainingData(spec, 4096, log);
  EXPECT_NE(raw.status().message().find("data.tokenizer"), std::string::npos) << raw.status();
  // Relative paths resolve against the job's folder.
  spec.dataset = "raw/a.jsonl";
  spec.base_dir = dir_.string();
  spec.tokenizer = SampleDir() + "/tokenizer.model";
  EXPECT_TRUE(OpenTrainingData(spec, 4096, log).ok());
  spec.dataset = "no/such/file.jsonl";
  EXPECT_EQ(OpenTrainingData(spec, 4096, log).status().code(), absl::StatusCode::kNotFound);
  // A file of another format is read as token ids, and the error says so.
  spec.dataset = Write("table.parquet", "PAR1PAR1");
  const auto other = OpenTrainingData(spec, 4096, log);
  EXPECT_FALSE(other.ok());
  EXPECT_NE(other.status().message().find("read as uint32 token ids"), std::string::npos) << other.status();
  // A name that is no local path is a hub dataset; unreachable, it fails fast and says
  // how to train without it.
  setenv("LLAMAD_HF_ENDPOINT", "http://127.0.0.1:9", 1);
  spec.dataset = "owner/no-such-dataset";
  const auto hub = OpenTrainingData(spec, 4096, log);
  unsetenv("LLAMAD_HF_ENDPOINT");
  EXPECT_EQ(hub.status().code(), absl::StatusCode::kUnavailable) << hub.status();
  EXPECT_NE(hub.status().message().find("-d sample"), std::string::npos) << hub.status();
}

}  // namespace
}  // namespace llamad::data
