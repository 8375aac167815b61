#pragma once
// What a llama-train process's exit status means; the daemon and the scheduler act on it.

namespace llamad {

inline constexpr int kExitFailure = 1;  // failed while running (an I/O error, a diverged loss)
inline constexpr int kExitUsage = 2;    // bad input: command line, job file, data, checkpoint
// A peer rank was lost (a collective or the connection to the other ranks failed), or
// this rank stopped after a step because a peer was asked to stop (SIGTERM). Not
// the rank's own fault: the scheduler decides the job's fate by what happened to the
// peers (one failed: the job fails with that rank's reason; a node was lost: the job
// restarts), not by this rank. 75 is sysexits' EX_TEMPFAIL.
inline constexpr int kExitPeerLost = 75;
// This rank's GPU failed: an error CUDA reports for a broken or vanished device (an
// uncorrectable ECC or NVLink error, no device where there was one), never for a bug in a
// kernel. Not the job's fault either: the scheduler drains the node, which takes no new
// ranks until its operator undrains it, and restarts the job elsewhere from its latest
// checkpoint (a second time in a row without progress, it fails the job). 74 is
// sysexits' EX_IOERR.
inline constexpr int kExitDeviceFault = 74;

}  // namespace llamad
