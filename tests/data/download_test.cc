// The Hugging Face dataset downloader against a local fixture server (a real
// subprocess speaking HTTP): fresh downloads, no network once complete, resumes after
// broken connections, servers that ignore Range, corruption, unreachable endpoints and
// bad names.
#include "data/download.h"

#include <arpa/inet.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <thread>

#include "common/subprocess.h"

namespace llamad::data {
namespace {
namespace fs = std::filesystem;
using llamad::testing::Subprocess;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteFile(const fs::path& p, const std::string& data) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << data;
}

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = char(rng());
  return s;
}

// A port nothing listens on: bound once, then closed.
int ClosedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

constexpr char kBig[] = "shards/big.jsonl.zst";
constexpr size_t kBigSize = 3'000'000;

class DownloadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ =
        fs::temp_directory_path() / ("llamad-download-" + std::to_string(getpid())) / info->name();
    fs::remove_all(dir_);
    const fs::path repo = dir_ / "hub" / "acme" / "tiny";
    WriteFile(repo / "train.jsonl", "{\"text\": \"hello\"}\n{\"text\": \"world\"}\n");
    WriteFile(repo / "data" / "valid.jsonl.gz", RandomBytes(5000, 2));
    WriteFile(repo / kBig, RandomBytes(kBigSize, 3));
    WriteFile(repo / "README.md", "# tiny\n");  // not a corpus file: skipped
    options_.cache_dir = (dir_ / "cache").string();
    options_.connect_timeout_s = 2;
  }
  void TearDown() override {
    StopServer();
    fs::remove_all(dir_);
    std::error_code ec;
    fs::remove(dir_.parent_path(), ec);  // once empty
  }

  // Starts the fixture server with extra flags and points options_ at it.
  void StartServer(const std::string& flags = "") {
    const fs::path port_file = dir_ / "port";
    fs::remove(port_file);
    server_ = std::make_unique<Subprocess>(
        "python3 " LLAMAD_SOURCE_DIR "/tests/data/hf_fixture_server.py --root " +
        (dir_ / "hub").string() + " --port-file " + port_file.string() + " --log " +
        (dir_ / "server.log").string() + " " + flags);
    for (int i = 0; i < 500 && !fs::exists(port_file); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_TRUE(fs::exists(port_file)) << server_->Drain();
    options_.endpoint = "http://127.0.0.1:" + ReadFile(port_file);
  }
  void StopServer() {
    if (!server_) return;
    server_->Kill(SIGKILL);
    server_->Wait();
    server_.reset();
  }
  // Logged request lines ("GET /path Range").
  std::vector<std::string> Requests() {
    std::vector<std::string> lines;
    std::ifstream in(dir_ / "server.log");
    for (std::string line; std::getline(in, line);) lines.push_back(line);
    return lines;
  }
  int CountRequests(const std::string& needle) {
    int n = 0;
    for (const auto& line : Requests()) n += line.find(needle) != std::string::npos;
    return n;
  }
  fs::path Source(const std::string& path) { return dir_ / "hub" / "acme" / "tiny" / path; }
  fs::path Folder() { return dir_ / "cache" / "datasets" / "acme" / "tiny" / "main"; }

  fs::path dir_;
  DownloadOptions options_;
  std::unique_ptr<Subprocess> server_;
};

TEST_F(DownloadTest, FreshDownloadFetchesWantedFilesOnly) {
  // Redirects like the Hub's LFS files, a paged listing, and small files without "lfs".
  StartServer("--redirect --page-size 2 --lfs-min-size 100");
  uint64_t big_done = 0, big_total = 0;
  options_.progress = [&](const std::string& file, uint64_t done, uint64_t total) {
    if (file == kBig) big_done = done, big_total = total;
  };
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_EQ(fs::path(*folder), Folder());
  for (const char* f : {"train.jsonl", "data/valid.jsonl.gz", kBig})
    EXPECT_EQ(ReadFile(Folder() / f), ReadFile(Source(f))) << f;
  EXPECT_FALSE(fs::exists(Folder() / "README.md"));
  EXPECT_EQ(CountRequests("README.md"), 0);
  EXPECT_TRUE(fs::exists(Folder() / ".llamad-complete.json"));
  for (const auto& e : fs::recursive_directory_iterator(Folder()))
    EXPECT_NE(e.path().extension(), ".partial") << e.path();
  EXPECT_EQ(big_done, kBigSize);
  EXPECT_EQ(big_total, kBigSize);
  EXPECT_GE(CountRequests("cursor="), 1) << "the listing was paged";
  EXPECT_EQ(*Sha256File((Folder() / kBig).string()), *Sha256File(Source(kBig).string()));
}

TEST_F(DownloadTest, CustomSelection) {
  StartServer();
  auto folder =
      FetchDataset("acme/tiny", options_, [](const std::string& p) { return p == "README.md"; });
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_EQ(ReadFile(Folder() / "README.md"), "# tiny\n");
  EXPECT_FALSE(fs::exists(Folder() / "train.jsonl"));
  // Nothing wanted at all: an error that lists what there is.
  auto none = FetchDataset("acme/tiny", options_,
                           [](const std::string& p) { return p.ends_with(".parquet"); });
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("README.md"), absl::string_view::npos) << none.status();
}

TEST_F(DownloadTest, CompleteDatasetDoesNotTouchTheNetwork) {
  StartServer();
  ASSERT_TRUE(FetchDataset("acme/tiny", options_).ok());
  const size_t requests = Requests().size();
  ASSERT_TRUE(FetchDataset("acme/tiny", options_).ok());
  EXPECT_EQ(Requests().size(), requests) << "the second call made requests";
  StopServer();
  auto again = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(fs::path(*again), Folder());

  // A missing file is fetched again, and only that file.
  fs::remove(Folder() / "train.jsonl");
  EXPECT_EQ(FetchDataset("acme/tiny", options_).status().code(), absl::StatusCode::kUnavailable);
  StartServer();
  ASSERT_TRUE(FetchDataset("acme/tiny", options_).ok());
  EXPECT_EQ(ReadFile(Folder() / "train.jsonl"), ReadFile(Source("train.jsonl")));
  EXPECT_EQ(CountRequests("/resolve/"), 4) << "3 files, then 1 again";
}

TEST_F(DownloadTest, BrokenConnectionResumes) {
  StartServer(fmt::format("--break-path {} --break-after 1000000 --break-times 1", kBig));
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_EQ(CountRequests(std::string(kBig) + " bytes=1000000-"), 1);
  EXPECT_EQ(*Sha256File((Folder() / kBig).string()), *Sha256File(Source(kBig).string()));
}

TEST_F(DownloadTest, LaterRunResumesThePartial) {
  // Every call gets one try and is cut off after 1 MB; each run continues the last.
  StartServer(fmt::format("--break-path {} --break-after 1000000 --break-times 2", kBig));
  options_.max_attempts = 1;
  const fs::path partial = Folder() / (std::string(kBig) + ".partial");
  auto first = FetchDataset("acme/tiny", options_);
  EXPECT_EQ(first.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(first.status().message().find(kBig), absl::string_view::npos) << first.status();
  EXPECT_EQ(fs::file_size(partial), 1'000'000u);
  EXPECT_FALSE(fs::exists(Folder() / kBig));
  EXPECT_FALSE(FetchDataset("acme/tiny", options_).ok());
  EXPECT_EQ(fs::file_size(partial), 2'000'000u);
  auto third = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(CountRequests(std::string(kBig) + " bytes=2000000-"), 1);
  EXPECT_FALSE(fs::exists(partial));
  EXPECT_EQ(ReadFile(Folder() / kBig), ReadFile(Source(kBig)));
}

TEST_F(DownloadTest, ServerIgnoringRangeStillGivesTheRightFile) {
  StartServer(fmt::format(
      "--break-path {0} --break-after 1000000 --break-times 1 --ignore-range-path {0}", kBig));
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_EQ(CountRequests(std::string(kBig) + " bytes=1000000-"), 1);  // answered 200, whole file
  EXPECT_EQ(ReadFile(Folder() / kBig), ReadFile(Source(kBig)));
}

TEST_F(DownloadTest, CorruptFileIsAnErrorAndNotKept) {
  StartServer(fmt::format("--corrupt-path {}", kBig));
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_EQ(folder.status().code(), absl::StatusCode::kDataLoss) << folder.status();
  const std::string msg(folder.status().message());
  EXPECT_NE(msg.find(kBig), std::string::npos) << msg;
  EXPECT_NE(msg.find(*Sha256File(Source(kBig).string())), std::string::npos)
      << "expected sha: " << msg;
  EXPECT_NE(msg.find("got sha256 "), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(Folder() / kBig));
  EXPECT_FALSE(fs::exists(Folder() / (std::string(kBig) + ".partial")));
  EXPECT_EQ(CountRequests(std::string("/") + kBig), 2) << "one retry from zero";
}

TEST_F(DownloadTest, CorruptSmallFileIsCaughtByItsGitId) {
  // Files stored in git itself have no lfs.oid; their git blob id still identifies them.
  StartServer("--lfs-min-size 100 --corrupt-path train.jsonl");
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_EQ(folder.status().code(), absl::StatusCode::kDataLoss) << folder.status();
  EXPECT_NE(folder.status().message().find("train.jsonl"), absl::string_view::npos);
  EXPECT_NE(folder.status().message().find("git oid"), absl::string_view::npos);
  EXPECT_FALSE(fs::exists(Folder() / "train.jsonl"));
}

TEST_F(DownloadTest, LostManifestDoesNotRefetchVerifiableFiles) {
  StartServer();
  ASSERT_TRUE(FetchDataset("acme/tiny", options_).ok());
  fs::remove(Folder() / ".llamad-complete.json");
  auto again = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(CountRequests("/tree/"), 2);
  EXPECT_EQ(CountRequests("/resolve/"), 3) << "files on disk with the listed sha256 are kept";
  EXPECT_TRUE(fs::exists(Folder() / ".llamad-complete.json"));
}

TEST_F(DownloadTest, CorruptPartialIsRestartedOnce) {
  // A stale partial of the right length (e.g. another revision's) fails verification,
  // and the file is fetched again from zero.
  StartServer();
  WriteFile(Folder() / (std::string(kBig) + ".partial"), RandomBytes(kBigSize, 99));
  auto folder = FetchDataset("acme/tiny", options_);
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_EQ(ReadFile(Folder() / kBig), ReadFile(Source(kBig)));
}

TEST_F(DownloadTest, UnreachableEndpointFailsFast) {
  options_.endpoint = "http://127.0.0.1:" + std::to_string(ClosedPort());
  const auto start = std::chrono::steady_clock::now();
  auto folder = FetchDataset("acme/tiny", options_);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(folder.status().code(), absl::StatusCode::kUnavailable) << folder.status();
  const std::string msg(folder.status().message());
  EXPECT_LT(seconds, 3.0);
  for (const std::string& part : {std::string("acme/tiny"), options_.endpoint,
                                  std::string("-d PATH"), std::string("-d sample")})
    EXPECT_NE(msg.find(part), std::string::npos) << part << " not in: " << msg;
  EXPECT_FALSE(fs::exists(Folder() / ".llamad-complete.json"));
}

TEST_F(DownloadTest, MissingDatasetIsNotFound) {
  StartServer();
  auto folder = FetchDataset("acme/missing", options_);
  ASSERT_EQ(folder.status().code(), absl::StatusCode::kNotFound) << folder.status();
  EXPECT_NE(
      folder.status().message().find(options_.endpoint + "/api/datasets/acme/missing/tree/main"),
      absl::string_view::npos)
      << folder.status();
}

TEST_F(DownloadTest, InvalidNamesAndUnsafeListingsAreRejected) {
  options_.endpoint = "http://127.0.0.1:" + std::to_string(ClosedPort());
  for (const char* name : {"", "acme", "acme/", "/tiny", "acme/tiny/x", "../tiny", "acme/..",
                           "acme/.", "acme/ti ny", "acme/ti%2fny", "acme\\tiny"}) {
    EXPECT_EQ(FetchDataset(name, options_).status().code(), absl::StatusCode::kInvalidArgument)
        << name;
  }
  DownloadOptions bad_revision = options_;
  bad_revision.revision = "../../etc";
  EXPECT_EQ(FetchDataset("acme/tiny", bad_revision).status().code(),
            absl::StatusCode::kInvalidArgument);

  for (const char* path : {"../escape.txt", "/abs.txt", "a/../../b.txt"}) {
    StopServer();
    StartServer(std::string("--inject-path ") + path);
    auto folder = FetchDataset("acme/tiny", options_);
    EXPECT_EQ(folder.status().code(), absl::StatusCode::kInvalidArgument)
        << path << ": " << folder.status();
  }
  EXPECT_FALSE(fs::exists(dir_ / "cache" / "datasets" / "acme" / "escape.txt"));
  EXPECT_EQ(CountRequests("/resolve/"), 0);
}

TEST_F(DownloadTest, ListingPagesThatLoopAreAnError) {
  StartServer("--page-size 2 --loop-pages");
  const auto folder = FetchDataset("acme/tiny", options_);
  EXPECT_EQ(folder.status().code(), absl::StatusCode::kUnavailable) << folder.status();
  EXPECT_NE(folder.status().message().find("link back to"), std::string::npos) << folder.status();
  EXPECT_EQ(CountRequests("/resolve/"), 0);
}

TEST_F(DownloadTest, Sha256KnownVectors) {
  WriteFile(dir_ / "empty", "");
  WriteFile(dir_ / "abc", "abc");
  EXPECT_EQ(*Sha256File((dir_ / "empty").string()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(*Sha256File((dir_ / "abc").string()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256File((dir_ / "nope").string()).status().code(), absl::StatusCode::kInternal);
}

}  // namespace
}  // namespace llamad::data
