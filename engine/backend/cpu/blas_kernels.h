// OpenBLAS picks its kernels at load time from the CPU id. On CPUs newer than the
// library (Debian 12 ships 0.3.21), it falls back to its generic SSE3 kernels, 5x
// slower than its AVX-512 ones on the same machine. The fix has to happen before the
// library loads, so it is a re-exec of the program with OPENBLAS_CORETYPE set.
#pragma once

namespace llamad {

// When OpenBLAS chose kernels below what this CPU supports (and OPENBLAS_CORETYPE is not
// set by the user), re-executes the current program with OPENBLAS_CORETYPE naming the
// best kernels for the CPU's features. Call first thing in main(); returns when nothing
// needs changing (or the re-exec failed, which only costs speed).
void SelectBlasKernels(char** argv);

// The kernel family OpenBLAS runs with ("Cooperlake", "Haswell", ...).
const char* BlasCoreName();

}  // namespace llamad
