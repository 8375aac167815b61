// Collective communication between the data-parallel ranks of one job.
//
// Every rank calls the same collectives in the same order. An error (a rank that died,
// a timeout) comes back as Unavailable; the caller stops training, since a collective
// that failed on one rank cannot be resumed.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace llamad {

class DeviceCollectives;  // comm/device_collectives.h

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // In-place element-wise sum over all ranks; every rank gets the result. Host memory.
  virtual absl::Status AllReduceSum(float* data, size_t n) = 0;
  virtual absl::Status AllReduceSum(double* data, size_t n) = 0;
  // Element-wise sum over all ranks into root's data; the other ranks' data is left
  // unspecified (Gloo uses it as scratch).
  virtual absl::Status ReduceSum(float* data, size_t n, int root) = 0;
  // Copies root's data to every rank.
  virtual absl::Status Broadcast(float* data, size_t n, int root) = 0;
  virtual absl::Status Barrier() = 0;
  // How long a collective may wait for the other ranks from now on (setup phases where
  // one rank works alone, such as preparing data, need longer than training steps).
  virtual void set_timeout(std::chrono::milliseconds timeout) = 0;
  // Collectives on a GPU's own buffers next to these host ones (NCCL), or null: GPU
  // ranks then stage their buffers through host memory (comm/backend_collectives.h).
  virtual DeviceCollectives* device_collectives() { return nullptr; }
};

// The contiguous part [begin, end) of n items that rank `rank` of `world` owns: parts
// differ in size by at most one. Batches and ZeRO shards are split this way.
inline std::pair<size_t, size_t> EvenSlice(size_t n, int rank, int world) {
  const size_t base = n / size_t(world), extra = n % size_t(world), r = size_t(rank);
  const size_t begin = r * base + (r < extra ? r : extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

// A rank's part of a range [begin, end) of n elements split in EvenSlices: elements
// [begin + offset, begin + offset + count).
struct OwnedPart {
  size_t offset = 0, count = 0;
  int owner = 0;
};
// The non-empty parts of [begin, end), in rank order.
inline std::vector<OwnedPart> OwnedParts(size_t begin, size_t end, size_t n, int world) {
  std::vector<OwnedPart> parts;
  for (int r = 0; r < world; ++r) {
    const auto [slice_begin, slice_end] = EvenSlice(n, r, world);
    const size_t lo = std::max(slice_begin, begin), hi = std::min(slice_end, end);
    if (lo < hi) parts.push_back({lo - begin, hi - lo, r});
  }
  return parts;
}

// World size 1: every collective is the identity.
std::unique_ptr<Communicator> MakeLocalCommunicator();

// Every rank's `keys` (as many on every rank), each as a 52-bit hash, exact in a double:
// element [r * keys.size() + k] is rank r's key k. Ranks compare places with it (a
// host's memory, a GPU). Collective.
absl::StatusOr<std::vector<double>> EveryRanksKeys(Communicator& comm, const std::vector<std::string>& keys);

// For each of this rank's `keys`, how many ranks (this one included) passed the same
// key in that position. Collective.
absl::StatusOr<std::vector<int>> CountRanksWithKeys(Communicator& comm, const std::vector<std::string>& keys);

// A key-value store that ranks meet through (they publish their addresses in it).
// Implementations are thread-compatible; one per rank.
class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // Waits until every key exists, for at most `timeout`; returns the values in order.
  virtual absl::StatusOr<std::vector<std::string>> Get(const std::vector<std::string>& keys,
                                                       std::chrono::milliseconds timeout) = 0;
};

// Makes the store of an address "<scheme>://...". The engine knows folders of files
// (plain paths); llamad's workers register "grpc" (the scheduler's Rendezvous service)
// without the engine depending on the control plane.
using RendezvousStoreFactory =
    std::function<absl::StatusOr<std::unique_ptr<RendezvousStore>>(const std::string& address)>;
void RegisterRendezvousScheme(const std::string& scheme, RendezvousStoreFactory factory);

// Gloo over TCP, this rank listening on `host` (an address of this machine the other
// ranks can reach). `rendezvous` is a folder of files that all ranks share and that is
// empty for a new job, or "<scheme>://..." of a registered store. A collective that
// waits longer than `timeout` fails.
absl::StatusOr<std::unique_ptr<Communicator>> MakeGlooCommunicator(int rank, int world_size,
                                                                   const std::string& rendezvous,
                                                                   std::chrono::milliseconds timeout,
                                                                   const std::string& host = "127.0.0.1");

}  // namespace llamad
