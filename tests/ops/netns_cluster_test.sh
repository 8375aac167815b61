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
# Exits 77 (skipped) where network namespaces cannot be made (netns_lib.sh).
set -euo pipefail
source_dir="$1"
bin_dir="$2"
hosts=(s a b)  # the scheduler's host and two nodes
source "$source_dir/tests/ops/netns_lib.sh"
netns_start
work="$netns_work"
# Host s has a default route (the others need none): comm_host auto takes its address
# for the node that dials the scheduler on loopback.
ip -n "$netns_tag-s" route add default dev eth0 || netns_skip "no default route can be added in a namespace here"

netns_scheduler s --heartbeat-interval-ms 200
netns_node s 127.0.0.1:7070
netns_node a 10.213.0.1:7070
netns_node b dns:///10.213.0.1:7070
netns_wait_ready 3

printf 'node-s  # 10.213.0.1, beside the scheduler\nnode-a  # 10.213.0.2\nnode-b  # 10.213.0.3\n' >"$work/hosts"
python3 -c "
import random, sys
rng = random.Random(7)
open(sys.argv[1], 'wb').write(b''.join(rng.randrange(256).to_bytes(4, 'little') for _ in range(20000)))
" "$work/tokens.u32"
status=0
on s python3 "$source_dir/ops/bench/cluster_bench.py" --job "$source_dir/ops/bench/7b/job.yaml" \
  --hostfile "$work/hosts" --devices-per-node 1 --server 10.213.0.1:7070 --token-file "$netns_token" \
  --llamactl "$bin_dir/llamactl" --model tiny --precision fp32 --seq 64 --batch 2 --steps 20 \
  --dataset "$work/tokens.u32" --timeout 300 || status=$?
if [ "$status" != 0 ]; then
  netns_logs
  exit "$status"
fi
# Each node's ranks listened on that node's own address on the network (comm_host auto).
for h in s a b; do
  address=$(netns_address "$h")
  grep -q "peers on $address)" "$work/node-$h.log" ||
    { cat "$work/node-$h.log"; echo "node-$h's ranks did not listen on $address"; exit 1; }
done
echo "netns cluster: ok"
