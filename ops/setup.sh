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
  librocksdb-dev libxxhash-dev   # checkpoint index and checksums
  libsentencepiece-dev sentencepiece   # tokenizer (and spm_encode, the tests' reference)
  libcurl4-openssl-dev libssl-dev      # dataset download and its SHA-256 checks
  zlib1g-dev libzstd-dev zstd          # .gz and .zst corpora
  libgloo-dev                          # collectives between CPU ranks (data parallelism)
  liburing-dev                         # the NVMe tier of optimizer state (io_uring)
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler   # the control plane
  openssl                    # certificates for the mutual TLS test
  python3 python3-numpy      # the independent numpy reference of the model (tests/reference)
  fio                        # the checkpoint benchmark's disk baseline
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

BUILD_DIR="${LLAMAD_BUILD_DIR:-build}"
JOBS="${LLAMAD_JOBS:-$(nproc)}"
if [[ ! -f "$BUILD_DIR/build.ninja" ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$BUILD_DIR" -j "$JOBS"
