#!/usr/bin/env bash
# The LLaMA-65B speed test on a llamad cluster (see ../cluster_bench.py for the options):
#   ops/bench/65b/run.sh --hostfile HOSTS [--devices-per-node 8] [--server HOST:PORT] [--plugin zero3]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 "$here/../cluster_bench.py" --job "$here/job.yaml" "$@"
