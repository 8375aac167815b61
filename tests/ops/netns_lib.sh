# Hosts on one machine for the tests: network namespaces joined by a bridge, host i of
# the list at 10.213.0.i/24, each with its own loopback. Sourced by the netns_*_test.sh
# scripts, which set `hosts` (names) before calling netns_start; `on HOST CMD...` runs a
# command on a host. At exit every process left on the hosts is stopped (SIGTERM, then
# SIGKILL) and the hosts removed. Exits 77 (skipped) where namespaces cannot be made
# (not root, no iproute2, no permission).

netns_skip() { echo "SKIPPED: $*"; exit 77; }
[ "$(id -u)" = 0 ] || netns_skip "network namespaces need root"
command -v ip >/dev/null || netns_skip "no ip command (Debian package iproute2)"
command -v pgrep >/dev/null || netns_skip "no pgrep command (Debian package procps)"
# The hosts' addresses are reached directly: a proxy from the environment would not be
# on their network (gRPC follows these variables).
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY grpc_proxy all_proxy ALL_PROXY

netns_tag="llnt$$"
netns_work="$(mktemp -d /tmp/llamad-netns-XXXXXX)"
on() { local h="$1"; shift; ip netns exec "$netns_tag-$h" "$@"; }
netns_address() {  # the address of host $1
  local i=1 h
  for h in "${hosts[@]}"; do
    [ "$h" = "$1" ] && { echo "10.213.0.$i"; return; }
    i=$((i + 1))
  done
  return 1
}

netns_processes() {  # every process on the hosts: daemons, ranks, anything they started
  local h
  for h in "${hosts[@]}"; do ip netns pids "$netns_tag-$h" 2>/dev/null || true; done
}
netns_cleanup() {
  local h pids
  pids=$(netns_processes)
  if [ -n "$pids" ]; then
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 100); do
      [ -z "$(netns_processes)" ] && break
      sleep 0.1
    done
    pids=$(netns_processes)
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  fi
  for h in "${hosts[@]}"; do ip netns del "$netns_tag-$h" 2>/dev/null || true; done
  ip netns del "$netns_tag-hub" 2>/dev/null || true
  rm -rf "$netns_work"
}

netns_make() {
  local hub="$netns_tag-hub" i=1 h ns
  ip netns add "$hub" &&
    ip -n "$hub" link add br0 type bridge &&
    ip -n "$hub" link set br0 up || return 1
  for h in "${hosts[@]}"; do
    ns="$netns_tag-$h"
    ip netns add "$ns" &&
      ip -n "$ns" link set lo up &&
      ip link add "$netns_tag$h" netns "$ns" type veth peer name "p$h" netns "$hub" &&
      ip -n "$ns" link set "$netns_tag$h" name eth0 &&
      ip -n "$ns" addr add "10.213.0.$i/24" dev eth0 &&
      ip -n "$ns" link set eth0 up &&
      ip -n "$hub" link set "p$h" master br0 &&
      ip -n "$hub" link set "p$h" up || return 1
    i=$((i + 1))
  done
  on "${hosts[0]}" true
}

netns_start() {
  trap netns_cleanup EXIT
  netns_make 2>"$netns_work/network.log" ||
    netns_skip "network namespaces cannot be made here: $(tail -n 1 "$netns_work/network.log")"
}

# Cuts host $1 off the network (its processes keep running), or joins it again. Its
# port leaves the bridge with its link up, as when a switch drops a machine's traffic:
# the host sees no carrier loss, its packets just go nowhere.
netns_cut() { ip -n "$netns_tag-hub" link set "p$1" nomaster; }
netns_join() { ip -n "$netns_tag-hub" link set "p$1" master br0; }

# The llamad processes ($bin_dir must name the build's bin folder).
netns_token="$netns_work/scheduler/token"
# netns_scheduler HOST [FLAGS...]: a scheduler on HOST, listening on every address (:7070).
netns_scheduler() {
  local h="$1"
  shift
  on "$h" "$bin_dir/llamad" --role scheduler --listen 0.0.0.0:7070 --data-dir "$netns_work/scheduler" "$@" \
    >"$netns_work/scheduler.log" 2>&1 &
  for _ in $(seq 200); do [ -s "$netns_work/scheduler/scheduler.address" ] && return 0; sleep 0.05; done
  cat "$netns_work/scheduler.log"
  echo "the scheduler did not start"
  return 1
}
# netns_node HOST SCHEDULER_ADDRESS [FLAGS...]: node daemon node-HOST with one CPU slot.
netns_node() {
  local h="$1" scheduler="$2"
  shift 2
  on "$h" "$bin_dir/llamad" --role node --node-id "node-$h" --devices cpu:1 --worker-threads 1 \
    --scheduler "$scheduler" --token-file "$netns_token" --data-dir "$netns_work/node-$h" "$@" \
    >"$netns_work/node-$h.log" 2>&1 &
}
# netns_ctl HOST ARGS...: llamactl on HOST against the scheduler at 10.213.0.1:7070.
netns_ctl() {
  local h="$1"
  shift
  on "$h" "$bin_dir/llamactl" --server 10.213.0.1:7070 --token-file "$netns_token" "$@"
}
# netns_wait_ready N: until N nodes are ready (20 s at most).
netns_wait_ready() {
  for _ in $(seq 200); do
    [ "$(netns_ctl "${hosts[0]}" --json nodes 2>/dev/null | grep -o NODE_STATE_READY | wc -l)" = "$1" ] && return 0
    sleep 0.1
  done
  netns_ctl "${hosts[0]}" nodes
  echo "fewer than $1 nodes became ready"
  return 1
}
# The daemons' logs and the ranks' last lines, for a failure.
netns_logs() {
  local log
  for log in "$netns_work"/scheduler.log "$netns_work"/node-*.log; do
    echo "--- $log"
    tail -n 20 "$log"
  done
  for log in "$netns_work"/node-*/jobs/*/gen-*/rank-*.log; do
    [ -e "$log" ] && { echo "--- $log"; tail -n 20 "$log"; }
  done
  return 0
}
