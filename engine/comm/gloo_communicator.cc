#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/file_store.h>
#include <gloo/transport/tcp/device.h>

#include "comm/communicator.h"
#include "core/strings.h"

namespace llamad {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  absl::Status AllReduceSum(float*, size_t) override { return absl::OkStatus(); }
  absl::Status AllReduceSum(double*, size_t) override { return absl::OkStatus(); }
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
  template <typename F>
  absl::Status Run(const char* what, F&& f) {
    try {
      f();
      return absl::OkStatus();
    } catch (const std::exception& e) {
      return absl::UnavailableError(StrCat("rank ", rank(), ": ", what, " across ", world_size(),
                                           " ranks failed (a rank exited or stopped answering): ",
                                           e.what()));
    }
  }

  std::shared_ptr<gloo::rendezvous::Context> context_;
  uint32_t next_tag_ = 1;
};

}  // namespace

absl::Status AllGatherSlices(Communicator& comm, float* data, size_t n) {
  for (int r = 0; r < comm.world_size(); ++r) {
    const auto [begin, end] = EvenSlice(n, r, comm.world_size());
    if (auto s = comm.Broadcast(data + begin, end - begin, r); !s.ok()) return s;
  }
  return absl::OkStatus();
}

std::unique_ptr<Communicator> MakeLocalCommunicator() { return std::make_unique<LocalCommunicator>(); }

absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(int rank, int world_size,
                                                                   const std::string& store_dir,
                                                                   std::chrono::milliseconds timeout) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return absl::InvalidArgumentError(StrCat("rank ", rank, " is not within world size ", world_size));
  }
  try {
    gloo::transport::tcp::attr attr("127.0.0.1");
    auto device = gloo::transport::tcp::CreateDevice(attr);
    gloo::rendezvous::FileStore store(store_dir);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, world_size);
    context->setTimeout(timeout);
    context->connectFullMesh(store, device);
    return std::unique_ptr<Communicator>(new GlooCommunicator(std::move(context)));
  } catch (const std::exception& e) {
    return absl::UnavailableError(StrCat("rank ", rank, ": connecting ", world_size, " ranks through ",
                                         store_dir, " failed: ", e.what()));
  }
}

}  // namespace llamad
