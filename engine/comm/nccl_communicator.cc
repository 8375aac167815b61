#include "comm/nccl_communicator.h"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string_view>
#include <vector>

#include "backend/cuda/cuda_backend_impl.h"
#include "comm/device_collectives.h"
#include "core/exit_codes.h"
#include "core/exit_unless_done.h"
#include "core/strings.h"

#ifdef LLAMAD_WITH_NCCL
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>

#include "backend/cuda/device_fault.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#endif

namespace llamad {
namespace {

// The host collectives stay on `host`; the device ones are `device`'s.
class CommunicatorWithDevice final : public Communicator {
 public:
  CommunicatorWithDevice(std::unique_ptr<Communicator> host, std::unique_ptr<DeviceCollectives> device)
      : host_(std::move(host)), device_(std::move(device)) {}
  ~CommunicatorWithDevice() override { device_.reset(); }  // before the host transport
  int rank() const override { return host_->rank(); }
  int world_size() const override { return host_->world_size(); }
  absl::Status AllReduceSum(float* data, size_t n) override { return host_->AllReduceSum(data, n); }
  absl::Status AllReduceSum(double* data, size_t n) override { return host_->AllReduceSum(data, n); }
  absl::Status ReduceSum(float* data, size_t n, int root) override { return host_->ReduceSum(data, n, root); }
  absl::Status Broadcast(float* data, size_t n, int root) override { return host_->Broadcast(data, n, root); }
  absl::Status Barrier() override { return host_->Barrier(); }
  void set_timeout(std::chrono::milliseconds timeout) override;
  DeviceCollectives* device_collectives() override { return device_.get(); }

 private:
  std::unique_ptr<Communicator> host_;
  std::unique_ptr<DeviceCollectives> device_;
};

#ifdef LLAMAD_WITH_NCCL

// The NCCL entry points this file uses, from libnccl.so.2 (loaded once).
struct NcclApi {
  decltype(&ncclGetVersion) GetVersion;
  decltype(&ncclGetUniqueId) GetUniqueId;
  decltype(&ncclCommInitRankConfig) CommInitRankConfig;
  decltype(&ncclCommGetAsyncError) CommGetAsyncError;
  decltype(&ncclCommAbort) CommAbort;
  decltype(&ncclCommFinalize) CommFinalize;
  decltype(&ncclCommDestroy) CommDestroy;
  decltype(&ncclAllReduce) AllReduce;
  decltype(&ncclBroadcast) Broadcast;
  decltype(&ncclReduce) Reduce;
  decltype(&ncclGroupStart) GroupStart;
  decltype(&ncclGroupEnd) GroupEnd;
  decltype(&ncclGetErrorString) GetErrorString;
  decltype(&ncclGetLastError) GetLastError;
};

const NcclApi* LoadNccl(std::string* why) {
  static const NcclApi* api = nullptr;
  static std::string failure;
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = nullptr;
    for (const char* name : {"libnccl.so.2", "libnccl.so"}) {
      if ((lib = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    }
    if (lib == nullptr) {
      failure = "NCCL is not installed (libnccl.so.2 is not on the library path)";
      return;
    }
    auto* loaded = new NcclApi;
    bool complete = true;
    auto find = [&](auto& fn, const char* symbol) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, symbol));
      if (fn == nullptr && complete) {
        complete = false;
        failure = StrCat("libnccl.so.2 has no ", symbol, " (NCCL 2.14 or later is needed)");
      }
    };
    find(loaded->GetVersion, "ncclGetVersion");
    find(loaded->GetUniqueId, "ncclGetUniqueId");
    find(loaded->CommInitRankConfig, "ncclCommInitRankConfig");
    find(loaded->CommGetAsyncError, "ncclCommGetAsyncError");
    find(loaded->CommAbort, "ncclCommAbort");
    find(loaded->CommFinalize, "ncclCommFinalize");
    find(loaded->CommDestroy, "ncclCommDestroy");
    find(loaded->AllReduce, "ncclAllReduce");
    find(loaded->Broadcast, "ncclBroadcast");
    find(loaded->Reduce, "ncclReduce");
    find(loaded->GroupStart, "ncclGroupStart");
    find(loaded->GroupEnd, "ncclGroupEnd");
    find(loaded->GetErrorString, "ncclGetErrorString");
    find(loaded->GetLastError, "ncclGetLastError");
    if (!complete) {
      delete loaded;
      return;
    }
    api = loaded;
  });
  if (api == nullptr) *why = failure;
  return api;
}

ncclDataType_t NcclType(DType type) {
  switch (type) {
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    case DType::kBF16: return ncclBfloat16;
  }
  return ncclFloat32;
}

// NCCL's result codes are its ABI; NcclFailureCode takes them as ints.
static_assert(ncclRemoteError == 6 && ncclInProgress == 7);

// NCCL reports a failed GPU as one of its own errors (a CUDA call that failed, or an
// internal, system or remote error where NVLink went down), without CUDA's error. Where
// the GPU failed, every call on its context returns the fault from then on: one query
// tells, and the rank ends as a failed GPU (device_fault.h) rather than as a failure of
// the job or a lost peer.
void ExitIfTheGpuFailed(ncclResult_t result, cudaStream_t stream) {
  if (result == ncclSuccess || result == ncclInProgress) return;
  cuda::ExitOnDeviceFault(cudaStreamQuery(stream), "an NCCL collective");
  // What is left, the probe's error or one of NCCL's own CUDA calls on this thread, is no
  // fault and is reported with NCCL's error: cleared, so that the backend's next launch
  // check does not take it for its own.
  cuda::ExitOnDeviceFault(cudaGetLastError(), "an NCCL collective");
}

// The exit status of a rank whose communicator failed with `why` where the process has
// to end at once (the abort cannot run or does not return): a lost peer for ABORTED,
// as the watchdog's and NCCL's classification say; this rank's failure otherwise.
int ExitCodeOf(const absl::Status& why) {
  return why.code() == absl::StatusCode::kAborted ? kExitPeerLost : kExitFailure;
}

absl::Status NcclFailure(ncclResult_t result, std::string message) {
  return absl::Status(NcclFailureCode(result), std::move(message));
}

absl::Status CudaError(cudaError_t err, std::string_view what) {
  cuda::ExitOnDeviceFault(err, std::string(what).c_str());  // a failed GPU drains its node
  (void)cudaGetLastError();  // reported here: the backend's next launch check must not see it
  return absl::InternalError(StrCat("CUDA: ", what, ": ", cudaGetErrorString(err)));
}

// One GPU's NCCL communicator, its stream, and a watchdog thread that retires finished
// collectives (their GPU time), notices NCCL's asynchronous errors and aborts the
// communicator when a collective makes no progress for the timeout: an NCCL kernel whose
// peer is gone would otherwise spin on the GPU, and the backend's stream behind it, forever.
class NcclCollectives final : public DeviceCollectives {
 public:
  // Collective over `host`'s ranks. On failure `*agreed` says whether every rank learned
  // of it through `host` and fails as well, so that all of them can carry on without
  // NCCL; false where `host` itself failed.
  static absl::StatusOr<std::unique_ptr<NcclCollectives>> Create(const NcclApi* api, Communicator& host,
                                                                 int device, cudaStream_t compute,
                                                                 std::chrono::milliseconds timeout, bool* agreed) {
    *agreed = false;
    // Rank 0 makes the unique id; the host communicator carries it (with whether rank 0
    // managed to) to the others as 4-byte words: Gloo copies them bit for bit.
    const cudaError_t on_device = cudaSetDevice(device);
    constexpr size_t kWords = (sizeof(ncclUniqueId) + 3) / 4 + 1;
    float words[kWords] = {};
    ncclUniqueId id{};
    if (host.rank() == 0 && on_device == cudaSuccess) {
      const ncclResult_t made = api->GetUniqueId(&id);
      words[0] = made == ncclSuccess ? 1.0f : 0.0f;
      std::memcpy(&words[1], &id, sizeof(id));
    }
    if (auto s = host.Broadcast(words, kWords, 0); !s.ok()) return s;
    std::memcpy(&id, &words[1], sizeof(id));

    auto self = std::unique_ptr<NcclCollectives>(new NcclCollectives(api, device, compute, timeout));
    // NCCL's set-up waits for every rank: a rank that fails before it gets there must
    // not leave the others waiting, so the ranks agree first that all of them can start.
    const cudaError_t stream =
        on_device != cudaSuccess ? on_device : cudaStreamCreateWithFlags(&self->stream_, cudaStreamNonBlocking);
    float failed = stream == cudaSuccess ? 0.0f : 1.0f;
    if (auto s = host.AllReduceSum(&failed, 1); !s.ok()) return s;
    *agreed = true;
    if (on_device != cudaSuccess) return CudaError(on_device, "cudaSetDevice");
    if (stream != cudaSuccess) return CudaError(stream, "creating the NCCL stream");
    if (failed != 0) return absl::UnavailableError(StrCat("NCCL: ", int(failed), " other rank(s) could not start"));
    if (words[0] != 1.0f) return absl::UnavailableError("NCCL: rank 0 could not make the communicator's unique id");
    absl::Status made = self->Init(id, host.rank(), host.world_size(), std::min(timeout, kInitLimit));
    // Every rank learns whether all of them have a communicator before any uses it.
    failed = made.ok() ? 0.0f : 1.0f;
    *agreed = false;
    if (auto s = host.AllReduceSum(&failed, 1); !s.ok()) {
      self->error_ = s;  // the other ranks may be gone: abort, do not finalize with them
      return s;
    }
    *agreed = true;
    if (!made.ok()) return made;
    if (failed != 0) {
      // The others abort theirs: this one cannot finalize with them.
      self->error_ = absl::UnavailableError("NCCL: another rank failed to join");
      return absl::UnavailableError(StrCat("NCCL: ", int(failed), " other rank(s) failed to join the communicator"));
    }
    self->watchdog_ = std::thread([raw = self.get()] { raw->Watch(); });
    return self;
  }

  ~NcclCollectives() override {
    // Every step waits for its collectives, so anything still queued here follows a
    // failure: it gets a grace period, then the communicator is aborted rather than
    // holding the exit of a rank whose peers are gone.
    constexpr auto kGrace = std::chrono::seconds(10);
    // Finalizing waits for the other ranks to finalize too, which may end their last
    // step a little later (rank 0 commits the last checkpoint).
    constexpr auto kFinalizeLimit = std::chrono::seconds(60);
    bool drained = false;
    {
      std::unique_lock lock(mu_);
      drained = idle_.wait_for(lock, kGrace, [&] { return pending_.empty() || comm_ == nullptr; });
      stop_ = true;
    }
    wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    if (comm_ != nullptr) {
      std::lock_guard calls(calls_mu_);
      // Finalizing flushes NCCL's own work; a communicator that cannot is aborted.
      if (drained && error_.ok() && Settle(api_->CommFinalize(comm_), kFinalizeLimit).ok()) {
        api_->CommDestroy(comm_);
      } else {
        AbortWithin(comm_, error_.ok() ? absl::InternalError(
                                             "NCCL: collectives were still queued at the end, or finalizing failed")
                                       : error_);
      }
      comm_ = nullptr;
    }
    // What is still pending followed a failure (or outlived the grace period): its events
    // go too. CUDA releases an event still to complete once it does. (The watchdog has
    // ended: the lock is only for RecycleLocked's contract.)
    {
      std::lock_guard lock(mu_);
      for (const Pending& p : pending_) RecycleLocked(p);
      pending_.clear();
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  absl::Status AllReduceSum(void* buffer, size_t n, DType type, Ordering order) override {
    return Issue(order, [&](ncclComm_t comm, cudaStream_t s) {
      return api_->AllReduce(buffer, buffer, n, NcclType(type), ncclSum, comm, s);
    });
  }
  absl::Status Broadcast(void* buffer, size_t n, DType type, int root, Ordering order) override {
    return Issue(order, [&](ncclComm_t comm, cudaStream_t s) {
      return api_->Broadcast(buffer, buffer, n, NcclType(type), root, comm, s);
    });
  }
  absl::Status ReduceScatter(void* buffer, const std::vector<OwnedPart>& parts, DType type, Ordering order) override {
    return Issue(order, [&](ncclComm_t comm, cudaStream_t s) {
      ncclResult_t r = api_->GroupStart();
      for (size_t i = 0; i < parts.size() && r == ncclSuccess; ++i) {
        char* part = static_cast<char*>(buffer) + parts[i].offset * DTypeSize(type);
        r = api_->Reduce(part, part, parts[i].count, NcclType(type), ncclSum, parts[i].owner, comm, s);
      }
      const ncclResult_t ended = api_->GroupEnd();
      return r != ncclSuccess ? r : ended;
    });
  }
  absl::Status GatherParts(void* buffer, const std::vector<OwnedPart>& parts, DType type, Ordering order) override {
    return Issue(order, [&](ncclComm_t comm, cudaStream_t s) {
      ncclResult_t r = api_->GroupStart();
      for (size_t i = 0; i < parts.size() && r == ncclSuccess; ++i) {
        char* part = static_cast<char*>(buffer) + parts[i].offset * DTypeSize(type);
        r = api_->Broadcast(part, part, parts[i].count, NcclType(type), parts[i].owner, comm, s);
      }
      const ncclResult_t ended = api_->GroupEnd();
      return r != ncclSuccess ? r : ended;
    });
  }

  absl::Status Join() override {
    // Also after a failure: the backend must not run ahead of collectives still queued
    // (an aborted one's kernels return soon).
    // From where the backend is (ready) to the end of the collectives (done): the backend
    // waiting for them.
    Pending join{Pending::kJoin, Event(), nullptr, Event()};
    cudaError_t err = cudaEventRecord(join.ready, compute_);
    if (err == cudaSuccess) err = cudaEventRecord(join.done, stream_);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(compute_, join.done, 0);
    if (err != cudaSuccess) return Abandon(join, CudaError(err, "ordering the backend after the collectives"));
    Track(join);
    return error();
  }

  uint64_t last_ticket() override {
    std::lock_guard lock(mu_);
    return last_ticket_;
  }

  absl::Status JoinCollective(uint64_t ticket) override {
    cudaEvent_t done = nullptr;
    {
      std::lock_guard lock(mu_);
      // A collective no longer pending has finished: nothing to wait for. One joined before
      // is waited for already: the backend's stream has the wait, and its entry times it.
      auto it = std::find_if(pending_.begin(), pending_.end(),
                             [&](const Pending& p) { return p.kind != Pending::kJoin && p.ticket == ticket; });
      if (it == pending_.end() || it->done_lent) return error_;
      // Lent, the done event is not retired with the collective (nor reused): the entry
      // pushed below owns it, whatever happens meanwhile.
      it->done_lent = true;
      done = it->done;
    }
    // Outside mu_: a launch blocks while the GPU's queue is full (behind stalled NCCL
    // kernels, say), and the watchdog, which would abort them, needs mu_.
    // From where the backend is to the collective's end: the backend waiting for it.
    Pending join{Pending::kJoin, Event(), nullptr, done};
    cudaError_t err = cudaEventRecord(join.ready, compute_);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(compute_, done, 0);
    if (err != cudaSuccess) {
      std::lock_guard lock(mu_);
      if (error_.ok()) error_ = CudaError(err, "ordering the backend after a collective");
    }
    // Tracked even so: the collective may still be running, so its done event may be
    // recycled only after it ends.
    Track(join);
    return error();
  }

  absl::Status status() override { return error(); }

  double busy_seconds() override {
    std::lock_guard lock(mu_);
    RetireLocked();
    return busy_seconds_;
  }
  double exposed_seconds() override {
    std::lock_guard lock(mu_);
    RetireLocked();
    return exposed_seconds_;
  }

  void set_timeout(std::chrono::milliseconds timeout) {
    std::lock_guard lock(mu_);
    timeout_ = timeout;
  }

 private:
  // A collective (inline or beside the backend) or a Join. ready: on the backend's
  // stream, where the backend was when it was issued; start and done: on the NCCL
  // stream, around the collective (a Join has no start).
  struct Pending {
    enum Kind { kInline, kBeside, kJoin } kind;
    cudaEvent_t ready, start, done;
    uint64_t ticket = 0;     // a collective's (last_ticket)
    bool done_lent = false;  // a collective's done event belongs to a JoinCollective's entry
    bool seen_started = false;  // the watchdog saw `start` complete (at the front)
  };

  NcclCollectives(const NcclApi* api, int device, cudaStream_t compute, std::chrono::milliseconds timeout)
      : api_(api), device_(device), compute_(compute), timeout_(timeout) {}

  // Every rank reaches this together (they have just agreed to), so set-up is bounded by
  // a limit of its own, however long the job's timeout.
  static constexpr std::chrono::milliseconds kInitLimit = std::chrono::minutes(5);

  absl::Status Init(const ncclUniqueId& id, int rank, int world, std::chrono::milliseconds limit) {
    // Non-blocking: set-up (and a first collective's connections) return at once and are
    // polled, so that a rank that never joins fails the others after the limit.
    // NCCL_COMM_BLOCKING=1 would override that, and calls without a bound would hold a
    // rank whose peer is gone (and set-up, before the watchdog exists) forever. (Set in
    // NCCL's config file instead, it reaches the environment only in NCCL's own set-up:
    // rank 0's, which made the id, has run; where ranks then disagree, the others fail
    // to join after kInitLimit, and all of them fall back together.)
    if (const char* blocking = std::getenv("NCCL_COMM_BLOCKING"); blocking != nullptr && std::atoi(blocking) != 0) {
      return absl::UnavailableError(
          StrCat("NCCL: NCCL_COMM_BLOCKING=", blocking, " is set: llama-train needs NCCL's non-blocking calls to "
                 "bound them by the collective timeout; unset it"));
    }
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    std::lock_guard calls(calls_mu_);
    const ncclResult_t started = api_->CommInitRankConfig(&comm_, world, id, rank, &config);
    absl::Status joined;
    const std::string joining = StrCat("NCCL: joining the communicator as rank ", rank, " of ", world, ": ");
    if (started != ncclSuccess && started != ncclInProgress) {
      joined = NcclFailure(started, StrCat(joining, api_->GetErrorString(started)));
    } else if (auto s = Settle(started, limit); !s.ok()) {
      // ABORTED where the other ranks never answered: a lost peer, also for the abort's
      // exit should it hang.
      joined = absl::Status(s.code(), StrCat(joining, s.message()));
    }
    // NCCL may have made a handle before it failed: the destructor must not finalize it.
    if (!joined.ok() && comm_ != nullptr) AbortWithin(comm_, joined);
    if (!joined.ok()) comm_ = nullptr;
    return joined;
  }

  // Waits until the communicator has taken the last call (non-blocking communicators
  // report ncclInProgress until then), for at most `limit`. Holds calls_mu_.
  absl::Status Settle(ncclResult_t result, std::chrono::milliseconds limit) {
    const auto deadline = std::chrono::steady_clock::now() + limit;
    while (result == ncclInProgress) {
      if (std::chrono::steady_clock::now() > deadline) {  // a peer is gone or stalled
        return absl::AbortedError(StrCat("no answer from the other ranks within ", limit.count() / 1000, " s"));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      // A poll that fails is this rank's failure, not a call left unanswered.
      if (const ncclResult_t polled = api_->CommGetAsyncError(comm_, &result); polled != ncclSuccess) {
        result = polled;
        break;
      }
    }
    if (result == ncclSuccess) return absl::OkStatus();
    ExitIfTheGpuFailed(result, stream_);
    return NcclFailure(result, ErrorText(result));
  }

  // NCCL's name for `result`, with its last message on comm_ where it has one.
  std::string ErrorText(ncclResult_t result) {
    const char* detail = comm_ != nullptr ? api_->GetLastError(comm_) : nullptr;
    return StrCat(api_->GetErrorString(result), detail != nullptr && *detail != '\0' ? StrCat(" (", detail, ")") : "");
  }

  std::chrono::milliseconds timeout() {
    std::lock_guard lock(mu_);
    return timeout_;
  }

  absl::Status error() {
    std::lock_guard lock(mu_);
    return error_;
  }

  cudaEvent_t Event() {
    std::lock_guard lock(mu_);
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;  // recording it fails, and that is reported
    }
    return e;
  }

  // Gives an entry's events back for reuse; a lent done event stays with the Join entry
  // that owns it. Holds mu_.
  void RecycleLocked(const Pending& p) {
    for (cudaEvent_t e : {p.ready, p.start, p.done_lent ? nullptr : p.done}) {
      if (e != nullptr) free_events_.push_back(e);
    }
  }
  void Recycle(const Pending& p) {
    std::lock_guard lock(mu_);
    RecycleLocked(p);
  }

  // Gives back an entry that could not be tracked and aborts the communicator.
  absl::Status Abandon(const Pending& p, absl::Status why) {
    std::lock_guard calls(calls_mu_);
    Recycle(p);
    AbortHoldingCalls(std::move(why));
    return error();
  }

  // Takes the communicator out of use and aborts it: its kernels return (their results
  // are void) and later calls fail with error_. Holds calls_mu_, not mu_: an abort may
  // take long, and the watchdog and error() must not wait for it.
  void AbortHoldingCalls(absl::Status why) {
    ncclComm_t comm = nullptr;
    absl::Status cause;
    {
      std::lock_guard lock(mu_);
      if (error_.ok()) error_ = std::move(why);
      cause = error_;
      std::swap(comm, comm_);
    }
    idle_.notify_all();
    if (comm != nullptr) AbortWithin(comm, std::move(cause));
  }

  // ncclCommAbort(comm), ending the process with `why` if it does not return in time.
  // The abort waits for the NCCL stream, which waits for the backend's stream: where the
  // backend's own work hangs, or NCCL does, it would hold the rank forever, and with it
  // every peer.
  void AbortWithin(ncclComm_t comm, const absl::Status& why) {
    ExitUnlessDoneWithin guard(std::max<std::chrono::milliseconds>(kAbortLimit, timeout()), ExitCodeOf(why),
                               StrCat(why.message(), "; aborting the NCCL communicator on GPU ", device_));
    api_->CommAbort(comm);
  }

  void Track(Pending p) {
    {
      std::lock_guard lock(mu_);
      if (pending_.empty()) front_since_ = std::chrono::steady_clock::now();
      if (p.kind != Pending::kJoin) p.ticket = last_ticket_ = last_ticket_ + 1;
      pending_.push_back(p);
    }
    wake_.notify_all();
  }

  // Orders `op` on the NCCL stream after the backend's work so far; inline, the
  // backend's later work waits for it.
  // `op(comm, stream)` makes the NCCL calls (a template: no allocation per collective).
  template <typename Op>
  absl::Status Issue(Ordering order, Op&& op) {
    if (auto s = error(); !s.ok()) return s;
    const bool inline_ = order == Ordering::kInline;
    Pending p{inline_ ? Pending::kInline : Pending::kBeside, Event(), Event(), Event()};
    cudaError_t err = cudaEventRecord(p.ready, compute_);
    if (err == cudaSuccess) err = cudaStreamWaitEvent(stream_, p.ready, 0);
    if (err == cudaSuccess) err = cudaEventRecord(p.start, stream_);
    // This rank cannot take part in collectives any more: abort, so that what it has
    // queued stops too.
    if (err != cudaSuccess) return Abandon(p, CudaError(err, "ordering a collective after the backend"));
    {
      std::lock_guard calls(calls_mu_);
      if (comm_ == nullptr) {
        Recycle(p);
        return error();
      }
      if (auto s = Settle(op(comm_, stream_), timeout()); !s.ok()) {
        // NCCL may still take the call later, and nothing would track it: abort.
        Recycle(p);
        AbortHoldingCalls(absl::Status(s.code(), StrCat("NCCL on GPU ", device_, ": ", s.message())));
        return error();
      }
    }
    err = cudaEventRecord(p.done, stream_);
    if (err == cudaSuccess && inline_) err = cudaStreamWaitEvent(compute_, p.done, 0);
    // The collective is queued but cannot be tracked or waited for.
    if (err != cudaSuccess) return Abandon(p, CudaError(err, "ordering the backend after a collective"));
    Track(p);
    return absl::OkStatus();
  }

  // Retires the finished entries at the front, in order; true when the front one's
  // collectives are still running. Holds mu_.
  bool RetireLocked() {
    bool running = false;
    while (!pending_.empty()) {
      Pending& p = pending_.front();
      const cudaError_t done = cudaEventQuery(p.done);
      if (done == cudaErrorNotReady) {
        (void)cudaGetLastError();  // not an error; this may be the backend's thread
        running = true;
        break;
      }
      if (done != cudaSuccess) {
        if (error_.ok()) error_ = CudaError(done, "a collective");
        break;
      }
      // A Join's ready is on the backend's stream, which may not have got there yet: still
      // running, so that the watchdog's timeout sees a backend that never gets there.
      if (p.kind == Pending::kJoin && p.ready != nullptr && cudaEventQuery(p.ready) == cudaErrorNotReady) {
        (void)cudaGetLastError();
        running = true;
        break;
      }
      auto seconds = [](cudaEvent_t from, cudaEvent_t to) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, from, to) != cudaSuccess) {
          (void)cudaGetLastError();
          return 0.0;
        }
        return std::max(0.0f, ms) / 1e3;
      };
      // Inline, the backend waited from ready to done; beside it, only at a Join.
      if (p.kind != Pending::kJoin) busy_seconds_ += seconds(p.start, p.done);
      if (p.kind != Pending::kBeside) exposed_seconds_ += seconds(p.ready, p.done);
      RecycleLocked(p);
      pending_.pop_front();
      front_since_ = std::chrono::steady_clock::now();
    }
    idle_.notify_all();
    return running;
  }

  void Watch() {
    cudaSetDevice(device_);
    std::unique_lock lock(mu_);
    // Since when the watchdog has wanted to abort and found calls_mu_ held.
    std::chrono::steady_clock::time_point abort_blocked_since{};
    while (!stop_) {
      const bool running = RetireLocked();
      if (comm_ != nullptr) {
        // NCCL's calls on one communicator must not overlap, and on a non-blocking one
        // even ncclCommGetAsyncError completes work that a call left (a group's
        // connections): the watchdog asks only while no call is in progress. Taking
        // calls_mu_ while holding mu_ is the reverse of the calls' order, hence try_lock.
        std::unique_lock calls(calls_mu_, std::try_to_lock);
        absl::Status why;
        ncclResult_t async = ncclSuccess;
        if (calls.owns_lock() && api_->CommGetAsyncError(comm_, &async) == ncclSuccess && async != ncclSuccess &&
            async != ncclInProgress) {
          ExitIfTheGpuFailed(async, stream_);
          const absl::StatusCode code = NcclFailureCode(async);
          why = absl::Status(code, StrCat("NCCL on GPU ", device_, ": ", ErrorText(async),
                                          code == absl::StatusCode::kAborted ? ": a rank stopped or lost its connection"
                                                                             : ""));
        } else if (running) {
          const auto now = std::chrono::steady_clock::now();
          Pending& front = pending_.front();
          // A collective's time runs from its start: one that waited long for the
          // backend (beside the backward) still gets the whole timeout for its peers.
          if (!front.seen_started && front.start != nullptr) {
            if (cudaEventQuery(front.start) == cudaSuccess) {
              front.seen_started = true;
              front_since_ = now;
            } else {
              (void)cudaGetLastError();
            }
          }
          if (now - front_since_ > timeout_) {
            // Where the collective has started, this rank waits for its peers: a lost
            // peer. Where it has not (nor the backend a Join), this rank's own stream never
            // got there (a kernel of its own hangs, or its work between two collectives
            // takes longer than the timeout, which the timeout's contract rules out): its
            // failure, or every rank would exit as a lost peer and the job restart into
            // the same hang. The abort would wait for that stream too, forever, so the
            // process ends here.
            if (!front.seen_started) {
              std::fprintf(stderr, "llama-train: GPU %d did not reach a collective (or the wait for one) for %lld s: "
                           "this rank's own work hangs, or takes longer than parallel.collective_timeout_s; "
                           "exiting\n", device_,
                           static_cast<long long>(timeout_.count() / 1000));
              std::fflush(stderr);
              std::_Exit(kExitFailure);
            }
            why = absl::AbortedError(StrCat("a collective on GPU ", device_, " made no progress for ",
                                            timeout_.count() / 1000, " s: a peer rank stopped or hangs"));
          }
        }
        if (why.ok()) {
          abort_blocked_since = {};
        } else if (calls.owns_lock()) {
          // Aborting needs the calls lock: a call in progress finishes first (Settle
          // bounds it by the timeout too), and is tried again on the next round.
          lock.unlock();
          AbortHoldingCalls(std::move(why));
          calls.unlock();
          lock.lock();
        } else {
          const auto now = std::chrono::steady_clock::now();
          if (abort_blocked_since == std::chrono::steady_clock::time_point{}) abort_blocked_since = now;
          // A call that holds the lock past its own bound is stuck where Settle cannot
          // end it: in a launch that waits for the GPU, whose queue the stalled NCCL
          // kernels fill. Only an abort would free it, and NCCL's calls on one
          // communicator must not overlap, so the process ends, with the exit the
          // abort's cause would have given: its supervisor (the launcher, llamad) acts
          // on it.
          if (now - abort_blocked_since > timeout_ + kStuckCallGrace) {
            std::fprintf(stderr, "llama-train: %s; an NCCL call on GPU %d has not returned for %lld s, so the "
                         "communicator cannot be aborted: exiting\n",
                         std::string(why.message()).c_str(), device_,
                         static_cast<long long>(std::chrono::duration_cast<std::chrono::seconds>(
                                                    now - abort_blocked_since).count()));
            std::fflush(stderr);
            std::_Exit(ExitCodeOf(why));
          }
        }
      }
      wake_.wait_for(lock, pending_.empty() ? std::chrono::milliseconds(100) : std::chrono::milliseconds(2));
    }
  }

  // How much longer than the timeout a call may hold calls_mu_ while the watchdog waits
  // to abort, before the call counts as stuck.
  static constexpr std::chrono::seconds kStuckCallGrace{30};
  // How long an abort may take at least (the collective timeout where that is longer): it
  // returns once the backend's queued work reaches the collectives it ordered, a step's
  // remaining kernels at most, which the timeout's contract bounds.
  static constexpr std::chrono::seconds kAbortLimit{60};

  const NcclApi* api_;
  const int device_;
  const cudaStream_t compute_;  // the backend's
  cudaStream_t stream_ = nullptr;
  std::mutex calls_mu_;          // held around every NCCL call on comm_ (and its abort)
  ncclComm_t comm_ = nullptr;    // null once aborted

  std::mutex mu_;  // guards what follows
  std::condition_variable wake_, idle_;
  std::chrono::milliseconds timeout_;
  std::deque<Pending> pending_;
  std::chrono::steady_clock::time_point front_since_;
  std::vector<cudaEvent_t> free_events_;
  absl::Status error_;
  uint64_t last_ticket_ = 0;
  double busy_seconds_ = 0, exposed_seconds_ = 0;
  bool stop_ = false;
  std::thread watchdog_;
};

// Where this rank's GPU is, to tell whether two ranks share one: NCCL needs a GPU each.
std::string GpuLocation(int device) {
  // Containers on different machines may share a host name: the boot id tells them apart.
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  std::string boot;
  if (std::FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char line[64] = {};
    if (std::fgets(line, sizeof(line), f) != nullptr) boot = line;
    std::fclose(f);
  }
  const std::string machine = StrCat(host, "/", boot);
  char bus[64] = {};
  if (cudaDeviceGetPCIBusId(bus, sizeof(bus), device) != cudaSuccess) {
    (void)cudaGetLastError();
    return StrCat(machine, "/device", device);
  }
  return StrCat(machine, "/", bus);
}

#endif  // LLAMAD_WITH_NCCL

}  // namespace

void CommunicatorWithDevice::set_timeout(std::chrono::milliseconds timeout) {
  host_->set_timeout(timeout);
#ifdef LLAMAD_WITH_NCCL
  static_cast<NcclCollectives*>(device_.get())->set_timeout(timeout);
#endif
}

absl::StatusCode NcclFailureCode(int nccl_result) {
  // ncclRemoteError: a peer closed or reset its connection, or the network failed (NCCL
  // 2.12 and later report a lost peer so). ncclInProgress here: the call never settled.
  // ncclSystemError is this host's (shared memory too small, an InfiniBand queue pair
  // that cannot start, no memory or descriptors left): a failure that a restart repeats.
  constexpr int kRemoteError = 6, kInProgress = 7;
  return nccl_result == kRemoteError || nccl_result == kInProgress ? absl::StatusCode::kAborted
                                                                   : absl::StatusCode::kInternal;
}

bool NcclAvailable(std::string* version_or_why) {
#ifdef LLAMAD_WITH_NCCL
  const NcclApi* api = LoadNccl(version_or_why);
  if (api == nullptr) return false;
  int version = 0;
  if (api->GetVersion(&version) != ncclSuccess) {
    *version_or_why = "ncclGetVersion failed";
    return false;
  }
  // 2.9.x and later encode major * 10000 + minor * 100 + patch.
  *version_or_why = StrCat(version / 10000, ".", version / 100 % 100, ".", version % 100);
  return true;
#else
  *version_or_why = "this build has no NCCL (no CUDA, or no nccl.h, when it was configured)";
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(std::unique_ptr<Communicator>& host,
                                                                   Backend& backend,
                                                                   std::chrono::milliseconds timeout) {
  int device = 0;
  void* stream = nullptr;
  // Every rank has the same backend: all of them refuse alike, before any collective.
  if (!CudaStreamOf(backend, &device, &stream)) {
    return absl::InvalidArgumentError(StrCat("NCCL moves GPU buffers: the ", backend.name(),
                                             " backend's are host memory (Gloo reduces those)"));
  }
#ifdef LLAMAD_WITH_NCCL
  std::string why;
  const NcclApi* api = LoadNccl(&why);
  // Where NCCL loads on one rank and not on another, the others wait in set-up until
  // `host` times out (the header's precondition; AttachDeviceCollectives asks every rank first).
  if (api == nullptr) return absl::FailedPreconditionError(why);
  bool agreed = false;
  auto collectives = NcclCollectives::Create(api, *host, device, static_cast<cudaStream_t>(stream), timeout, &agreed);
  if (!collectives.ok()) {
    if (!agreed) host.reset();  // out of step with the other ranks: of no further use
    return collectives.status();
  }
  return std::unique_ptr<Communicator>(new CommunicatorWithDevice(std::move(host), std::move(*collectives)));
#else
  return absl::FailedPreconditionError("this build has no NCCL (no CUDA, or no nccl.h, when it was configured)");
#endif
}

absl::StatusOr<std::unique_ptr<Communicator>> AttachDeviceCollectives(std::unique_ptr<Communicator> host,
                                                                      Backend& backend, const std::string& choice,
                                                                      std::chrono::milliseconds timeout,
                                                                      std::string* note) {
  note->clear();
  if (choice != "auto" && choice != "nccl" && choice != "gloo") {
    return absl::InvalidArgumentError(StrCat("communicator '", choice, "': expected auto, nccl or gloo"));
  }
  int device = 0;
  void* stream = nullptr;
  const bool on_gpu = CudaStreamOf(backend, &device, &stream);
  if (choice == "nccl" && !on_gpu) {
    return absl::InvalidArgumentError(StrCat("communicator nccl: NCCL moves GPU buffers, and this job trains on the ",
                                             backend.name(), " backend (mixed_precision bf16 trains on GPUs)"));
  }
  const int world = host->world_size();
  if (world == 1 || !on_gpu || choice == "gloo") return host;
  // Every rank must take the same path: each says whether it can load NCCL and where its
  // GPU is, and all decide on what all of them said.
  std::string version_or_why;
  const bool loads = NcclAvailable(&version_or_why);
  std::string location = StrCat("device", device);
#ifdef LLAMAD_WITH_NCCL
  location = GpuLocation(device);
#endif
  double cannot_load = loads ? 0 : 1;
  if (auto s = host->AllReduceSum(&cannot_load, 1); !s.ok()) return s;
  auto gpus = EveryRanksKeys(*host, {location});
  if (!gpus.ok()) return gpus.status();
  std::string reason;
  if (cannot_load != 0) {
    reason = loads ? StrCat(int(cannot_load), " rank(s) cannot load NCCL")
                   : StrCat("this rank cannot load NCCL: ", version_or_why);
  } else {
    for (int a = 0; a < world && reason.empty(); ++a) {
      for (int b = a + 1; b < world && reason.empty(); ++b) {
        if ((*gpus)[size_t(a)] == (*gpus)[size_t(b)]) {
          reason = StrCat("ranks ", a, " and ", b, " share a GPU, and NCCL needs one GPU per rank");
        }
      }
    }
  }
  if (!reason.empty()) {
    if (choice == "nccl") return absl::FailedPreconditionError(StrCat("communicator nccl: ", reason));
    *note = StrCat(reason, "; the GPU ranks reduce through host memory over Gloo");
    return host;
  }
  auto nccl = MakeNcclCommunicator(host, backend, timeout);
  if (!nccl.ok()) {
    // Every rank failed alike and still shares `host`: auto carries on over Gloo.
    if (choice == "auto" && host != nullptr) {
      *note = StrCat("NCCL could not start (", nccl.status().message(),
                     "); the GPU ranks reduce through host memory over Gloo");
      return host;
    }
    // NCCL was chosen and could not start: say what runs without it.
    return absl::Status(nccl.status().code(),
                        StrCat("communicator ", choice, ": ", nccl.status().message(),
                               " (parallel.communicator: gloo, or --communicator gloo, reduces through host memory)"));
  }
  *note = StrCat("GPU ranks reduce with NCCL ", version_or_why);
  return nccl;
}

}  // namespace llamad
