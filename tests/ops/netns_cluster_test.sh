#!/usr/bin/env bash
# Three hosts on one machine: network namespaces joined by a bridge, each with its own
# address and its own loopback. The scheduler listens on every address of host s
# (0.0.0.0); node daemons on hosts a and b find it by its address on that network (b in
# gRPC's dns:/// form), and one on host s itself over loopback, as a cluster's head node
# may (its ranks then listen on the address of s's default route). The cluster
# speed-test harness runs a three-rank job across them with its --hostfile, as on a
# real cluster.
# A rank that listened on or dialled a loopback or wildcard address would not reach its
# peers on the other hosts, so the job only succeeds when every address the ranks are
# given (the rendezvous, comm_host auto) is one the other hosts can reach.
#
#   tests/ops/netns_cluster_test.sh SOURCE_DIR BIN_DIR
# Exits 77 (skipped) where network namespaces cannot be made (not root, no iproute2).
set -euo pipefail
source_dir="$1"
bin_dir="$2"

skip() { echo "SKIPPED: $*"; exit 77; }
[ "$(id -u)" = 0 ] || skip "network namespaces need root"
command -v ip >/dev/null || skip "no ip command (Debian package iproute2)"

tag="llnt$$"
hub="$tag-hub"
hosts=(s a b)  # the scheduler's host and two nodes
work="$(mktemp -d /tmp/llamad-netns-XXXXXX)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for h in "${hosts[@]}"; do ip netns del "$tag-$h" 2>/dev/null || true; done
  ip netns del "$hub" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

make_network() {
  ip netns add "$hub" &&
    ip -n "$hub" link add br0 type bridge &&
    ip -n "$hub" link set br0 up || return 1
  local i=1 h ns
  for h in "${hosts[@]}"; do
    ns="$tag-$h"
    ip netns add "$ns" &&
      ip -n "$ns" link set lo up &&
      ip link add "$tag$h" netns "$ns" type veth peer name "p$h" netns "$hub" &&
      ip -n "$ns" link set "$tag$h" name eth0 &&
      ip -n "$ns" addr add "10.213.0.$i/24" dev eth0 &&
      ip -n "$ns" link set eth0 up &&
      ip -n "$hub" link set "p$h" master br0 &&
      ip -n "$hub" link set "p$h" up || return 1
    i=$((i + 1))
  done
  # Host s has a default route (the others need none): comm_host auto takes its address
  # for the node that dials the scheduler on loopback.
  ip -n "$tag-s" route add default dev eth0 &&
    ip netns exec "$tag-s" true
}
make_network 2>"$work/network.log" ||
  skip "network namespaces cannot be made here: $(tail -n 1 "$work/network.log")"
on() { local h="$1"; shift; ip netns exec "$tag-$h" "$@"; }

on s "$bin_dir/llamad" --role scheduler --listen 0.0.0.0:7070 --data-dir "$work/s" \
  --heartbeat-interval-ms 200 >"$work/s.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -s "$work/s/scheduler.address" ] && break; sleep 0.05; done
[ -s "$work/s/scheduler.address" ] || { cat "$work/s.log"; echo "the scheduler did not start"; exit 1; }
declare -A scheduler_of=([s]=127.0.0.1:7070 [a]=10.213.0.1:7070 [b]=dns:///10.213.0.1:7070)
for h in s a b; do
  on "$h" "$bin_dir/llamad" --role node --node-id "node-$h" --devices cpu:1 --worker-threads 1 \
    --scheduler "${scheduler_of[$h]}" --token-file "$work/s/token" --data-dir "$work/node-$h" \
    >"$work/node-$h.log" 2>&1 &
  pids+=($!)
done
ctl() { on s "$bin_dir/llamactl" --server 10.213.0.1:7070 --token-file "$work/s/token" "$@"; }
for _ in $(seq 300); do
  [ "$(ctl --json nodes 2>/dev/null | grep -o NODE_STATE_READY | wc -l)" = 3 ] && break
  sleep 0.1
done

printf 'node-s  # 10.213.0.1, beside the scheduler\nnode-a  # 10.213.0.2\nnode-b  # 10.213.0.3\n' >"$work/hosts"
python3 -c "
import random, sys
rng = random.Random(7)
open(sys.argv[1], 'wb').write(b''.join(rng.randrange(256).to_bytes(4, 'little') for _ in range(20000)))
" "$work/tokens.u32"
status=0
on s python3 "$source_dir/ops/bench/cluster_bench.py" --job "$source_dir/ops/bench/7b/job.yaml" \
  --hostfile "$work/hosts" --devices-per-node 1 --server 10.213.0.1:7070 --token-file "$work/s/token" \
  --llamactl "$bin_dir/llamactl" --model tiny --precision fp32 --seq 64 --batch 2 --steps 20 \
  --dataset "$work/tokens.u32" --timeout 300 || status=$?
if [ "$status" != 0 ]; then
  for log in s node-s node-a node-b; do echo "--- llamad: $log"; tail -n 20 "$work/$log.log"; done
  for rank_log in "$work"/node-*/jobs/*/gen-*/rank-*.log; do
    [ -e "$rank_log" ] && { echo "--- $rank_log"; tail -n 20 "$rank_log"; }
  done
  exit "$status"
fi
# Each node's ranks listened on that node's own address on the network (comm_host auto).
i=1
for h in s a b; do
  grep -q "peers on 10.213.0.$i)" "$work/node-$h.log" ||
    { cat "$work/node-$h.log"; echo "node-$h's ranks did not listen on 10.213.0.$i"; exit 1; }
  i=$((i + 1))
done
echo "netns cluster: ok"
