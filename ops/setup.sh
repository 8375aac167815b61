#!/usr/bin/env bash
# Installs every Debian package llamad needs (idempotent, non-interactive) and builds
# the project in Release mode with Ninja into build/.
#
#   ops/setup.sh                 install + configure + build
#   LLAMAD_SKIP_INSTALL=1 ...    skip the package step (packages already present)
#   LLAMAD_BUILD_DIR=DIR ...     build somewhere other than build/
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libopenblas-openmp-dev     # CPU GEMMs; the OpenMP build runs single-threaded inside our parallel regions
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libfmt-dev libspdlog-dev libabsl-dev
  libgtest-dev libgmock-dev
  libboost-context-dev       # the fibers of the tests' CUDA emulator
  librocksdb-dev libxxhash-dev   # checkpoint index and checksums
  libsentencepiece-dev sentencepiece   # tokenizer (and spm_encode, the tests' reference)
  libcurl4-openssl-dev libssl-dev      # dataset download and its SHA-256 checks
  zlib1g-dev libzstd-dev zstd          # .gz and .zst corpora
  libgloo-dev                          # collectives between CPU ranks (data parallelism)
  liburing-dev                         # the NVMe tier of optimizer state (io_uring)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler   # the control plane
  openssl                    # certificates for the mutual TLS test
  python3 python3-numpy      # the independent numpy reference of the model (tests/reference)
  python3-yaml               # the cluster speed-test harness (ops/bench/cluster_bench.py)
  iproute2 procps            # its multi-host tests: hosts as network namespaces (ip, pgrep)
  python3-pip                # fetches the cuDNN frontend headers (CUDA builds)
  fio                        # the checkpoint benchmark's disk baseline
  patchelf                   # the GPU check's bundle: our programs onto the bundled C library
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 && -z "${LLAMAD_SKIP_INSTALL:-}" ]]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# cuDNN's fused attention (optional, CUDA builds): the cuDNN frontend's headers, from
# NVIDIA's wheel on PyPI (the headers are the same in every wheel; one pinned file is
# fetched and checked). Without them the CUDA backend uses its own attention kernels.
FRONTEND_VERSION=1.32.0
FRONTEND_WHEEL=nvidia_cudnn_frontend-$FRONTEND_VERSION-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
FRONTEND_SHA256=c6006556017a4d1c914c52a556c71b1267f2d6a0500f742e7b4edef539878df0
FRONTEND_DIR=.deps/cudnn-frontend-$FRONTEND_VERSION
if [[ -x /usr/local/cuda/bin/nvcc && ! -f $FRONTEND_DIR/include/cudnn_frontend.h ]]; then
  fetch=$(mktemp -d)
  if python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
       --implementation cp --platform manylinux_2_28_x86_64 -d "$fetch" \
       "nvidia-cudnn-frontend==$FRONTEND_VERSION" 2>"$fetch/log" &&
     echo "$FRONTEND_SHA256  $fetch/$FRONTEND_WHEEL" | sha256sum -c --quiet; then
    mkdir -p "$FRONTEND_DIR"
    python3 -m zipfile -e "$fetch/$FRONTEND_WHEEL" "$fetch/wheel"
    rm -rf "$FRONTEND_DIR/include" && mv "$fetch/wheel/include" "$FRONTEND_DIR/include"
  else
    echo "setup: could not fetch the cuDNN frontend headers ($(tail -n 1 "$fetch/log"));" \
         "the CUDA backend builds with its own attention kernels only" >&2
  fi
  rm -rf "$fetch"
fi

BUILD_DIR="${LLAMAD_BUILD_DIR:-build}"
JOBS="${LLAMAD_JOBS:-$(nproc)}"
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$BUILD_DIR" -j "$JOBS"
