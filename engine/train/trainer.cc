#include "train/trainer.h"

#include <chrono>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>

#include "backend/cpu/cpu_backend.h"
#include "comm/background_all_reduce.h"
#include "comm/device_collectives.h"
#include "comm/backend_collectives.h"
#include "core/host_memory.h"
#include "train/memory_plan.h"
#include "train/placement.h"
#include "core/strings.h"

namespace llamad {

Trainer::Trainer(const JobSpec& spec, Backend* backend, double peak_flops, Communicator* comm)
    : spec_(spec), backend_(backend), comm_(comm), peak_flops_(peak_flops) {
  if (comm_ == nullptr) {
    local_comm_ = MakeLocalCommunicator();
    comm_ = local_comm_.get();
  }
  device_ = DeviceCollectivesFor(*comm_, *backend_);
  const TrainingSpec& t = spec_.training;
  LlamaOptions options;
  options.grad_checkpoint = t.grad_checkpoint;
  options.attention_block = t.flash_attention ? 64 : 0;
  const std::string& plugin = spec_.parallel.plugin;
  const bool zero = plugin != "ddp" && comm_->world_size() > 1;
  if (zero) {
    // Each rank builds only its shard: the whole model never exists on one rank.
    std::tie(options.shard_begin, options.shard_end) =
        EvenSlice(size_t(spec_.model.NumParameters()), comm_->rank(), comm_->world_size());
    options.shard_parameters = plugin == "zero3";
    if (options.shard_parameters) {
      options.replicated_begin = ReplicatedBegin(spec_.model, spec_.parallel.sharded_share);
    }
  }
  model_ = std::make_unique<LlamaModel>(spec_.model, backend_, options);
  model_->InitWeights(t.seed);
  optimizer_ = std::make_unique<AdamWOptimizer>(
      model_.get(), backend_, AdamWOptions{t.beta1, t.beta2, t.adam_eps, t.weight_decay});
  if (zero) {
    ShardOptimizerState();
    if (plugin == "zero2" || plugin == "zero3") ShardGradients();
    if (plugin == "zero3") ShardParameters();
  }
  schedule_ = LrSchedule{t.lr, t.min_lr_ratio, t.warmup_steps, t.steps};
  const size_t n = size_t(t.batch_size) * t.max_length;
  tokens_.resize(n);
  targets_.resize(n);
}

Trainer::~Trainer() {
  FinishRegionReduce();
  backend_->Free(region_copy_);
}

void Trainer::FinishRegionReduce() {
  if (device_region_end_ > device_region_begin_) {
    // On the GPU: the backend's ops wait for the reductions from here on, and the owner
    // adds its part of the sum into its shard.
    const size_t begin = device_region_begin_, end = device_region_end_;
    device_region_begin_ = device_region_end_ = 0;
    // Also after a failure: the copy is written again next, and freed at the end.
    const absl::Status joined = device_->JoinCollective(device_region_ticket_);
    if (model_collective_status_.ok()) model_collective_status_ = joined;
    if (!model_collective_status_.ok()) return;
    const size_t lo = std::max(begin, optimizer_->shard_begin()), hi = std::min(end, optimizer_->shard_end());
    if (lo < hi) {
      backend_->Add(model_->grad_at(lo), static_cast<char*>(region_copy_) + model_->accum_byte_offset(lo - begin), hi - lo);
    }
    return;
  }
  if (!region_reduce_.valid()) return;
  const auto start = std::chrono::steady_clock::now();
  std::shared_future<void> done = std::move(region_reduce_);
  region_reduce_ = {};
  done.get();
  model_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}



absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const JobSpec& spec, Backend* backend,
                                                         double peak_flops, Communicator* comm) {
  if (auto s = ValidateJobSpec(spec); !s.ok()) return s;
  const std::string& f = spec.path;
  if (spec.training.mixed_precision != "fp32" && backend->name() == "cpu") {
    return absl::InvalidArgumentError(StrCat(
        f, ": training.mixed_precision: '", spec.training.mixed_precision,
        "' needs the CUDA backend; the CPU backend trains in fp32"));
  }
  if (backend->name() == "cuda") {
    if (spec.training.mixed_precision != "bf16") {
      return absl::InvalidArgumentError(StrCat(
          f, ": training.mixed_precision: '", spec.training.mixed_precision,
          "': the CUDA backend trains in bf16 (with f32 master weights and optimizer state)"));
    }
    const int64_t d = spec.model.head_dim();
    if (d != 32 && d != 64 && d != 128) {
      return absl::InvalidArgumentError(StrCat(
          f, ": model ", spec.model.name, " has head_dim ", d,
          " (hidden_size / num_attention_heads); the CUDA attention kernels take 32, 64 or 128"));
    }
  }
  if (spec.training.max_length > spec.model.max_position_embeddings) {
    return absl::InvalidArgumentError(StrCat(
        f, ": training.max_length: ", spec.training.max_length,
        " exceeds the model's max_position_embeddings ", spec.model.max_position_embeddings));
  }
  return CreateWithinMemory(spec, backend, peak_flops, comm);
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::CreateWithinMemory(const JobSpec& requested, Backend* backend,
                                                                     double peak_flops, Communicator* comm) {
  const int world = comm != nullptr ? comm->world_size() : 1;
  const bool cuda = backend->name() == "cuda";
  // The job's budget per rank when it gives one; else what the GPU has free now (the
  // CUDA context and the libraries' workspaces already taken), or the host's available
  // memory shared by the ranks on the CPU backend. 0: unknown.
  int64_t budget = requested.offload.memory_budget_gb > 0
                             ? int64_t(requested.offload.memory_budget_gb * double(1 << 30))
                         : cuda ? int64_t(backend->device_memory_bytes())
                                : AvailableHostMemoryBytes() / world;
  if (world > 1) {
    // Every rank must decide the same (the layout, whether the job fits): they agree on
    // the smallest budget any of them knows.
    std::vector<double> budgets(size_t(world), 0);
    budgets[size_t(comm->rank())] = double(std::max<int64_t>(budget, 0));
    if (auto s = comm->AllReduceSum(budgets.data(), budgets.size()); !s.ok()) return s;
    budget = 0;
    for (double b : budgets) {
      if (b > 0 && (budget == 0 || int64_t(b) < budget)) budget = int64_t(b);
    }
  }
  auto plan_of = [&](const JobSpec& s) {
    if (cuda) return PlanMemoryOn(s, /*cuda=*/true, world, 0);
    return PlanMemory(s, backend->dtype(), backend->accum_dtype(), world, CpuBackendOptions{}.lm_head_chunk_elements,
                      int(DTypeSize(backend->dtype())), 3 * CpuThreads());
  };
  auto gemini = PlaceJob(requested, cuda, world, uint64_t(std::max<int64_t>(budget, 0)), plan_of, /*must_fit=*/true,
                         /*master_weights_apart=*/!cuda && backend->needs_master_weights());
  if (!gemini.ok()) return gemini.status();
  const JobSpec& spec = gemini->spec;  // gemini resolved to zero2/zero3 and the optimizer's tier
  const std::string& f = spec.path;
  if (comm != nullptr && comm->world_size() > 1) {
    const int64_t global = spec.training.global_batch_size > 0 ? spec.training.global_batch_size
                                                                : spec.training.batch_size;
    if (global < comm->world_size()) {
      return absl::InvalidArgumentError(StrCat(
          f, ": the global batch of ", global, " sequences is smaller than the ", comm->world_size(),
          " ranks (raise training.global_batch_size)"));
    }
  }
  auto trainer = std::unique_ptr<Trainer>(new Trainer(spec, backend, peak_flops, comm));
  trainer->placement_ = gemini->summary;
  return trainer;
}

absl::StatusOr<StepMetrics> Trainer::Step(WindowSampler& sampler) {
  const auto start = std::chrono::steady_clock::now();
  const TrainingSpec& t = spec_.training;
  const int batch = int(t.batch_size), seq = int(t.max_length);
  // The global batch is the job's; the world size only decides who reads which part.
  const uint64_t global = uint64_t(t.global_batch_size > 0 ? t.global_batch_size : t.batch_size);
  const double targets_per_step = double(global) * seq;
  const auto [begin, end] = WindowSampler::RankSlice(global, comm_->rank(), comm_->world_size());

  StepMetrics m;
  m.step = optimizer_->step() + 1;
  // A GPU rank's collectives on its own buffers (NCCL) time themselves on the GPU.
  DeviceCollectives* device = device_;
  const double device_busy = device != nullptr ? device->busy_seconds() : 0;
  const double device_exposed = device != nullptr ? device->exposed_seconds() : 0;
  model_->ZeroGrads();
  model_collective_seconds_ = model_wait_seconds_ = 0;
  double loss_sum = 0;
  // With several ranks, the last micro-batch's backward hands each finished gradient
  // range to a background all-reduce, so communication overlaps the rest of the backward.
  std::unique_ptr<BackgroundAllReduce> reducer;
  // zero2 and zero3 reduce gradients and gather parameters region by region inside every
  // micro-batch, so each rank runs as many micro-batches as the rank with the most. A
  // rank with fewer repeats its last one with weight 0: the same collectives, no
  // gradient, no loss.
  auto rounds_of = [&](uint64_t windows) { return (windows + uint64_t(batch) - 1) / uint64_t(batch); };
  uint64_t rounds = rounds_of(end - begin);
  if (model_->gradients_sharded() || model_->parameters_sharded()) {
    for (int r = 0; r < comm_->world_size(); ++r) {
      const auto [b, e] = WindowSampler::RankSlice(global, r, comm_->world_size());
      rounds = std::max(rounds, rounds_of(e - b));
    }
  }
  int count = 0;
  for (uint64_t round = 0; round < rounds; ++round) {
    const uint64_t first = begin + round * uint64_t(batch);
    const bool padding = first >= end;  // tokens_ still holds the previous micro-batch
    if (!padding) {
      count = int(std::min<uint64_t>(uint64_t(batch), end - first));
      sampler.Fill(sampler.position() + first, count, tokens_.data(), targets_.data());
      if (auto s = CheckIdsInVocabulary(count, seq, "window at sample position ", sampler.position() + first);
          !s.ok()) {
        return s;
      }
    }
    const bool last = first + uint64_t(count) >= end;
    if (last && !padding && comm_->world_size() > 1 && CollectivesCanRunBeside() &&
        !model_->gradients_sharded()) {
      const size_t bucket = size_t(spec_.parallel.bucket_mb * double(1 << 20) / sizeof(float));
      if (device != nullptr) {
        reducer = std::make_unique<BackgroundAllReduce>(device, model_->grad_data(), backend_->accum_dtype(), bucket);
      } else {
        reducer = std::make_unique<BackgroundAllReduce>(comm_, static_cast<float*>(model_->grad_data()), bucket);
      }
      model_->set_grad_ready_hook([&](size_t b, size_t e) { reducer->Add(b, e); });
    }
    const double loss = model_->ForwardBackward(tokens_.data(), targets_.data(), count, seq,
                                                padding ? 0.0 : 1.0 / targets_per_step);
    if (!padding) loss_sum += loss;
    model_->set_grad_ready_hook(nullptr);
    FinishRegionReduce();  // the embedding's, last of the backward
    if (!model_collective_status_.ok()) return model_collective_status_;
  }
  sampler.set_position(sampler.position() + global);
  auto seconds_since = [](std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  };
  // The losses' and norms' sums over Gloo, timed apart: with NCCL they are the host's
  // only communication.
  double host_scalar_seconds = 0;
  auto host_sum = [&](double* x, size_t n = 1) {
    const auto begin = std::chrono::steady_clock::now();
    absl::Status s = comm_->AllReduceSum(x, n);
    host_scalar_seconds += seconds_since(begin);
    return s;
  };
  // This rank's stop request goes with the loss: every rank learns of any rank's in the
  // same sum, so all of them stop after the same step.
  auto stop_asked = [&] { return stop_flag_ != nullptr && stop_flag_->load() ? 1.0 : 0.0; };
  bool stop_summed = false;
  auto sum_loss = [&] {
    double sums[2] = {loss_sum, stop_asked()};
    absl::Status s = host_sum(sums, 2);
    loss_sum = sums[0];
    m.stop_requested = sums[1] > 0;
    stop_summed = true;
    return s;
  };
  auto comm_start = std::chrono::steady_clock::now();
  if (model_->gradients_sharded()) {
    // zero2: the gradients were reduced region by region during the backward.
    if (auto s = sum_loss(); !s.ok()) return s;
    const double after = seconds_since(comm_start);
    m.communication_seconds = model_collective_seconds_ + after;
    m.exposed_communication_seconds = model_wait_seconds_ + after;
  } else if (comm_->world_size() > 1 && !reducer) {
    // GPU ranks without NCCL: the whole gradient through host memory once the backward
    // is done.
    if (auto s = AllReduceSumOnBackend(*comm_, *backend_, model_->grad_data(), model_->num_params());
        !s.ok()) {
      return s;
    }
    if (auto s = sum_loss(); !s.ok()) return s;
    m.communication_seconds = m.exposed_communication_seconds = seconds_since(comm_start);
  }
  if (reducer) {
    // Every rank ends with the whole summed gradient (ddp), and the summed loss.
    if (auto s = reducer->Finish(); !s.ok()) return s;
    m.exposed_communication_seconds = seconds_since(comm_start);  // waiting for the buckets
    const auto loss_start = std::chrono::steady_clock::now();
    if (auto s = sum_loss(); !s.ok()) return s;
    const double loss_reduce = seconds_since(loss_start);
    m.exposed_communication_seconds += loss_reduce;
    m.communication_seconds = reducer->busy_seconds() + loss_reduce;
  }
  if (!stop_summed) m.stop_requested = stop_asked() > 0;  // one rank: nobody to agree with
  m.loss = loss_sum / targets_per_step;
  if (model_->gradients_sharded()) {
    const size_t begin = optimizer_->shard_begin(), end = optimizer_->shard_end();
    double squares = backend_->SumSquares(model_->grad_at(begin), end - begin);
    if (auto s = host_sum(&squares); !s.ok()) return s;
    m.grad_norm = std::sqrt(squares);
  } else {
    m.grad_norm = std::sqrt(backend_->SumSquares(model_->grad_data(), model_->num_params()));
  }
  // The norm waited for the GPU's work, so its collectives have finished: one that failed
  // after it was queued left void sums, which the optimizer must not step on.
  if (device != nullptr) {
    if (auto s = device->status(); !s.ok()) return s;
  }
  const double clip = t.grad_clip > 0 && m.grad_norm > t.grad_clip ? t.grad_clip / (m.grad_norm + 1e-6) : 1.0;
  m.lr = schedule_.At(m.step - 1);
  if (auto s = optimizer_->Step(m.lr, clip); !s.ok()) return s;
  if (model_->replica() != nullptr) {
    comm_start = std::chrono::steady_clock::now();
    if (auto s = RefreshReplica(); !s.ok()) return s;
    const double gather = seconds_since(comm_start);
    m.communication_seconds += gather;
    m.exposed_communication_seconds += gather;
  }
  if (zero1_ && !model_->parameters_sharded()) {
    comm_start = std::chrono::steady_clock::now();
    // Each rank updated its own slice of the parameters: gather them everywhere (on a GPU
    // the layers' bf16 copy; each rank holds the master weights of its slice only).
    const size_t n = model_->num_params();
    if (auto s = GatherPartsOnBackend(*comm_, *backend_, model_->param_data(), 0, n, n); !s.ok()) return s;
    const double gather = seconds_since(comm_start);
    m.communication_seconds += gather;
    m.exposed_communication_seconds += gather;
  }
  if (device != nullptr && comm_->world_size() > 1) {
    // The calling thread only queued the GPU's collectives: the times above are the
    // host's for issuing them. Their own time is measured on the GPU, and so is the part
    // the backend waited for; the host's own communication is the losses' and norms' sums.
    backend_->Synchronize();
    // A collective after the step (parameters' gathers) that failed must not be saved.
    if (auto s = device->status(); !s.ok()) return s;
    m.communication_seconds = host_scalar_seconds + device->busy_seconds() - device_busy;
    m.exposed_communication_seconds = host_scalar_seconds + device->exposed_seconds() - device_exposed;
  }
  m.optimizer_state_bytes = optimizer_->state_bytes();
  m.gradient_bytes = model_->grad_bytes() + region_copy_bytes_;  // and zero2's copy of a region
  m.parameter_bytes = model_->param_bytes();

  m.step_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  m.tokens_per_s = targets_per_step / m.step_seconds;
  m.tflops = m.tokens_per_s * spec_.model.TrainingFlopsPerToken(seq) / 1e12;
  m.mfu = peak_flops_ > 0 ? m.tflops * 1e12 / peak_flops_ : 0;
  m.peak_memory_bytes = backend_->peak_allocated_bytes();
  return m;
}

absl::Status Trainer::StartRanks() {
  if (comm_->world_size() == 1) return absl::OkStatus();
  if (auto s = SendStartingState(); !s.ok()) return s;
  // GPU collectives are only queued: the state is there once they finished, intact.
  if (DeviceCollectives* device = device_) {
    backend_->Synchronize();
    return device->status();
  }
  return absl::OkStatus();
}

absl::Status Trainer::SendStartingState() {
  const int rank = comm_->rank();
  // The progress, and whether rank 0 holds moments (restored ones, at a step past 0;
  // fresh moments are zeros everywhere, and not allocated yet on the device). Exact in
  // doubles: far below 2^53.
  double progress[3] = {0, 0, 0};
  if (rank == 0) {
    progress[0] = double(step()), progress[1] = double(sampler_position_);
    progress[2] = optimizer_->has_moments() || step() > 0 ? 1 : 0;
  }
  if (auto s = comm_->AllReduceSum(progress, 3); !s.ok()) return s;
  SetProgress(int64_t(progress[0]), uint64_t(progress[1]));
  if (zero1_) {
    // Each rank holds the master weights of its slice (seeded, imported or restored
    // there): the parameters' other slices come from their owners, as after a step.
    if (model_->parameters_sharded()) return model_->replica() != nullptr ? RefreshReplica() : absl::OkStatus();
    return GatherPartsOnBackend(*comm_, *backend_, model_->param_data(), 0, model_->num_params(), model_->num_params());
  }
  // ddp: rank 0's master weights and moments go to every rank, those in the backend's
  // memory through it, those a GPU keeps in host memory (moved there before the restore)
  // over the host communicator from host memory.
  const size_t n = model_->num_params();
  const bool host = optimizer_->host_offloaded();
  const size_t device_end = host ? optimizer_->memory_end() : n;
  if (device_end > 0) {
    if (auto s = BroadcastOnBackend(*comm_, *backend_, model_->master_data(), device_end, 0); !s.ok()) return s;
  }
  if (host && n > device_end) {
    if (auto s = comm_->Broadcast(optimizer_->mutable_host_master(), n - device_end, 0); !s.ok()) return s;
  }
  model_->SyncParamsFromMaster();
  optimizer_->UploadHostWeights();
  if (progress[2] == 0) return absl::OkStatus();
  if (device_end > 0) {
    for (void* moment : {optimizer_->exp_avg(), optimizer_->exp_avg_sq()}) {
      if (auto s = BroadcastOnBackend(*comm_, *backend_, moment, device_end, 0); !s.ok()) return s;
    }
  }
  const size_t host_moments = host ? optimizer_->swap_begin() - device_end : 0;
  if (host_moments > 0) {
    // As words, whatever type the host keeps them in (the broadcast copies bits).
    for (AdamWOptimizer::Moment which : {AdamWOptimizer::kExpAvg, AdamWOptimizer::kExpAvgSq}) {
      const auto [words, count] = optimizer_->HostMomentWords(which);
      if (auto s = comm_->Broadcast(words, count, 0); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

void Trainer::ShardOptimizerState() {
  const auto [begin, end] = EvenSlice(model_->num_params(), comm_->rank(), comm_->world_size());
  zero1_ = true;
  optimizer_->Shard(begin, end);  // the shard's moments are allocated, as zeros, at first use
}

bool Trainer::CollectivesCanRunBeside() const { return BuffersInHostMemory(*backend_) || device_ != nullptr; }

void Trainer::RunModelCollective(const std::function<absl::Status()>& collective) {
  if (!model_collective_status_.ok()) return;  // a peer is gone: no more collectives
  const auto start = std::chrono::steady_clock::now();
  model_collective_status_ = collective();
  model_collective_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void Trainer::ShardGradients() {
  const auto [own_begin, own_end] = EvenSlice(model_->num_params(), comm_->rank(), comm_->world_size());
  // Overlap: each region's gradients are copied out of the model's scratch and reduced
  // while the backward goes on to the next region. On host memory the collectives run on
  // the helper thread (not the backend's: it is not thread-safe); on a GPU with NCCL they
  // run on NCCL's stream beside the backward. GPU ranks without NCCL reduce inline.
  DeviceCollectives* device = device_;
  const bool overlap = spec_.parallel.overlap_regions && CollectivesCanRunBeside();
  if (overlap) {
    if (device == nullptr && !collectives_) collectives_ = std::make_unique<SerialWorker>();
    const size_t region = LargestGradientRegion(spec_.model);
    region_copy_ = backend_->Allocate(region, backend_->accum_dtype());
    region_copy_bytes_ = model_->accum_byte_offset(region);
  }
  model_->ShardGradients(own_begin, own_end, [this, overlap, device](size_t begin, size_t end, void* grads) {
    // Each rank's part of the region is summed to that rank, which adds it to its shard:
    // a reduce-scatter of the region.
    const size_t own_lo = std::max(begin, optimizer_->shard_begin()), own_hi = std::min(end, optimizer_->shard_end());
    auto reduce = [this, begin, end, own_lo, own_hi](void* region) {
      RunModelCollective([&] {
        return ReduceScatterAddOnBackend(*comm_, *backend_, region, begin, end, model_->num_params(),
                                         own_lo < own_hi ? model_->grad_at(own_lo) : nullptr);
      });
    };
    if (!overlap) {
      const auto start = std::chrono::steady_clock::now();
      reduce(grads);
      model_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      return;
    }
    FinishRegionReduce();  // the previous region's: then the copy is free
    backend_->Copy(region_copy_, grads, end - begin);
    if (device != nullptr) {
      // The sums land in the copy, beside the backward; FinishRegionReduce adds the
      // owner's part into its shard once the next region (or the step) needs them.
      RunModelCollective([&] {
        return device->ReduceScatter(region_copy_, OwnedParts(begin, end, model_->num_params(), comm_->world_size()),
                                     backend_->accum_dtype(), Ordering::kBeside);
      });
      device_region_begin_ = begin;
      device_region_end_ = end;
      device_region_ticket_ = device->last_ticket();
      return;
    }
    region_reduce_ = collectives_->Post([reduce, this] { reduce(region_copy_); });
  });
}

absl::Status Trainer::RefreshReplica() {
  // Each owner updated its part of the replica in place: it sends that part to the others.
  const size_t begin = model_->replicated_begin(), end = model_->num_params();
  RunModelCollective([&] { return GatherPartsOnBackend(*comm_, *backend_, model_->param_at(begin), begin, end, end); });
  return model_collective_status_;
}

void Trainer::ShardParameters() {
  // Prefetch: each region's gather starts, into the model's second scratch, while the
  // region before it computes. On host memory it runs on the helper thread; on a GPU with
  // NCCL on NCCL's stream beside the backend. GPU ranks without NCCL gather inline.
  DeviceCollectives* device = device_;
  const bool prefetch = spec_.parallel.overlap_regions && CollectivesCanRunBeside();
  if (prefetch && device == nullptr && !collectives_) collectives_ = std::make_unique<SerialWorker>();
  auto timed = [this](const std::function<void()>& wait) {
    const auto start = std::chrono::steady_clock::now();
    wait();
    model_wait_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  model_->GatherParametersWith(
      [this, prefetch, device, timed](size_t begin, size_t end, void* dst) -> LlamaModel::ParamWait {
        // Each owner sends its part of the region to the others: its own part goes into
        // the region first. Off the main thread only the communicator is used: on host
        // memory a plain copy, not the backend.
        auto gather = [this, begin, end, dst, prefetch, device] {
          RunModelCollective([&] {
            for (const OwnedPart& p : OwnedParts(begin, end, model_->num_params(), comm_->world_size())) {
              if (p.owner != comm_->rank()) continue;
              void* part = static_cast<char*>(dst) + model_->param_byte_offset(p.offset);
              const size_t lo = begin + p.offset, hi = lo + p.count;
              CopyOwnParameters(part, lo, hi, /*plain=*/prefetch && device == nullptr);
            }
            // With NCCL every part in one launch, beside the backend when prefetched.
            return GatherPartsOnBackend(*comm_, *backend_, dst, begin, end, model_->num_params(),
                                        prefetch && device != nullptr ? Ordering::kBeside : Ordering::kInline);
          });
        };
        if (!prefetch) {
          timed(gather);
          return nullptr;
        }
        if (device != nullptr) {
          // Queued on NCCL's stream; the backend waits for this gather alone when the
          // region comes into use (not for reductions issued meanwhile), also after a
          // failure, since the slot is written again.
          gather();
          return [this, device, ticket = device->last_ticket()] {
            const absl::Status joined = device->JoinCollective(ticket);
            if (model_collective_status_.ok()) model_collective_status_ = joined;
          };
        }
        std::shared_future<void> done = collectives_->Post(gather);
        return [timed, done] { timed([&] { done.get(); }); };
      },
      prefetch);
}

void Trainer::CopyOwnParameters(void* dst, size_t lo, size_t hi, bool plain) {
  // What the device holds of the shard, and past it the host's master weights, rounded
  // to the parameters' type on the way up (the bits the device's copy would hold).
  const size_t held = std::clamp(model_->param_held_end(), lo, hi);
  if (plain) {
    // f32 in host memory both (the CPU backend's): copies, which need no backend.
    if (held > lo) std::memcpy(dst, model_->param_at(lo), model_->param_byte_offset(held - lo));
    if (hi > held) {
      std::memcpy(static_cast<char*>(dst) + model_->param_byte_offset(held - lo),
                  optimizer_->host_master() + (held - optimizer_->memory_end()), (hi - held) * sizeof(float));
    }
    return;
  }
  if (held > lo) backend_->Copy(dst, model_->param_at(lo), held - lo);
  if (hi > held) {
    // Page-locked, and unchanged until the step's first download has synchronized.
    backend_->UploadF32Async(static_cast<char*>(dst) + model_->param_byte_offset(held - lo),
                             optimizer_->host_master() + (held - optimizer_->memory_end()), hi - held);
  }
}

absl::Status Trainer::OffloadOptimizerState(int cpu_threads) {
  const OffloadSpec& o = spec_.offload;
  // A GPU's state goes to host memory first also for nvme (ZeRO-Infinity), and then its
  // moments on to the NVMe tier.
  const bool gpu_nvme = o.optimizer == "nvme" && backend_->needs_master_weights();
  const offload::SwapOptions options = NvmeSwapOptions(o);
  if (o.optimizer == "host" || gpu_nvme) {
    const AdamWOptimizer::NvmeTier nvme{o.nvme_path, options, o.nvme_fraction};
    // offload.chunk_mb: the unit of the host's pipeline, and of the NVMe tier's.
    const AdamWOptimizer::HostTier tier{cpu_threads, gpu_nvme ? 1.0 : o.host_fraction, options.chunk_bytes,
                                        o.host_moments == "bf16"};
    if (auto s = optimizer_->OffloadToHost(tier, gpu_nvme ? &nvme : nullptr); !s.ok()) {
      return s;
    }
    const double share = spec_.parallel.params_host_share;
    if (share > 0 && model_->parameters_sharded()) {
      const size_t shard = optimizer_->shard_end() - optimizer_->shard_begin();
      // Only parameters whose master weights are on the host can leave (PlaceGemini keeps
      // the share within the optimizer state's there): the gathers upload those.
      model_->TrimParamShard(std::max(optimizer_->memory_end(),
                                      optimizer_->shard_end() - AdamWOptimizer::SwappedElements(shard, share)));
    }
    return absl::OkStatus();
  }
  if (o.optimizer != "nvme") return absl::OkStatus();
  return optimizer_->OffloadToNvme(o.nvme_path, options, o.nvme_fraction);
}

absl::Status Trainer::CheckHostMemory() {
  // The CPU backend's memory is the host's: its placement checked the job against it.
  if (backend_->name() != "cuda") return absl::OkStatus();
  const int world = comm_->world_size();
  // Whether the ranks have NCCL, every rank knows alike (AttachDeviceCollectives).
  const HostMemoryNeed each =
      HostMemoryNeedOf(PlanMemoryOn(spec_, /*cuda=*/true, world, 0), spec_, /*nccl=*/device_ != nullptr);
  absl::Status fits = absl::OkStatus();
  if (each.total() > 0) {  // the same on every rank: the spec and the world are
    const HostMemory host = ReadHostMemory();
    // Ranks that cannot tell what they share are counted alone.
    const std::string alone = StrCat("rank ", comm_->rank());
    auto ranks = CountRanksWithKeys(*comm_, {host.machine_key.empty() ? alone : host.machine_key,
                                             host.cgroup_key.empty() ? alone : host.cgroup_key});
    if (!ranks.ok()) return ranks.status();
    fits = llamad::CheckHostMemory(each, (*ranks)[0], (*ranks)[1], host, spec_);
  }
  // Every rank learns whether all fit, so that none goes on to wait for one that stopped.
  if (world > 1) {
    double short_ranks = fits.ok() ? 0 : 1;
    if (auto s = comm_->AllReduceSum(&short_ranks, 1); !s.ok()) return s;
    if (fits.ok() && short_ranks > 0) {
      return absl::ResourceExhaustedError(StrCat(spec_.path, ": ", short_ranks,
                                                 " rank(s) lack the host memory for their state (their logs say how "
                                                 "much)"));
    }
  }
  return fits;
}

void Trainer::SetProgress(int64_t step, uint64_t sampler_position) {
  optimizer_->set_step(step);
  sampler_position_ = sampler_position;
}

absl::Status Trainer::Train(const TokenSource& data,
                            const std::function<absl::Status(const StepMetrics&)>& on_step) {
  const int seq = int(spec_.training.max_length);
  if (data.NumWindows(seq) == 0) {
    return absl::InvalidArgumentError(StrCat(
        spec_.data.dataset, ": ", data.num_tokens(), " tokens are fewer than one window of ",
        seq + 1, " (training.max_length + 1)"));
  }
  WindowSampler sampler(&data, seq, spec_.training.seed);
  sampler.set_position(sampler_position_);
  while (optimizer_->step() < spec_.training.steps) {
    auto step = Step(sampler);
    if (!step.ok()) return step.status();
    const StepMetrics& m = *step;
    sampler_position_ = sampler.position();
    if (!std::isfinite(m.loss)) {
      return absl::InternalError(StrCat("step ", m.step, ": loss is ", m.loss,
                                              " (diverged; lower training.lr or set training.grad_clip)"));
    }
    if (auto status = on_step(m); !status.ok()) return status;
    if (m.stop_requested) break;
  }
  return absl::OkStatus();
}

absl::Status Trainer::CheckIdsInVocabulary(int count, int seq, std::string_view label, uint64_t first) const {
  const int64_t vocab = spec_.model.vocab_size;
  auto outside = [vocab](int32_t id) { return id < 0 || id >= vocab; };
  for (size_t i = 0; i < size_t(count) * size_t(seq); ++i) {
    if (outside(tokens_[i]) || outside(targets_[i])) {
      return absl::DataLossError(StrCat(
          label, first + i / size_t(seq), " holds token id ", outside(tokens_[i]) ? tokens_[i] : targets_[i],
          ", outside the model's vocabulary of ", vocab,
          " (a damaged shard, or a dataset prepared for another tokenizer; llama-data inspect --verify)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<double> Trainer::Evaluate(const TokenSource& data) {
  const int seq = int(spec_.training.max_length);
  const size_t windows = data.NumWindows(seq);
  double loss_sum = 0;
  for (size_t w0 = 0; w0 < windows; w0 += size_t(spec_.training.batch_size)) {
    const int batch = int(std::min<size_t>(spec_.training.batch_size, windows - w0));
    std::vector<int32_t> window(size_t(seq) + 1);
    for (int b = 0; b < batch; ++b) {
      data.ReadWindow(w0 + b, seq, window.data());
      std::copy_n(window.data(), seq, tokens_.data() + size_t(b) * seq);
      std::copy_n(window.data() + 1, seq, targets_.data() + size_t(b) * seq);
    }
    if (auto s = CheckIdsInVocabulary(batch, seq, "window ", w0); !s.ok()) return s;
    loss_sum += model_->Forward(tokens_.data(), targets_.data(), batch, seq);
  }
  return windows > 0 ? loss_sum / (double(windows) * seq) : 0.0;
}

}  // namespace llamad
