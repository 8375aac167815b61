#include "train/checkpointing.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "comm/backend_collectives.h"
#include "core/strings.h"
#include "data/tokenizer.h"
#include "storage/files.h"
#include "storage/safetensors.h"

namespace llamad {
namespace {

constexpr int kCheckpointVersion = 1;

nlohmann::json ModelJson(const ModelConfig& c) {
  return nlohmann::json::parse(ModelConfigToHfJson(c));
}

// The state that is not in tensors.
std::string MetaJson(Trainer& trainer, const std::string& job, int64_t step, int world) {
  const JobSpec& spec = trainer.spec();
  const TrainingSpec& t = spec.training;
  // Each rank wrote the EvenSlice of the flat parameter layout its rank number gives.
  nlohmann::json ranks = nlohmann::json::array();
  for (int r = 0; r < world; ++r) ranks.push_back({{"rank", r}, {"shard", StrCat("rank-", r, ".shard")}});
  nlohmann::json meta = {
      {"format", "llamad-checkpoint"},
      {"version", kCheckpointVersion},
      {"job", job},
      {"step", step},
      {"model", ModelJson(spec.model)},
      {"world", {{"world_size", world}, {"plugin", spec.parallel.plugin}, {"ranks", ranks}}},
      {"optimizer",
       {{"name", "adamw"},
        {"step", trainer.step()},
        {"beta1", t.beta1},
        {"beta2", t.beta2},
        {"eps", t.adam_eps},
        {"weight_decay", t.weight_decay}}},
      {"lr_schedule",
       {{"lr", t.lr},
        {"min_lr_ratio", t.min_lr_ratio},
        {"warmup_steps", t.warmup_steps},
        {"total_steps", t.steps},
        {"position", trainer.step()}}},
      {"data",
       {{"sampler_position", trainer.sampler_position()},
        {"max_length", t.max_length},
        {"global_batch_size", t.batch_size * GradientAccumulationSteps(spec)},
        {"dataset", spec.data.dataset}}},
      // The generators are counter-based (core/rng.h): the seed is their whole state.
      {"rng", {{"kind", "counter-splitmix64"}, {"seed", t.seed}}},
  };
  return meta.dump(1);
}

size_t NumParams(const std::vector<ParamInfo>& params) {
  return params.empty() ? 0 : params.back().offset + params.back().numel;
}

}  // namespace

std::string ExpAvgName(const std::string& name) { return "optimizer.exp_avg." + name; }
std::string ExpAvgSqName(const std::string& name) { return "optimizer.exp_avg_sq." + name; }

AsyncCheckpointer::AsyncCheckpointer(storage::CheckpointStore* store, std::string job,
                                     std::function<void(int64_t, const absl::Status&)> on_commit)
    : AsyncCheckpointer(store, store->root(), std::move(job), 0, 1, 0, std::move(on_commit)) {}

AsyncCheckpointer::AsyncCheckpointer(storage::CheckpointStore* store, std::string root, std::string job, int rank,
                                     int world, uint64_t run,
                                     std::function<void(int64_t, const absl::Status&)> on_commit)
    : store_(store), root_(std::move(root)), job_(std::move(job)), rank_(rank), world_(world), run_(run),
      on_commit_(std::move(on_commit)) {
  worker_ = std::thread([this] { Worker(); });
}

AsyncCheckpointer::~AsyncCheckpointer() {
  // Training has stopped (finished, or failed with a lost rank): rank 0 stops waiting for
  // shards that may never come. A finished run has waited for its saves already (Wait).
  abandon_ = true;
  {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return !busy_; });
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

absl::Status AsyncCheckpointer::Wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return !busy_; });
  return last_status_;
}

absl::StatusOr<double> AsyncCheckpointer::Save(Trainer& trainer) {
  if (auto s = Wait(); !s.ok()) return s;
  const auto start = std::chrono::steady_clock::now();
  LlamaModel& model = trainer.model();
  Backend& be = trainer.backend();
  AdamWOptimizer& optimizer = trainer.optimizer();
  // This rank's part of the flat parameter layout; each tensor part in it becomes three
  // pieces (master weights, exp_avg, exp_avg_sq), 4 KiB aligned and padded.
  const auto [begin, end] = EvenSlice(model.num_params(), rank_, world_);
  constexpr size_t kAlign = 4096;
  auto padded = [&](size_t numel) { return (numel * sizeof(float) + kAlign - 1) / kAlign * kAlign; };
  struct Part {
    const ParamInfo* param;
    size_t lo, hi;         // flat elements
    float* dst[3] = {};    // master, exp_avg, exp_avg_sq
  };
  std::vector<Part> parts;
  size_t bytes = 0;
  ForEachTensorPart(model.params(), begin, end, [&](const ParamInfo& p, size_t lo, size_t hi) {
    parts.push_back({&p, lo, hi});
    bytes += 3 * padded(hi - lo);
  });
  if (bytes != buffer_bytes_) {
    buffer_.reset(static_cast<float*>(std::aligned_alloc(kAlign, std::max(bytes, kAlign))));
    if (!buffer_)
      return absl::ResourceExhaustedError(
          StrCat("checkpoint: cannot allocate ", bytes, " bytes of host memory"));
    buffer_bytes_ = bytes;
  }
  pieces_.clear();
  char* cursor = reinterpret_cast<char*>(buffer_.get());
  for (Part& part : parts) {
    const ParamInfo& p = *part.param;
    const std::string names[3] = {p.name, ExpAvgName(p.name), ExpAvgSqName(p.name)};
    const size_t count = part.hi - part.lo, size = padded(count);
    for (int kind = 0; kind < 3; ++kind) {
      part.dst[kind] = reinterpret_cast<float*>(cursor);
      std::memset(cursor + count * sizeof(float), 0, size - count * sizeof(float));
      pieces_.push_back({names[kind], p.shape, storage::ElementType::kF32, part.lo - p.offset,
                         part.hi - p.offset, cursor, size});
      cursor += size;
    }
  }
  // Checkpoints hold the optimizer's view (f32 master weights and moments), copied from
  // wherever this rank keeps it: the backend's buffers (whole, or the shard the rank
  // owns), the host-offloaded optimizer's arrays, or the NVMe swap.
  const size_t moment_base = optimizer.shard_begin();
  for (const Part& part : parts) {
    // Host-offloaded, the state of the elements from memory_end() on is in the
    // optimizer's host arrays (all of the shard's, or its last part).
    const size_t device_end =
        optimizer.host_offloaded() ? std::clamp(optimizer.memory_end(), part.lo, part.hi) : part.hi;
    if (device_end < part.hi) {
      const size_t at = device_end - optimizer.memory_end(), count = part.hi - device_end, into = device_end - part.lo;
      std::copy_n(optimizer.host_master() + at, count, part.dst[0] + into);
      // The host's moments end at swap_begin(); those after it are streamed below.
      const size_t moments = std::min(part.hi, std::max(device_end, optimizer.swap_begin())) - device_end;
      if (moments > 0) {
        optimizer.ReadHostMoment(AdamWOptimizer::kExpAvg, at, moments, part.dst[1] + into);
        optimizer.ReadHostMoment(AdamWOptimizer::kExpAvgSq, at, moments, part.dst[2] + into);
      }
    }
    if (device_end == part.lo) continue;
    be.DownloadF32(part.dst[0], model.master_at(part.lo), device_end - part.lo);
    // The moments in memory; those on the NVMe tier are streamed below.
    const size_t hi = std::min(device_end, optimizer.memory_end());
    if (part.lo >= hi) continue;
    const size_t moment_offset = model.accum_byte_offset(part.lo - moment_base);
    be.DownloadF32(part.dst[1], static_cast<char*>(optimizer.exp_avg()) + moment_offset, hi - part.lo);
    be.DownloadF32(part.dst[2], static_cast<char*>(optimizer.exp_avg_sq()) + moment_offset, hi - part.lo);
  }
  if (optimizer.offloaded()) {
    // Moments on the NVMe tier: streamed from the swap straight into the snapshot, so a
    // save needs no second copy of them in memory.
    auto s = optimizer.ReadOffloadedMoments([&](size_t first, size_t count, const float* m, const float* v) {
      for (const Part& part : parts) {
        const size_t lo = std::max(part.lo, first), hi = std::min(part.hi, first + count);
        if (lo >= hi) continue;
        std::copy(m + (lo - first), m + (hi - first), part.dst[1] + (lo - part.lo));
        std::copy(v + (lo - first), v + (hi - first), part.dst[2] + (lo - part.lo));
      }
    });
    if (!s.ok()) return s;
  }
  if (!tokenizer_model_.empty() && rank_ == 0) {
    const uint64_t n = tokenizer_model_.size();
    pieces_.push_back({kTokenizerTensor, {int64_t(n)}, storage::ElementType::kU8, 0, n, tokenizer_model_.data(), 0});
  }
  step_ = trainer.step();
  meta_ = MetaJson(trainer, job_, step_, world_);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  {
    std::lock_guard lock(mu_);
    busy_ = true;
  }
  cv_.notify_all();
  return seconds;
}

void AsyncCheckpointer::Worker() {
  std::unique_lock lock(mu_);
  while (true) {
    cv_.wait(lock, [&] { return busy_ || stop_; });
    if (!busy_ && stop_) return;
    lock.unlock();
    absl::Status status;
    try {
      auto records = storage::WriteShardFile(root_, job_, step_, rank_, pieces_);
      if (rank_ != 0) {
        // Rank 0 commits once every rank's shard is durable, or reports the failure.
        status = storage::PublishShardRecords(root_, job_, step_, rank_, run_, records);
        if (status.ok()) status = records.status();
      } else if (records.ok()) {
        auto others = storage::CollectShardRecords(root_, job_, step_, world_, run_, kPeerSaveTimeout,
                                                   [this] { return abandon_.load(); });
        if (others.ok()) {
          records->insert(records->end(), others->begin(), others->end());
          status = store_->Commit(job_, step_, meta_, *records);
        } else {
          status = others.status();
        }
      } else {
        status = records.status();
      }
    } catch (const std::exception& e) {  // a thread must not let an exception escape
      status = absl::InternalError(StrCat("checkpoint step ", step_, ": ", e.what()));
    }
    // A save that fails is a failure while training, whatever its cause: a checkpoint
    // folder that cannot be made partway through a run is not bad input (exit 2).
    if (!status.ok()) status = absl::InternalError(status.message());
    if (on_commit_) on_commit_(step_, status);
    lock.lock();
    last_status_ = status;
    busy_ = false;
    cv_.notify_all();
  }
}

namespace {

// What a restore and an export both require of a checkpoint's metadata: our format and
// version, the step the index keeps it under, which its optimizer also counts (a resume
// removes the checkpoints newer than the step it restored: a wrong step there would
// remove good ones), and a model. `where` names the checkpoint in errors.
absl::Status CheckMeta(const nlohmann::json& meta, int64_t step, const std::string& where) {
  if (!meta.is_object() || meta.value("format", "") != "llamad-checkpoint" ||
      meta.value("version", 0) != kCheckpointVersion) {
    return absl::InvalidArgumentError(StrCat(where, ": not a version-", kCheckpointVersion, " llamad checkpoint"));
  }
  const nlohmann::json none;
  const nlohmann::json& saved = meta.value("step", none);
  const nlohmann::json& counted = meta.contains("optimizer") ? meta["optimizer"].value("step", none) : none;
  if (saved != step || counted != step) {
    return absl::DataLossError(StrCat(where, ": damaged checkpoint metadata: the index has step ", step,
                                      ", the metadata says step ", saved.dump(), " and optimizer step ",
                                      counted.dump()));
  }
  if (!meta.contains("model") || !meta["model"].is_object()) {
    return absl::DataLossError(StrCat(where, ": damaged checkpoint metadata: no model configuration"));
  }
  return absl::OkStatus();
}

absl::Status RestoreCheckpointUnchecked(const storage::CheckpointStore& store, const std::string& job,
                                        int64_t step, Trainer& trainer) {
  auto meta_text = store.Meta(job, step);
  if (!meta_text.ok()) return meta_text.status();
  const std::string where = StrCat(store.StepDir(job, step));
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(*meta_text);
  } catch (const std::exception& e) {
    return absl::DataLossError(StrCat(where, ": unreadable checkpoint metadata: ", e.what()));
  }
  if (auto s = CheckMeta(meta, step, where); !s.ok()) return s;
  if (!meta["data"]["sampler_position"].is_number_unsigned()) {
    return absl::DataLossError(StrCat(where, ": damaged checkpoint metadata: data.sampler_position is ",
                                      meta["data"]["sampler_position"].dump()));
  }
  const JobSpec& spec = trainer.spec();
  const nlohmann::json ours = ModelJson(spec.model);
  for (const auto& [key, value] : ours.items()) {
    if (!meta["model"].contains(key) || meta["model"][key] != value) {
      return absl::InvalidArgumentError(StrCat(where, ": the checkpoint's model has ", key, " ",
                                               meta["model"].value(key, nlohmann::json()).dump(),
                                               ", the job has ", value.dump()));
    }
  }
  if (meta["data"]["max_length"] != spec.training.max_length) {
    return absl::InvalidArgumentError(
        StrCat(where, ": the checkpoint was trained with training.max_length ",
               meta["data"]["max_length"].dump(), ", the job has ", spec.training.max_length));
  }
  if (meta["rng"]["seed"] != spec.training.seed) {
    return absl::InvalidArgumentError(
        StrCat(where, ": the checkpoint's data order comes from training.seed ",
               meta["rng"]["seed"].dump(), ", the job has ", spec.training.seed));
  }
  LlamaModel& model = trainer.model();
  Backend& be = trainer.backend();
  AdamWOptimizer& optimizer = trainer.optimizer();
  // Elements [begin, end) of a checkpointed tensor go to dst: the backend's buffers, or
  // (in_host) host f32 memory of the optimizer's, or (host_moment) the optimizer's host
  // moment from index `at` on, in whichever type it keeps them.
  struct Item {
    std::string name;
    size_t begin, end;
    void* dst;
    size_t order;  // where a save put it: by flat element, then weight, exp_avg, exp_avg_sq
    bool in_host = false;
    std::optional<AdamWOptimizer::Moment> host_moment = std::nullopt;
    size_t at = 0;
  };
  std::vector<Item> items;
  // The moments this optimizer holds: all, or its ZeRO shard.
  const size_t shard_begin = optimizer.shard_begin(), shard_end = optimizer.shard_end();
  // A GPU's optimizer state already in host memory (offload.optimizer host or nvme): the
  // master weights and moments of the elements from memory_end() on go straight into
  // the optimizer's host arrays (the moments past swap_begin() into the swap, below), so
  // that a restore never holds them on the device.
  const bool host_offloaded = optimizer.host_offloaded();
  const size_t device_end = host_offloaded ? optimizer.memory_end() : shard_end;
  // The master weights this model holds (all, or its ZeRO shard), of the elements this
  // rank steps: a ZeRO rank whose model holds all of them (the CPU's zero1/2) reads its
  // shard and gathers the rest from the others, as after a step. A GPU's are its shard's.
  const auto [held_begin, held_end] = model.held_master_range();
  const size_t weights_begin = std::max(held_begin, shard_begin);
  const size_t weights_end = host_offloaded ? shard_end : std::min(held_end, shard_end);
  ForEachTensorPart(model.params(), weights_begin, weights_end, [&](const ParamInfo& p, size_t lo, size_t hi) {
    const size_t split = std::clamp(device_end, lo, hi);
    if (split > lo) items.push_back({p.name, lo - p.offset, split - p.offset, model.master_at(lo), 3 * lo});
    if (hi > split) {
      items.push_back({p.name, split - p.offset, hi - p.offset, optimizer.mutable_host_master() + (split - device_end),
                       3 * split, true});
    }
  });
  // The moments in the backend's memory, then in host memory; those on the NVMe tier are
  // streamed into the swap below.
  ForEachTensorPart(model.params(), shard_begin, optimizer.memory_end(), [&](const ParamInfo& p, size_t lo, size_t hi) {
    const size_t at = model.accum_byte_offset(lo - shard_begin);
    items.push_back({ExpAvgName(p.name), lo - p.offset, hi - p.offset,
                     static_cast<char*>(optimizer.exp_avg()) + at, 3 * lo + 1});
    items.push_back({ExpAvgSqName(p.name), lo - p.offset, hi - p.offset,
                     static_cast<char*>(optimizer.exp_avg_sq()) + at, 3 * lo + 2});
  });
  if (host_offloaded) {
    ForEachTensorPart(model.params(), device_end, optimizer.swap_begin(), [&](const ParamInfo& p, size_t lo, size_t hi) {
      const size_t at = lo - device_end;
      items.push_back({ExpAvgName(p.name), lo - p.offset, hi - p.offset, nullptr, 3 * lo + 1, true,
                       AdamWOptimizer::kExpAvg, at});
      items.push_back({ExpAvgSqName(p.name), lo - p.offset, hi - p.offset, nullptr, 3 * lo + 2, true,
                       AdamWOptimizer::kExpAvgSq, at});
    });
  }
  // In the order a save writes them (AsyncCheckpointer::Save): each reader streams a
  // run of consecutive items, so that it moves through the shard file front to back.
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.order < b.order; });
  // Two readers, so that one checksums and copies while the other waits for the disk,
  // with as many requests in flight together as a save keeps. More did not help on the
  // disk it was measured on (README.md, "Measured": 4 readers x 4 requests came to
  // 69-85% of fio, 2 x 2 to 79-107% over 24 runs).
  constexpr int kReaders = 2;
  constexpr int kDepthPerReader = storage::CheckpointStore::kDefaultReadDepth / kReaders;
  // Each reader streams its run through two 8 MiB buffers of the store's, uploading
  // each segment as it comes: bounded memory, and no fresh pages to fault in per tensor.
  std::mutex upload_mu;  // The backend is not thread-safe...
  // ...but f32 buffers in host memory take plain copies, which need no lock: every item
  // has its own destination (measured on tmpfs with an earlier four readers: 2.7 GB/s
  // through the backend under the lock, 3.7 GB/s with copies).
  const bool host_f32 = BuffersInHostMemory(be);
  size_t total = 0;
  for (const Item& item : items) total += item.end - item.begin;
  std::vector<absl::Status> results(kReaders);
  std::vector<std::thread> readers;
  size_t first = 0, done = 0;
  for (int r = 0; r < kReaders; ++r) {
    // Runs of about equal size.
    size_t last = first;
    const size_t until = total * size_t(r + 1) / size_t(kReaders);
    while (last < items.size() && (done < until || r + 1 == kReaders)) {
      done += items[last].end - items[last].begin;
      ++last;
    }
    if (last == first) continue;
    readers.emplace_back([&, r, first, last] {
      try {
        auto reader = store.OpenReader(job, step, kDepthPerReader);
        if (!reader.ok()) {
          results[r] = reader.status();
          return;
        }
        std::vector<storage::CheckpointStore::Reader::RangeRead> ranges;
        for (size_t i = first; i < last; ++i) {
          const Item& item = items[i];
          ranges.push_back({item.name, storage::ElementType::kF32, item.begin, item.end,
                            [&](uint64_t from, const void* data, uint64_t count) {
                              if (item.host_moment) {
                                optimizer.WriteHostMoment(*item.host_moment, item.at + (from - item.begin), count,
                                                          static_cast<const float*>(data));
                                return;
                              }
                              if (host_f32 || item.in_host) {
                                std::memcpy(static_cast<float*>(item.dst) + (from - item.begin), data,
                                            count * sizeof(float));
                                return;
                              }
                              void* dst = static_cast<char*>(item.dst) + model.accum_byte_offset(from - item.begin);
                              std::lock_guard lock(upload_mu);
                              be.UploadF32(dst, static_cast<const float*>(data), count);
                            }});
        }
        results[r] = (*reader)->ReadRangesStreamed(ranges);
      } catch (const std::exception& e) {  // a thread must not let an exception escape
        results[r] = absl::InternalError(StrCat("restore: ", e.what()));
      }
    });
    first = last;
  }
  for (auto& t : readers) t.join();
  for (const auto& s : results) {
    if (!s.ok()) return s;
  }
  if (optimizer.offloaded()) {
    // Moments on the NVMe tier go from the checkpoint into the swap chunk by chunk, so a
    // restore never holds them whole in memory: only the tensor (its part in the shard)
    // a chunk is in, both moments, each read once since chunks come in layout order.
    auto reader = store.OpenReader(job, step);
    if (!reader.ok()) return reader.status();
    std::vector<float> cached_m, cached_v;
    const ParamInfo* cached = nullptr;
    absl::Status read_error;  // the checkpoint's, as opposed to the swap's
    auto streamed = optimizer.WriteOffloadedMoments([&](size_t first, size_t count, float* m, float* v) -> absl::Status {
      ForEachTensorPart(model.params(), first, first + count, [&](const ParamInfo& p, size_t lo, size_t hi) {
        if (!read_error.ok()) return;
        // The tensor's part on the NVMe tier, which [lo, hi) lies in.
        const size_t part_lo = std::max(p.offset, optimizer.swap_begin());
        const size_t part_hi = std::min(p.offset + p.numel, shard_end);
        if (cached != &p) {
          try {
            cached_m.resize(part_hi - part_lo);
            cached_v.resize(part_hi - part_lo);
          } catch (const std::bad_alloc&) {
            read_error = absl::ResourceExhaustedError(StrCat(
                "restore: no host memory for the ", 8 * (part_hi - part_lo), " bytes of tensor ", p.name, "'s moments"));
            return;
          }
          for (auto [name, out] : {std::pair{ExpAvgName(p.name), cached_m.data()}, std::pair{ExpAvgSqName(p.name), cached_v.data()}}) {
            read_error = (*reader)->ReadRange(name, storage::ElementType::kF32, part_lo - p.offset, part_hi - p.offset, out);
            if (!read_error.ok()) return;
          }
          cached = &p;
        }
        std::copy(cached_m.begin() + (lo - part_lo), cached_m.begin() + (hi - part_lo), m + (lo - first));
        std::copy(cached_v.begin() + (lo - part_lo), cached_v.begin() + (hi - part_lo), v + (lo - first));
      });
      return read_error;
    });
    if (!read_error.ok()) return read_error;
    // Writing the swap fails as a write does (not DataLoss: the checkpoint is fine).
    if (!streamed.ok()) return absl::Status(streamed.code(), StrCat("restoring into the NVMe swap: ", streamed.message()));
  }
  model.SyncParamsFromMaster();
  optimizer.UploadHostWeights();
  trainer.SetProgress(step, meta["data"]["sampler_position"].get<uint64_t>());
  return absl::OkStatus();
}

// The checkpoint's tokenizer model, checked to load; nullptr when it has none.
absl::StatusOr<std::unique_ptr<data::Tokenizer>> ReadSavedTokenizer(const storage::CheckpointStore& store,
                                                                    const std::string& job, int64_t step,
                                                                    const std::vector<storage::PieceRecord>& pieces,
                                                                    storage::CheckpointStore::Reader& reader) {
  // The model's bytes are one u8 tensor of shape [n], in pieces that end at n.
  const storage::PieceRecord* record = nullptr;
  uint64_t size = 0;
  for (const storage::PieceRecord& p : pieces) {
    if (p.name != kTokenizerTensor) continue;
    record = &p;
    size = std::max(size, p.end);
  }
  if (record == nullptr) return nullptr;
  constexpr uint64_t kLargestModel = uint64_t{1} << 30;  // SentencePiece models are megabytes
  if (size > kLargestModel || record->shape != std::vector<int64_t>{int64_t(size)}) {
    return absl::DataLossError(StrCat(store.StepDir(job, step), ": damaged checkpoint index: tensor '",
                                      kTokenizerTensor, "' has shape ", nlohmann::json(record->shape).dump(),
                                      " but pieces up to byte ", size, " (at most ", kLargestModel, ")"));
  }
  std::string bytes(size, '\0');
  if (auto s = reader.ReadRange(kTokenizerTensor, storage::ElementType::kU8, 0, size, bytes.data()); !s.ok()) return s;
  std::string error;
  auto tokenizer = data::Tokenizer::FromSerialized(bytes, &error);
  if (!tokenizer) {
    return absl::DataLossError(StrCat(store.StepDir(job, step), ": the saved tokenizer does not load: ", error));
  }
  return tokenizer;
}

// Writes a tokenizer model as a Hugging Face LlamaTokenizer (tokenizer.model +
// tokenizer_config.json + special_tokens_map.json).
absl::Status WriteHuggingFaceTokenizer(const data::Tokenizer& tokenizer, const std::string& out) {
  const nlohmann::json special = {{"bos_token", tokenizer.IdToPiece(tokenizer.bos_id())},
                                  {"eos_token", tokenizer.IdToPiece(tokenizer.eos_id())},
                                  {"unk_token", tokenizer.IdToPiece(tokenizer.unk_id())}};
  nlohmann::json config = special;
  config["tokenizer_class"] = "LlamaTokenizer";
  config["add_bos_token"] = true;
  config["add_eos_token"] = false;
  config["clean_up_tokenization_spaces"] = false;
  config["legacy"] = false;
  const std::pair<const char*, std::string> files[] = {{"tokenizer.model", tokenizer.serialized()},
                                                       {"special_tokens_map.json", special.dump(2) + "\n"},
                                                       {"tokenizer_config.json", config.dump(2) + "\n"}};
  for (const auto& [name, bytes] : files) {
    if (auto s = storage::WriteFileAtomically(StrCat(out, "/", name), bytes); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Every parameter of the checkpoint's model is saved with its shape, and its pieces hold
// all its elements: the export's buffer is then no larger than what is on disk, whatever
// the metadata's model says.
absl::Status CheckParamsSaved(const storage::CheckpointStore& store, const std::string& job, int64_t step,
                              const std::vector<storage::PieceRecord>& pieces, const std::vector<ParamInfo>& params) {
  struct Saved {
    std::vector<int64_t> shape;
    uint64_t elements = 0;
  };
  std::map<std::string, Saved> saved;
  for (const storage::PieceRecord& p : pieces) {
    Saved& t = saved[p.name];
    t.shape = p.shape;
    t.elements += p.end - p.begin;
  }
  for (const ParamInfo& p : params) {
    const auto it = saved.find(p.name);
    if (it == saved.end() || it->second.shape != p.shape || it->second.elements < p.numel) {
      const std::string found = it == saved.end() ? std::string(" (no such tensor)")
                                                  : StrCat(" (saved: [", StrJoin(it->second.shape, ", "), "], ",
                                                           it->second.elements, " elements)");
      return absl::DataLossError(StrCat(store.StepDir(job, step), ": tensor '", p.name, "' of shape [",
                                        StrJoin(p.shape, ", "), "], which the checkpoint's model needs, is not saved",
                                        " whole", found));
    }
  }
  return absl::OkStatus();
}

absl::Status ExportHuggingFaceUnchecked(const storage::CheckpointStore& store,
                                        const std::string& job, int64_t step,
                                        const std::string& out, bool* with_tokenizer) {
  auto meta_text = store.Meta(job, step);
  if (!meta_text.ok()) return meta_text.status();
  const auto meta = nlohmann::json::parse(*meta_text);
  if (auto s = CheckMeta(meta, step, store.StepDir(job, step)); !s.ok()) return s;
  auto config = ModelConfigFromHfJson(meta.at("model").dump(), store.StepDir(job, step));
  if (!config.ok()) return config.status();
  const std::vector<ParamInfo> params = LlamaParamLayout(*config);
  // Everything is checked before anything is allocated or written.
  auto pieces = store.Pieces(job, step);
  if (!pieces.ok()) return pieces.status();
  if (auto s = CheckParamsSaved(store, job, step, *pieces, params); !s.ok()) return s;
  auto reader = store.OpenReader(job, step);
  if (!reader.ok()) return reader.status();
  auto tokenizer = ReadSavedTokenizer(store, job, step, *pieces, **reader);
  if (!tokenizer.ok()) return tokenizer.status();
  std::vector<float> data(NumParams(params));
  std::vector<storage::TensorToWrite> tensors;
  for (const ParamInfo& p : params) {
    if (auto s = (*reader)->ReadRange(p.name, storage::ElementType::kF32, 0, p.numel, data.data() + p.offset);
        !s.ok())
      return s;
    tensors.push_back({p.name, p.shape, data.data() + p.offset});
  }
  if (auto s = storage::CreateFolders(out); !s.ok()) return s;
  if (auto s = storage::WriteSafetensors(
          (std::filesystem::path(out) / "model.safetensors").string(), tensors,
          {{"format", "pt"}, {"llamad_job", job}, {"llamad_step", StrCat(step)}});
      !s.ok()) {
    return s;
  }
  nlohmann::json hf = meta.at("model");
  hf["architectures"] = {"LlamaForCausalLM"};
  hf["model_type"] = "llama";
  hf["hidden_act"] = "silu";
  hf["tie_word_embeddings"] = false;
  hf["torch_dtype"] = "float32";
  hf["bos_token_id"] = 1;
  hf["eos_token_id"] = 2;
  hf["attention_bias"] = false;
  hf["rope_scaling"] = nullptr;
  if (auto s = storage::WriteFileAtomically(StrCat(out, "/config.json"), hf.dump(2) + "\n"); !s.ok()) return s;
  if (*tokenizer) {
    if (auto s = WriteHuggingFaceTokenizer(**tokenizer, out); !s.ok()) return s;
  }
  if (with_tokenizer != nullptr) *with_tokenizer = *tokenizer != nullptr;
  return absl::OkStatus();
}

}  // namespace

// Metadata of the wrong shape makes nlohmann::json throw; that is a damaged checkpoint.
absl::Status RestoreCheckpoint(const storage::CheckpointStore& store, const std::string& job,
                               int64_t step, Trainer& trainer) {
  try {
    return RestoreCheckpointUnchecked(store, job, step, trainer);
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(
        StrCat(store.StepDir(job, step), ": damaged checkpoint metadata: ", e.what()));
  }
}

absl::Status ExportHuggingFace(const storage::CheckpointStore& store, const std::string& job,
                               int64_t step, const std::string& out, bool* with_tokenizer) {
  try {
    return ExportHuggingFaceUnchecked(store, job, step, out, with_tokenizer);
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(
        StrCat(store.StepDir(job, step), ": damaged checkpoint metadata: ", e.what()));
  }
}

absl::StatusOr<ModelConfig> ReadHuggingFaceConfig(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(StrCat(path, ": cannot open (a Hugging Face model folder has one)"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ModelConfigFromHfJson(ss.str(), path);
}

absl::Status LoadHuggingFaceWeights(const std::string& dir, LlamaModel& model, Backend& backend, size_t begin,
                                    size_t end) {
  if (model.master_data() == nullptr) {
    return absl::FailedPreconditionError(
        StrCat(dir, ": load before moving the optimizer state to host memory (offload.optimizer host)"));
  }
  auto entries = storage::ListSafetensors(dir);
  if (!entries.ok()) return entries.status();
  // Every tensor is checked; a ZeRO rank reads only its part of the tensors.
  const size_t held_begin = std::max(model.held_master_range().first, begin);
  const size_t held_end = std::min(model.held_master_range().second, end);
  std::vector<float> host;
  for (const ParamInfo& p : model.params()) {
    auto it = entries->find(p.name);
    if (it == entries->end()) return absl::NotFoundError(StrCat(dir, ": no tensor '", p.name, "'"));
    if (it->second.shape != p.shape) {
      return absl::InvalidArgumentError(StrCat(
          it->second.file, ": tensor '", p.name, "' has shape [", StrJoin(it->second.shape, ", "),
          "], the model needs [", StrJoin(p.shape, ", "), "]"));
    }
    const size_t lo = std::max(p.offset, held_begin), hi = std::min(p.offset + p.numel, held_end);
    if (lo >= hi) continue;
    host.resize(hi - lo);
    if (auto s = storage::ReadAsFloat32(it->second, lo - p.offset, hi - p.offset, host.data()); !s.ok()) return s;
    backend.UploadF32(model.master_at(lo), host.data(), hi - lo);
  }
  model.SyncParamsFromMaster();
  return absl::OkStatus();
}

}  // namespace llamad
