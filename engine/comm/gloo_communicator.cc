#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/reduce.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>

#include "comm/communicator.h"
#include "core/strings.h"

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace llamad {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float*, size_t) override { return absl::OkStatus(); }
  absl::Status AllReduceSum(double*, size_t) override { return absl::OkStatus(); }
  absl::Status ReduceSum(float*, size_t, int) override { return absl::OkStatus(); }
  absl::Status Broadcast(float*, size_t, int) override { return absl::OkStatus(); }
  absl::Status Barrier() override { return absl::OkStatus(); }
  void set_timeout(std::chrono::milliseconds) override {}
};

class GlooCommunicator final : public Communicator {
 public:
  explicit GlooCommunicator(std::shared_ptr<gloo::rendezvous::Context> context)
      : context_(std::move(context)) {}
  int rank() const override { return context_->rank; }
  int world_size() const override { return context_->size; }
  void set_timeout(std::chrono::milliseconds timeout) override { context_->setTimeout(timeout); }

  absl::Status AllReduceSum(float* data, size_t n) override { return Sum(data, n); }
  absl::Status AllReduceSum(double* data, size_t n) override { return Sum(data, n); }

  absl::Status ReduceSum(float* data, size_t n, int root) override {
    return Run("reduce", [&] {
      gloo::ReduceOptions opts(context_);
      opts.setOutput(data, n);
      opts.setRoot(root);
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<float>));
      opts.setTag(next_tag_++);
      gloo::reduce(opts);
    });
  }

  absl::Status Broadcast(float* data, size_t n, int root) override {
    return Run("broadcast", [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(data, n);
      opts.setRoot(root);
      opts.setTag(next_tag_++);
      gloo::broadcast(opts);
    });
  }
  absl::Status Barrier() override {
    return Run("barrier", [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTag(next_tag_++);
      gloo::barrier(opts);
    });
  }

 private:
  template <typename T>
  absl::Status Sum(T* data, size_t n) {
    return Run("all-reduce", [&] {
      // Gloo's ring all-reduce on large buffers; segments keep several in flight.
      gloo::AllreduceOptions opts(context_);
      opts.setOutput(data, n);
      opts.setReduceFunction(static_cast<void (*)(void*, const void*, const void*, size_t)>(&gloo::sum<T>));
      opts.setTag(next_tag_++);
      gloo::allreduce(opts);
    });
  }

  // Gloo reports a lost peer or a timeout by throwing; the training loop wants a status.
  // ABORTED: the rank exits with kExitPeerLost (core/exit_codes.h).
  template <typename F>
  absl::Status Run(const char* what, F&& f) {
    try {
      f();
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return absl::AbortedError(StrCat("rank ", rank(), ": ", what, " across ", world_size(),
                                           " ranks failed (a rank exited or stopped answering): ",
                                           e.what()));
    }
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  uint32_t next_tag_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> MakeLocalCommunicator() { return std::make_unique<LocalCommunicator>(); }

absl::StatusOr<std::vector<double>> EveryRanksKeys(Communicator& comm, const std::vector<std::string>& keys) {
  const size_t k = keys.size();
  std::vector<double> codes(size_t(comm.world_size()) * k, 0.0);
  for (size_t i = 0; i < k; ++i) {
    codes[size_t(comm.rank()) * k + i] = double(std::hash<std::string>{}(keys[i]) & ((uint64_t{1} << 52) - 1));
  }
  if (comm.world_size() > 1) {
    if (auto s = comm.AllReduceSum(codes.data(), codes.size()); !s.ok()) return s;
  }
  return codes;
}

absl::StatusOr<std::vector<int>> CountRanksWithKeys(Communicator& comm, const std::vector<std::string>& keys) {
  auto codes = EveryRanksKeys(comm, keys);
  if (!codes.ok()) return codes.status();
  const size_t k = keys.size();
  std::vector<int> counts(k, 0);
  for (size_t i = 0; i < k; ++i) {
    const double mine = (*codes)[size_t(comm.rank()) * k + i];
    for (int r = 0; r < comm.world_size(); ++r) counts[i] += (*codes)[size_t(r) * k + i] == mine;
  }
  return counts;
}

namespace {

std::mutex g_schemes_mu;
std::map<std::string, RendezvousStoreFactory>& Schemes() {
  static auto* schemes = new std::map<std::string, RendezvousStoreFactory>();
  return *schemes;
}

// Gloo's store interface over ours. Gloo reports failures by exception, which
// MakeGlooCommunicator turns back into a Status.
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(RendezvousStore* store, std::chrono::milliseconds timeout) : store_(store), timeout_(timeout) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    if (auto s = store_->Set(key, std::string(data.begin(), data.end())); !s.ok()) {
      throw std::runtime_error(std::string(s.message()));
    }
  }
  std::vector<char> get(const std::string& key) override {
    auto values = store_->Get({key}, timeout_);
    if (!values.ok()) throw std::runtime_error(std::string(values.status().message()));
    return std::vector<char>((*values)[0].begin(), (*values)[0].end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    if (auto values = store_->Get(keys, timeout); !values.ok()) {
      throw std::runtime_error(std::string(values.status().message()));
    }
  }

 private:
  RendezvousStore* store_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

void RegisterRendezvousScheme(const std::string& scheme, RendezvousStoreFactory factory) {
  std::lock_guard lock(g_schemes_mu);
  Schemes()[scheme] = std::move(factory);
}

absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(int rank, int world_size,
                                                                   const std::string& rendezvous,
                                                                   std::chrono::milliseconds timeout,
                                                                   const std::string& host) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(StrCat("rank ", rank, " is not within world size ", world_size));
  }
  std::unique_ptr<RendezvousStore> remote;
  if (const size_t colon = rendezvous.find("://"); colon != std::string::npos) {
    const std::string scheme = rendezvous.substr(0, colon);
    RendezvousStoreFactory factory;
    {
      std::lock_guard lock(g_schemes_mu);
      if (auto it = Schemes().find(scheme); it != Schemes().end()) factory = it->second;
    }
    if (!factory) {
      return absl::InvalidArgumentError(StrCat("rendezvous ", rendezvous, ": no store for scheme '", scheme,
                                               "' in this build"));
    }
    auto store = factory(rendezvous);
    if (!store.ok()) return store.status();
    remote = std::move(*store);
  }
  try {
    gloo::transport::tcp::attr attr(host.c_str());
    auto device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, world_size);
    context->setTimeout(timeout);
    if (remote) {
      GlooStoreAdapter store(remote.get(), timeout);
      context->connectFullMesh(store, device);
    } else {
      gloo::rendezvous::FileStore store(rendezvous);
      context->connectFullMesh(store, device);
    }
    return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(context)));
  } catch (const std::exception& e) {
    return absl::AbortedError(StrCat("rank ", rank, ": connecting ", world_size, " ranks through ",
                                         rendezvous, " failed: ", e.what()));
  }
}

}  // namespace llamad
