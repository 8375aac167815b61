// NCCL between GPU ranks: gradients and parameters move device to device on a stream of
// their own, instead of through host memory and Gloo.
//
// NCCL joins the host communicator the ranks already share: that one carries NCCL's
// unique id from rank 0 to the others, and still runs every host collective (losses,
// progress, barriers). libnccl.so.2 is loaded at run time, so a binary built with CUDA
// runs where NCCL is not installed, and says so when a job asks for it.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "backend/backend.h"
#include "comm/communicator.h"

namespace llamad {

// The status code of a failed NCCL call or collective, from its ncclResult_t. ABORTED
// where a peer rank is gone or unreachable (ncclRemoteError, a call that never settles):
// the rank exits with kExitPeerLost (core/exit_codes.h), as over Gloo, and the scheduler
// restarts the job when a node was lost instead of failing it. INTERNAL for the rest
// (this host's system errors, NCCL's own, this GPU's, a misuse): the job fails with this
// rank's reason. A collective that started and makes no progress within the timeout is
// ABORTED too; one this rank's stream never reached is INTERNAL.
absl::StatusCode NcclFailureCode(int nccl_result);

// Whether NCCL loads here: its version ("2.28.9") in `version_or_why`, or why not.
bool NcclAvailable(std::string* version_or_why);

// `host` with NCCL collectives for `backend`'s buffers (a CUDA backend; one GPU per rank).
// Collective: every rank of `host` calls it. A collective that makes no progress for
// `timeout` (and NCCL's set-up) fails, and the NCCL communicator is aborted.
// `host` moves into the result. On failure it stays with the caller where every rank
// failed alike, having learned so through it (the ranks can go on without NCCL), and is
// reset where `host` itself failed or the ranks fell out of step. Every rank must get
// the same answer from NcclAvailable (AttachDeviceCollectives checks that first).
absl::StatusOr<std::unique_ptr<Communicator>> MakeNcclCommunicator(std::unique_ptr<Communicator>& host,
                                                                   Backend& backend,
                                                                   std::chrono::milliseconds timeout);

// What GPU ranks reduce over, from a job's parallel.communicator: "nccl" (an error where
// it cannot run), "gloo" (through host memory) or "auto" (NCCL where every rank loads it,
// has a GPU of its own and joins NCCL's communicator, Gloo otherwise; `note` says why
// not). Collective; `host` comes back unchanged for world size 1, for a host backend,
// and where NCCL is not used.
absl::StatusOr<std::unique_ptr<Communicator>> AttachDeviceCollectives(std::unique_ptr<Communicator> host,
                                                                      Backend& backend, const std::string& choice,
                                                                      std::chrono::milliseconds timeout,
                                                                      std::string* note);

}  // namespace llamad
