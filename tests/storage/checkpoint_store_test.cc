// The checkpoint store on a real RocksDB and real files.
#include "storage/checkpoint_store.h"

#include <gtest/gtest.h>
#include <dirent.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <numeric>
#include <rocksdb/db.h>

#include "common/scratch_dir.h"
#include "common/flip_byte.h"
#include "storage/direct_io.h"
#include "storage/files.h"
#include "storage/safetensors.h"

namespace llamad::storage {
namespace {
namespace fs = std::filesystem;

fs::path FreshDir(const std::string& name) {
  const fs::path dir = llamad::testing::ScratchDir("llamad-store") / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Splits [0, n) into `parts` uneven ranges (the first ones larger).
std::vector<std::pair<uint64_t, uint64_t>> Split(uint64_t n, int parts) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  uint64_t begin = 0;
  for (int p = 0; p < parts; ++p) {
    const uint64_t size = n / parts + (uint64_t(p) < n % parts ? 1 : 0);
    out.emplace_back(begin, begin + size);
    begin += size;
  }
  return out;
}

// Writes tensors "a" [10, 7] and "b" [33] in `world` shards as checkpoint `step`.
void WriteLayout(CheckpointStore& store, int64_t step, int world, const std::vector<float>& a,
                 const std::vector<float>& b) {
  std::vector<PieceRecord> all;
  const auto a_ranges = Split(a.size(), world), b_ranges = Split(b.size(), world);
  for (int rank = 0; rank < world; ++rank) {
    std::vector<PieceToWrite> pieces = {
        {"a", {10, 7}, ElementType::kF32, a_ranges[rank].first, a_ranges[rank].second, a.data() + a_ranges[rank].first},
        {"b", {33}, ElementType::kF32, b_ranges[rank].first, b_ranges[rank].second, b.data() + b_ranges[rank].first}};
    auto records = store.WriteShard("job", step, rank, pieces);
    ASSERT_TRUE(records.ok()) << records.status();
    all.insert(all.end(), records->begin(), records->end());
  }
  ASSERT_TRUE(store.Commit("job", step, "{\"world_size\": " + std::to_string(world) + "}", all).ok());
}

TEST(CheckpointStoreTest, RestoresAnyLayoutIntoAnyOther) {
  auto store = *CheckpointStore::Open(FreshDir("layouts").string(), {10});
  std::vector<float> a(70), b(33);
  std::iota(a.begin(), a.end(), 1.0f);
  std::iota(b.begin(), b.end(), -100.0f);
  const int layouts[] = {1, 2, 4, 3};
  for (int i = 0; i < 4; ++i) WriteLayout(*store, i + 1, layouts[i], a, b);
  EXPECT_EQ(*store->Steps("job"), (std::vector<int64_t>{1, 2, 3, 4}));
  for (int step = 1; step <= 4; ++step) {
    for (int world = 1; world <= 5; ++world) {  // every reader layout
      for (const auto& [begin, end] : Split(a.size(), world)) {
        std::vector<float> got(end - begin);
        ASSERT_TRUE(store->ReadRange("job", step, "a", ElementType::kF32, begin, end, got.data()).ok());
        EXPECT_TRUE(std::equal(got.begin(), got.end(), a.begin() + begin)) << step << " " << world;
      }
      for (const auto& [begin, end] : Split(b.size(), world)) {
        std::vector<float> got(end - begin);
        ASSERT_TRUE(store->ReadRange("job", step, "b", ElementType::kF32, begin, end, got.data()).ok());
        EXPECT_TRUE(std::equal(got.begin(), got.end(), b.begin() + begin));
      }
    }
    EXPECT_TRUE(store->Verify("job", step).ok());
  }
  // A reader touches only the shards that overlap its range: with rank 3's file of the
  // 4-shard checkpoint gone, ranges inside ranks 0-2 still read; the rest fail cleanly.
  fs::remove(store->ShardPath("job", 3, 3));
  std::vector<float> got(70);
  EXPECT_TRUE(store->ReadRange("job", 3, "a", ElementType::kF32, 0, 40, got.data()).ok());
  const auto missing = store->ReadRange("job", 3, "a", ElementType::kF32, 0, 70, got.data());
  EXPECT_TRUE(absl::IsDataLoss(missing)) << missing;
  EXPECT_NE(missing.message().find("rank-3.shard"), std::string::npos) << missing;
  EXPECT_FALSE(store->ReadRange("job", 1, "nope", ElementType::kF32, 0, 1, got.data()).ok());
  // The index says f32: a reader expecting another type is refused, not overrun.
  EXPECT_TRUE(absl::IsDataLoss(store->ReadRange("job", 1, "a", ElementType::kF64, 0, 1, got.data())));
  EXPECT_TRUE(absl::IsNotFound(store->ReadRange("job", 9, "a", ElementType::kF32, 0, 1, got.data())));
}

TEST(CheckpointStoreTest, NothingExistsBeforeCommitAndLeftoversGoAtOpen) {
  const std::string root = FreshDir("commit").string();
  std::vector<float> a(70, 1.0f), b(33, 2.0f);
  {
    auto store = *CheckpointStore::Open(root);
    WriteLayout(*store, 5, 2, a, b);
    // A save that wrote its shard but never committed (the process died), after rank 1 had
    // published its records and while another rank was writing its own.
    std::vector<PieceToWrite> pieces = {{"a", {10, 7}, ElementType::kF32, 0, 70, a.data()}};
    auto written = store->WriteShard("job", 6, 0, pieces);
    ASSERT_TRUE(written.ok()) << written.status();
    ASSERT_TRUE(PublishShardRecords(root, "job", 6, 1, 3, *written).ok());
    std::ofstream(store->StepDir("job", 6) + "/rank-2.run-3.records.tmp") << "{";
    EXPECT_EQ(*store->LatestStep("job"), 5);
    EXPECT_TRUE(fs::exists(store->StepDir("job", 6)));
  }
  auto store = *CheckpointStore::Open(root);
  EXPECT_FALSE(fs::exists(store->StepDir("job", 6)));
  EXPECT_TRUE(fs::exists(store->StepDir("job", 5)));
  EXPECT_TRUE(store->Verify("job", 5).ok());
  EXPECT_TRUE(absl::IsNotFound(store->LatestStep("other").status()));
  // Without its index the store cannot tell committed steps from unfinished ones: it
  // refuses to open, removes nothing, and leaves no empty index for the next open to trust.
  const fs::path step_5 = store->StepDir("job", 5);
  store.reset();
  fs::remove_all(fs::path(root) / "index");
  for (int attempt = 0; attempt < 2; ++attempt) {
    auto reopened = CheckpointStore::Open(root);
    ASSERT_TRUE(absl::IsDataLoss(reopened.status())) << reopened.status();
    EXPECT_NE(reopened.status().message().find(step_5.string()), std::string::npos) << reopened.status();
    EXPECT_TRUE(fs::exists(step_5 / "rank-0.shard"));
  }
  // An empty step folder holds nothing to lose: a store without an index opens there.
  const std::string bare = FreshDir("commit-bare").string();
  fs::create_directories(fs::path(bare) / "job" / "step-1");
  auto opened = CheckpointStore::Open(bare);
  EXPECT_TRUE(opened.ok()) << opened.status();
}

// While alive, this thread obeys file permissions even as root: CAP_DAC_OVERRIDE and
// CAP_DAC_READ_SEARCH leave its effective set (capabilities are per thread), so a folder
// with mode 000 cannot be listed, as a stale or failing shared folder cannot be.
class ObeyFilePermissions {
 public:
  ObeyFilePermissions() {
    if (syscall(SYS_capget, &header_, saved_) != 0) return;
    __user_cap_data_struct reduced[2] = {saved_[0], saved_[1]};
    reduced[0].effective &= ~((1u << CAP_DAC_OVERRIDE) | (1u << CAP_DAC_READ_SEARCH));
    dropped_ = syscall(SYS_capset, &header_, reduced) == 0;
  }
  ~ObeyFilePermissions() {
    if (dropped_) syscall(SYS_capset, &header_, saved_);
  }
  static bool CanList(const fs::path& dir) {
    DIR* d = opendir(dir.c_str());
    if (d != nullptr) closedir(d);
    return d != nullptr;
  }

 private:
  __user_cap_header_struct header_{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct saved_[2] = {};
  bool dropped_ = false;
};

// A job folder the store cannot list may hold committed shards. Without an index, opening
// there would make an empty one, and the next open (the folder readable again) would then
// remove those shards as unfinished: the store refuses instead, naming the folder.
TEST(CheckpointStoreTest, WithoutAnIndexAFolderThatCannotBeListedStopsTheOpen) {
  const fs::path root = FreshDir("unlisted");
  const fs::path job = root / "job";
  fs::create_directories(job / "step-4");
  std::ofstream(job / "step-4" / "rank-0.shard") << "shard bytes";
  fs::permissions(job, fs::perms::none);
  {
    ObeyFilePermissions obey;
    if (ObeyFilePermissions::CanList(job)) {
      fs::permissions(job, fs::perms::owner_all);
      GTEST_SKIP() << "this process lists a folder with mode 000 anyway; nothing to check";
    }
    auto opened = CheckpointStore::Open(root.string());
    EXPECT_TRUE(absl::IsInternal(opened.status())) << opened.status();
    EXPECT_NE(opened.status().message().find(job.string() + ": cannot list"), std::string::npos) << opened.status();
  }
  fs::permissions(job, fs::perms::owner_all);
  EXPECT_FALSE(fs::exists(root / "index"));
  EXPECT_TRUE(fs::exists(job / "step-4" / "rank-0.shard"));
  // With its index, the store opens there: its cleanup of unfinished saves leaves what it
  // cannot list as it is, and still removes those in the job folders it can list, whichever
  // order the listing gives them in.
  fs::remove_all(job);
  ASSERT_TRUE(CheckpointStore::Open(root.string()).ok());
  const fs::path other = root / "other";
  fs::create_directories(other / "step-2");
  std::ofstream(other / "step-2" / "rank-0.shard") << "shard bytes";
  std::vector<fs::path> unfinished;
  for (int i = 0; i < 8; ++i) {
    unfinished.push_back(root / ("job-" + std::to_string(i)) / "step-5");
    fs::create_directories(unfinished.back());
    std::ofstream(unfinished.back() / "rank-0.shard") << "half a save";
  }
  fs::permissions(other, fs::perms::none);
  {
    ObeyFilePermissions obey;
    auto opened = CheckpointStore::Open(root.string());
    EXPECT_TRUE(opened.ok()) << opened.status();
  }
  fs::permissions(other, fs::perms::owner_all);
  EXPECT_TRUE(fs::exists(other / "step-2" / "rank-0.shard"));
  for (const fs::path& dir : unfinished) EXPECT_FALSE(fs::exists(dir)) << dir;
}

// A folder of another user's that this one cannot list, such as the lost+found at the top
// of a volume, holds nothing this user's store wrote: the first open there goes ahead.
TEST(CheckpointStoreTest, AnotherUsersFolderItCannotListIsNoneOfItsJobs) {
  const fs::path root = FreshDir("lost-found");
  const fs::path lost = root / "lost+found";
  fs::create_directories(lost);
  if (::geteuid() != 0 || ::chown(lost.c_str(), 65534, 65534) != 0) {
    GTEST_SKIP() << "giving a folder to another user needs root; nothing to check";
  }
  fs::permissions(lost, fs::perms::owner_all);
  {
    ObeyFilePermissions obey;
    if (ObeyFilePermissions::CanList(lost)) GTEST_SKIP() << "this process lists another user's 0700 folder anyway";
    auto opened = CheckpointStore::Open(root.string());
    EXPECT_TRUE(opened.ok()) << opened.status();
  }
  EXPECT_TRUE(fs::exists(root / "index"));
  EXPECT_TRUE(fs::exists(lost));
}

// Rewrites the index record of the first piece of tensor `name` in step `step` of "job"
// (with the store closed: RocksDB has one writer).
void EditPieceRecord(const std::string& root, int64_t step, const std::string& name,
                     const std::function<void(nlohmann::json&)>& edit) {
  rocksdb::DB* raw = nullptr;
  ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), root + "/index", &raw).ok());
  std::unique_ptr<rocksdb::DB> db(raw);
  const std::string prefix = fmt::format("ckpt/job/{:020d}/piece/{}/", step, name);
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  it->Seek(prefix);
  ASSERT_TRUE(it->Valid() && it->key().starts_with(prefix)) << prefix;
  auto record = nlohmann::json::parse(it->value().ToString());
  edit(record);
  ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), it->key(), record.dump()).ok());
}

TEST(CheckpointStoreTest, RecordsThatWrapOrPointPastTheirShardAreDataLoss) {
  const std::string root = FreshDir("records").string();
  std::vector<float> a(70, 1.0f), b(33, 2.0f);
  {
    auto store = *CheckpointStore::Open(root);
    WriteLayout(*store, 1, 1, a, b);
    WriteLayout(*store, 2, 1, a, b);
  }
  // Raised by 2^62 elements, the range's f32 bytes wrap back to the record's length: the
  // record would claim elements it has no bytes for.
  EditPieceRecord(root, 1, "b", [](nlohmann::json& r) { r["end"] = r["end"].get<uint64_t>() + (uint64_t{1} << 62); });
  // Consistent, but its 2^60 bytes lie far past the end of the shard file.
  EditPieceRecord(root, 2, "b", [](nlohmann::json& r) {
    r["end"] = uint64_t{1} << 58;
    r["length"] = uint64_t{1} << 60;
  });
  auto store = *CheckpointStore::Open(root);
  std::vector<float> got(40);
  const auto wrapped = store->ReadRange("job", 1, "b", ElementType::kF32, 0, 40, got.data());
  ASSERT_TRUE(absl::IsDataLoss(wrapped)) << wrapped;
  EXPECT_NE(wrapped.message().find("inconsistent record for tensor 'b'"), std::string::npos) << wrapped;
  const auto past = store->ReadRange("job", 2, "b", ElementType::kF32, 0, 33, got.data());
  ASSERT_TRUE(absl::IsDataLoss(past)) << past;
  EXPECT_NE(past.message().find("'b'"), std::string::npos) << past;
  EXPECT_NE(past.message().find("rank-0.shard"), std::string::npos) << past;
  EXPECT_FALSE(store->Verify("job", 2).ok());
  // The damage stays with its tensor: the other one reads.
  std::vector<float> got_a(70);
  EXPECT_TRUE(store->ReadRange("job", 2, "a", ElementType::kF32, 0, 70, got_a.data()).ok());
  EXPECT_EQ(got_a, a);
}

TEST(CheckpointStoreTest, RetentionKeepsTheLastKAndPinnedOnes) {
  auto store = *CheckpointStore::Open(FreshDir("retention").string(), {2});
  std::vector<float> a(70, 1.0f), b(33, 2.0f);
  WriteLayout(*store, 1, 1, a, b);
  ASSERT_TRUE(store->Pin("job", 1, true).ok());
  for (int step = 2; step <= 5; ++step) WriteLayout(*store, step, 1, a, b);
  EXPECT_EQ(*store->Steps("job"), (std::vector<int64_t>{1, 4, 5}));
  EXPECT_FALSE(fs::exists(store->StepDir("job", 2)));
  EXPECT_FALSE(fs::exists(store->StepDir("job", 3)));
  ASSERT_TRUE(store->Pin("job", 1, false).ok());
  ASSERT_TRUE(store->Retain("job").ok());
  EXPECT_EQ(*store->Steps("job"), (std::vector<int64_t>{4, 5}));
}

TEST(CheckpointStoreTest, AFlippedByteIsCaughtNamingFileAndTensor) {
  auto store = *CheckpointStore::Open(FreshDir("corrupt").string());
  std::vector<float> a(70, 1.5f), b(33, 2.5f);
  WriteLayout(*store, 1, 2, a, b);
  auto pieces = *store->Pieces("job", 1);
  const PieceRecord& victim = pieces[1];  // ordered by tensor then begin
  const std::string path = (fs::path(store->root()) / victim.file).string();
  ASSERT_TRUE(llamad::testing::FlipByte(path, victim.offset + 5, 0x10));
  std::vector<float> got(70);
  const auto s = store->ReadRange("job", 1, victim.name, ElementType::kF32, victim.begin, victim.end, got.data());
  ASSERT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("'" + victim.name + "'"), std::string::npos) << s;
  // Streamed, the damage shows once the piece is read: the call fails the same way.
  const auto streamed = (*store->OpenReader("job", 1))
                            ->ReadRangeStreamed(victim.name, ElementType::kF32, victim.begin, victim.end,
                                                [](uint64_t, const void*, uint64_t) {});
  ASSERT_TRUE(absl::IsDataLoss(streamed)) << streamed;
  EXPECT_NE(streamed.message().find(path), std::string::npos) << streamed;
  EXPECT_FALSE(store->Verify("job", 1).ok());
}

// Several ranges through one reader as one pipeline, across pieces of both shard files:
// each sink gets its own elements in order; a damaged piece stops the stream there,
// named, and no range after it is handed anything.
TEST(CheckpointStoreTest, SeveralRangesStreamInOrderAndStopAtDamage) {
  auto store = *CheckpointStore::Open(FreshDir("ranges").string());
  std::vector<float> a(70), b(33);
  std::iota(a.begin(), a.end(), 1.0f);
  std::iota(b.begin(), b.end(), -100.0f);
  WriteLayout(*store, 1, 2, a, b);  // a: [0, 35) and [35, 70); b: [0, 17) and [17, 33)
  std::vector<float> got_a, got_b, got_tail;
  auto into = [](std::vector<float>& out, uint64_t begin) {
    return [&out, begin](uint64_t first, const void* data, uint64_t count) {
      EXPECT_EQ(first, begin + out.size());
      const float* f = static_cast<const float*>(data);
      out.insert(out.end(), f, f + count);
    };
  };
  using Range = CheckpointStore::Reader::RangeRead;
  const std::vector<Range> ranges = {{"a", ElementType::kF32, 10, 60, into(got_a, 10)},
                                     {"b", ElementType::kF32, 5, 30, into(got_b, 5)},
                                     {"a", ElementType::kF32, 65, 70, into(got_tail, 65)}};
  auto reader = *store->OpenReader("job", 1);
  ASSERT_TRUE(reader->ReadRangesStreamed(ranges).ok());
  EXPECT_EQ(got_a, std::vector<float>(a.begin() + 10, a.begin() + 60));
  EXPECT_EQ(got_b, std::vector<float>(b.begin() + 5, b.begin() + 30));
  EXPECT_EQ(got_tail, std::vector<float>(a.begin() + 65, a.end()));

  // Damage b's second piece (rank 1's shard).
  PieceRecord victim;
  const auto pieces = store->Pieces("job", 1);
  ASSERT_TRUE(pieces.ok()) << pieces.status();
  for (const PieceRecord& p : *pieces) {
    if (p.name == "b" && p.begin > 0) victim = p;
  }
  const std::string path = (fs::path(store->root()) / victim.file).string();
  ASSERT_TRUE(llamad::testing::FlipByte(path, victim.offset + 3, 0x01));
  got_a.clear(), got_b.clear(), got_tail.clear();
  const auto s = reader->ReadRangesStreamed(ranges);
  ASSERT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("'b'"), std::string::npos) << s;
  EXPECT_EQ(got_a.size(), 50u);   // read before the damage, and checked
  EXPECT_TRUE(got_tail.empty());  // never reached
  // A missing tensor fails before anything is read.
  got_a.clear();
  const auto missing = reader->ReadRangesStreamed({ranges[0], {"c", ElementType::kF32, 0, 1, into(got_b, 0)}});
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
  EXPECT_TRUE(got_a.empty());
}

// Tensors larger than the write staging buffer (16 MiB) and the read segment (8 MiB):
// many requests in flight at once, through both the staging and the in-place paths.
void LargeTensorsRoundTripAndACutShardIsCaught(const std::string& dir) {
  auto store = *CheckpointStore::Open(FreshDir(dir).string());
  const uint64_t n = (uint64_t{21} << 20) / 4 + 123;  // 21 MiB and a bit: not a whole block
  std::vector<float> source(n + 1);
  for (uint64_t i = 0; i < source.size(); ++i) source[i] = float(i % 100003) * 0.5f - 7.0f;
  // Starting one element in, the payload is not 4 KiB aligned: it goes through staging.
  const float* unaligned = source.data() + 1;
  std::vector<PieceToWrite> pieces = {{"big", {int64_t(n)}, ElementType::kF32, 0, n, unaligned},
                                      {"small", {3}, ElementType::kF32, 0, 3, source.data()}};
  auto records = store->WriteShard("job", 1, 0, pieces);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_TRUE(store->Commit("job", 1, "{\"world_size\": 1}", *records).ok());
  std::vector<float> got(n);
  ASSERT_TRUE(store->ReadRange("job", 1, "big", ElementType::kF32, 0, n, got.data()).ok());
  EXPECT_TRUE(std::equal(got.begin(), got.end(), unaligned));
  // A range in the middle, across segment boundaries.
  std::vector<float> middle(3 << 20);
  ASSERT_TRUE(store->ReadRange("job", 1, "big", ElementType::kF32, 1 << 20, (1 << 20) + middle.size(),
                               middle.data())
                  .ok());
  EXPECT_TRUE(std::equal(middle.begin(), middle.end(), unaligned + (1 << 20)));
  // Streamed: the same elements, in order, in segments of at most 8 MiB.
  std::vector<float> streamed;
  uint64_t largest = 0;
  ASSERT_TRUE((*store->OpenReader("job", 1))
                  ->ReadRangeStreamed("big", ElementType::kF32, 1 << 20, n,
                                      [&](uint64_t first, const void* data, uint64_t count) {
                                        EXPECT_EQ(first, (1u << 20) + streamed.size());
                                        largest = std::max(largest, count);
                                        const float* f = static_cast<const float*>(data);
                                        streamed.insert(streamed.end(), f, f + count);
                                      })
                  .ok());
  ASSERT_EQ(streamed.size(), n - (1 << 20));
  EXPECT_TRUE(std::equal(streamed.begin(), streamed.end(), unaligned + (1 << 20)));
  EXPECT_LE(largest, (uint64_t{8} << 20) / 4);
  EXPECT_TRUE(store->Verify("job", 1).ok());

  // Cut the shard short in the middle of the big payload.
  const PieceRecord& big = (*records)[0];
  const std::string path = (fs::path(store->root()) / big.file).string();
  fs::resize_file(path, big.offset + (uint64_t{10} << 20));
  const auto s = store->ReadRange("job", 1, "big", ElementType::kF32, 0, n, got.data());
  ASSERT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find(path), std::string::npos) << s;
  EXPECT_NE(s.message().find("'big'"), std::string::npos) << s;
  EXPECT_NE(s.message().find("shorter than expected"), std::string::npos) << s;
  const auto streamed_cut = (*store->OpenReader("job", 1))
                                ->ReadRangeStreamed("big", ElementType::kF32, 0, n, [](uint64_t, const void*, uint64_t) {});
  EXPECT_TRUE(absl::IsDataLoss(streamed_cut)) << streamed_cut;
  EXPECT_FALSE(store->Verify("job", 1).ok());
}

TEST(CheckpointStoreTest, LargeTensorsRoundTripAndACutShardIsCaught) { LargeTensorsRoundTripAndACutShardIsCaught("large"); }

// Where io_uring is blocked (container seccomp profiles, the sysctl), shard files move
// one request at a time with pread/pwrite, to the same results and errors.
TEST(CheckpointStoreTest, WithoutIoUringTheSameBytesMoveOneRequestAtATime) {
  // Set for this test only, also when an assertion ends it early.
  struct Unset {
    ~Unset() { ::unsetenv("LLAMAD_IO_URING"); }
  } unset;
  ::setenv("LLAMAD_IO_URING", "0", 1);
  {
    const int fd = ::open((FreshDir("sync-queue") / "f").c_str(), O_RDWR | O_CREAT, 0644);
    ASSERT_GE(fd, 0);
    auto queue = DirectIoQueue::Create(fd, "f", 4096, 4);
    ASSERT_TRUE(queue.ok()) << queue.status();
    EXPECT_TRUE((*queue)->synchronous());
    queue->reset();
    ::close(fd);
  }
  LargeTensorsRoundTripAndACutShardIsCaught("large-sync");
  std::vector<float> a(70, 1.5f), b(33, 2.5f);
  auto store = *CheckpointStore::Open(FreshDir("sync-layouts").string());
  WriteLayout(*store, 1, 3, a, b);
  std::vector<float> got(70);
  EXPECT_TRUE(store->ReadRange("job", 1, "a", ElementType::kF32, 0, 70, got.data()).ok());
  EXPECT_EQ(got, a);
}

TEST(CheckpointStoreTest, ReadOnlyOpenTouchesNothingAndDropNewerRewinds) {
  const fs::path root = FreshDir("readonly");
  // A folder that merely looks like checkpoints, with no index: read-only open refuses it
  // and deletes nothing.
  fs::create_directories(root / "other" / "step-3");
  std::ofstream(root / "other" / "step-3" / "notes.txt") << "keep me";
  EXPECT_TRUE(absl::IsNotFound(CheckpointStore::Open(root.string(), {2, true}).status()));
  EXPECT_TRUE(fs::exists(root / "other" / "step-3" / "notes.txt"));
  std::vector<float> a(70, 1.0f), b(33, 2.0f);
  {
    auto store = *CheckpointStore::Open(root.string(), {5});
    EXPECT_TRUE(fs::exists(root / "other" / "step-3" / "notes.txt")) << "not ours: left alone";
    for (int step = 1; step <= 4; ++step) WriteLayout(*store, step, 1, a, b);
    auto dropped = store->DropNewerThan("job", 2);
    ASSERT_TRUE(dropped.ok());
    EXPECT_EQ(*dropped, (std::vector<int64_t>{3, 4}));
    EXPECT_EQ(*store->Steps("job"), (std::vector<int64_t>{1, 2}));
    EXPECT_FALSE(fs::exists(store->StepDir("job", 4)));
  }
  auto reader = CheckpointStore::Open(root.string(), {2, true});
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ(*(*reader)->Steps("job"), (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE((*reader)->Verify("job", 2).ok());
  EXPECT_FALSE((*reader)->DropNewerThan("job", 0).ok());
}

TEST(CheckpointPathTest, ParsesStepFolders) {
  auto p = ParseCheckpointPath("/data/ckpt/my-job/step-120/");
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(p->root, "/data/ckpt");
  EXPECT_EQ(p->job, "my-job");
  EXPECT_EQ(p->step, 120);
  auto latest = ParseCheckpointPath("/data/ckpt/my-job/latest");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->job, "my-job");
  EXPECT_EQ(latest->step, CheckpointPath::kLatest);
  EXPECT_FALSE(ParseCheckpointPath("/data/ckpt/my-job").ok());
  // Digits only: no sign (step--1 would read as the latest step), no spaces, no empty number.
  for (const char* bad : {"/data/step-12x", "/data/ckpt/j/step--1", "/data/ckpt/j/step-+5", "/data/ckpt/j/step- 5",
                          "/data/ckpt/j/step-"}) {
    EXPECT_FALSE(ParseCheckpointPath(bad).ok()) << bad;
  }
}

TEST(SafetensorsTest, RoundTripAndHalfPrecisionReads) {
  const fs::path dir = FreshDir("safetensors");
  std::vector<float> x = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 65504.0f};
  ASSERT_TRUE(WriteSafetensors((dir / "model.safetensors").string(), {{"x", {2, 3}, x.data()}}).ok());
  auto entries = ListSafetensors(dir.string());
  ASSERT_TRUE(entries.ok()) << entries.status();
  const SafetensorsEntry& e = entries->at("x");
  EXPECT_EQ(e.shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> got(6);
  ASSERT_TRUE(ReadAsFloat32(e, got.data()).ok());
  EXPECT_EQ(got, x);

  // A hand-made file with BF16 and F16 tensors (as Hugging Face checkpoints ship).
  const std::string header = R"({"h":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},)"
                             R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[6,10]}})";
  const uint16_t payload[5] = {0x3c00, 0xc100, 0x0001, 0x3f80, 0xc020};  // 1, -2.5, 2^-24 | 1, -2.5
  {
    std::ofstream out(dir / "half.safetensors", std::ios::binary);
    const uint64_t n = header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << header;
    out.write(reinterpret_cast<const char*>(payload), sizeof(payload));
  }
  auto half = *ListSafetensors((dir / "half.safetensors").string());
  std::vector<float> h(3), b(2);
  ASSERT_TRUE(ReadAsFloat32(half.at("h"), h.data()).ok());
  ASSERT_TRUE(ReadAsFloat32(half.at("b"), b.data()).ok());
  EXPECT_EQ(h, (std::vector<float>{1.0f, -2.5f, 0x1p-24f}));
  EXPECT_EQ(b, (std::vector<float>{1.0f, -2.5f}));
  // A range of elements alone (a ZeRO rank imports its part of each tensor).
  std::vector<float> part(2);
  ASSERT_TRUE(ReadAsFloat32(half.at("h"), 1, 3, part.data()).ok());
  EXPECT_EQ(part, (std::vector<float>{-2.5f, 0x1p-24f}));
  ASSERT_TRUE(ReadAsFloat32(e, 2, 4, part.data()).ok());
  EXPECT_EQ(part, (std::vector<float>{3.25f, 0.0f}));
  EXPECT_FALSE(ReadAsFloat32(e, 4, 7, part.data()).ok());

  // Offsets beyond the file, negative or fractional shapes and headers that are not an
  // object of tensors are refused, naming the file.
  for (const std::string& bad_header :
       {std::string(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,18446744073709551608]}})"),
        std::string(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})"),
        std::string(R"({"t":{"dtype":"F32","shape":[2.7],"data_offsets":[0,8]}})"),
        std::string(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8.5]}})"),
        std::string(R"([{"dtype":"F32","shape":[2],"data_offsets":[0,8]}])")}) {
    std::ofstream out(dir / "crafted.safetensors", std::ios::binary | std::ios::trunc);
    const uint64_t n = bad_header.size();
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << bad_header << std::string(8, '\0');
    out.close();
    auto crafted = ListSafetensors((dir / "crafted.safetensors").string());
    ASSERT_FALSE(crafted.ok()) << bad_header;
    EXPECT_NE(crafted.status().message().find("crafted.safetensors"), std::string::npos);
  }

  std::ofstream(dir / "bad.safetensors") << "garbage";
  auto bad = ListSafetensors((dir / "bad.safetensors").string());
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("bad.safetensors"), std::string::npos);
}

// A file is read whole (past any one read's size), or the error says why: a folder is not
// an empty file.
TEST(FilesTest, ReadFileReadsAllOrSaysWhyNot) {
  const fs::path dir = llamad::testing::ScratchDir("llamad-store") / "read-file";
  fs::create_directories(dir);
  std::string bytes(300'000, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = char(i * 131 + i / 7);
  ASSERT_TRUE(WriteFile((dir / "big").string(), bytes).ok());
  auto read = ReadFile((dir / "big").string());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(*read == bytes) << read->size() << " bytes read";
  ASSERT_TRUE(WriteFile((dir / "empty").string(), "").ok());
  read = ReadFile((dir / "empty").string());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, "");

  read = ReadFile((dir / "missing").string());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kNotFound) << read.status();
  EXPECT_EQ(read.status().message(), (dir / "missing").string() + ": cannot open: No such file or directory");
  read = ReadFile(dir.string());
  EXPECT_EQ(read.status().code(), absl::StatusCode::kInternal) << read.status();
  EXPECT_EQ(read.status().message(), dir.string() + ": read failed: Is a directory");
}

// TryAcquire never waits, not even to open a FIFO found where the lock file was expected
// (a plain read-only open of one waits for a writer). It runs in a child process, which
// the test can kill if it hangs.
TEST(FilesTest, TryAcquireDoesNotWaitOnAFifo) {
  const fs::path dir = llamad::testing::ScratchDir("llamad-store") / "fifo-lock";
  fs::create_directories(dir);
  const fs::path fifo = dir / "launcher.lock";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) ::_exit(FileLock::TryAcquire(fifo.string()).ok() ? 0 : 1);
  int status = 0;
  pid_t done = 0;
  for (int tries = 0; tries < 200 && done == 0; ++tries) {  // up to 10 s
    done = ::waitpid(child, &status, WNOHANG);
    if (done == 0) ::usleep(50'000);
  }
  if (done == 0) {
    ::kill(child, SIGKILL);
    ::waitpid(child, &status, 0);
    FAIL() << "TryAcquire on a FIFO still waited after 10 s";
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "status " << status;
}

}  // namespace
}  // namespace llamad::storage
