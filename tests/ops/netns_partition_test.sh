#!/usr/bin/env bash
# A network partition, on three hosts made of network namespaces (netns_lib.sh): a job
# trains on nodes s, a and b (it may shrink to two) and checkpoints; then host b is cut
# off the network while its daemon and rank keep running, as when a switch port or a
# cloud instance's network goes. Nothing closes the other ranks' connections to b: they
# must not hang. The scheduler loses b's lease and restarts the job on s and a from its
# latest checkpoint, with no one stepping in. When b comes back, the rank it still runs
# ends (told to stop, or on a peer's reset), the node is ready for work again, and the
# job grows back onto it from the step its ranks stopped after to grow, which they saved.
# The times each phase took are printed.
#
#   tests/ops/netns_partition_test.sh SOURCE_DIR BIN_DIR
set -euo pipefail
source_dir="$1"
bin_dir="$2"
hosts=(s a b)
source "$source_dir/tests/ops/netns_lib.sh"
netns_start
work="$netns_work"

netns_scheduler s --heartbeat-interval-ms 200 --lease-timeout-ms 3000 --grow-after-ms 2000
for h in s a b; do netns_node "$h" 10.213.0.1:7070 --stop-grace-ms 3000; done
netns_wait_ready 3

python3 -c "
import random, sys
rng = random.Random(7)
open(sys.argv[1], 'wb').write(b''.join(rng.randrange(64).to_bytes(4, 'little') for _ in range(20000)))
" "$work/tokens.u32"
cat >"$work/partition.yaml" <<EOF
name: partition
model: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4,
        num_key_value_heads: 2, vocab_size: 64, max_position_embeddings: 128}
training: {max_length: 32, batch_size: 2, global_batch_size: 6, steps: 100000, lr: 3e-3, seed: 9}
data: {dataset: $work/tokens.u32}
checkpoint: {dir: $work/ckpt, interval: 40}
resources: {nodes: 3, min_nodes: 2, devices_per_node: 1}
EOF
job=$(netns_ctl s --json submit "$work/partition.yaml" | python3 -c "import json, sys; print(json.load(sys.stdin)['id'])") ||
  { netns_logs; echo "submitting the job failed"; exit 1; }

# job FIELD...: the job's fields from `llamactl status`, one per line ("" where absent).
job() {
  netns_ctl s --json status "$job" | python3 -c "
import json, sys
j = json.load(sys.stdin)
for f in sys.argv[1:]:
    if f == 'nodes':
        print(','.join(sorted(p.get('nodeId', p.get('node_id', '')) for p in j.get('placement', []))))
    elif f == 'step':
        print(j.get('progress', {}).get('step', 0))
    else:
        print(j.get(f, ''))
" "$@"
}
# until SECONDS DESCRIPTION CONDITION...: polls the condition (a command) every 0.2 s.
until_() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@"; do
    if ((SECONDS >= deadline)); then
      echo "not within ${limit} s: $what"
      netns_ctl s status "$job" || true
      netns_logs
      exit 1
    fi
    sleep 0.2
  done
}
past_step() { [ "$(job step)" -ge "$1" ] 2>/dev/null; }
running_on() {
  local out
  out=$(job state generation nodes | tr '\n' ' ')
  [[ $out == "JOB_STATE_RUNNING $1 $2 " ]]
}

until_ 60 "the job runs on the three nodes" running_on 1 node-a,node-b,node-s
until_ 60 "the job passes step 90 (checkpoints at 40 and 80)" past_step 90

netns_cut b
cut_at=$(date +%s%3N)
until_ 60 "the job runs again, on s and a" running_on 2 node-a,node-s
restarted_at=$(date +%s%3N)
# Generation $1's rank 0 says where it resumed (kept in `resumed`), then prints its steps.
trains() {
  local log
  log=$(ls "$work"/node-*/jobs/"$job"/gen-$1/rank-0.log 2>/dev/null) || return 1
  resumed=$(grep -o "resumed job 'partition' at step [0-9]*" "$log") || return 1
  grep -q '"step":' "$log"
}
until_ 60 "generation 2 resumes and trains" trains 2
stepping_at=$(date +%s%3N)
resumed_gen2=$resumed
[[ $resumed =~ at\ step\ ([0-9]+)$ ]] && ((BASH_REMATCH[1] >= 80)) ||
  { netns_logs; echo "generation 2 resumed before the checkpoint of step 80 ($resumed)"; exit 1; }
# b's rank cannot know: it still runs, cut off.
pgrep -f "llama-train train --config $work/node-b/jobs/$job/gen-1/" >/dev/null ||
  { netns_logs; echo "b's rank stopped while b was cut off (it cannot have been told)"; exit 1; }

netns_join b
joined_at=$(date +%s%3N)
node_b_ready() { netns_ctl s --json nodes | python3 -c "
import json, sys
out = sys.stdin.read()
try:
    nodes = json.loads(out)
    nodes = nodes.get('nodes', []) if isinstance(nodes, dict) else nodes
except json.JSONDecodeError:
    nodes = [json.loads(l) for l in out.splitlines() if l.strip()]
sys.exit(0 if any(n.get('id') == 'node-b' and 'READY' in str(n.get('state')) for n in nodes) else 1)
"; }
until_ 30 "node b is ready again" node_b_ready
# b's rank of generation 1 ends: its daemon is told to stop it, or it sees a peer's
# connection reset first and exits by itself (75); either way b reports the exit.
b_rank_ended() {
  ! pgrep -f "llama-train train --config $work/node-b/jobs/$job/gen-1/" >/dev/null &&
    grep -q "llamad: job $job rank [0-9]* exited" "$work/node-b.log"
}
until_ 30 "b's rank of generation 1 ends and b reports it" b_rank_ended
b_back_at=$(date +%s%3N)
how_b_ended=$(grep -q "stopping job $job rank" "$work/node-b.log" && echo "stopped by its daemon" ||
  echo "exited by itself")
# With b ready and its old rank gone, the job grows back onto it (grow_after_ms 2000):
# generation 3 on all three nodes. Generation 2's ranks, stopped for it, save the step
# they stopped after, and generation 3 goes on from that step.
until_ 60 "the job grows back to three nodes" running_on 3 node-a,node-b,node-s
until_ 60 "generation 3 resumes and trains" trains 3
grown_at=$(date +%s%3N)
stopped=$(grep -ho "stopped after step [0-9]*" "$work"/node-*/jobs/"$job"/gen-2/rank-0.log | grep -o "[0-9]*$" ||
  true)
[[ -n $stopped && $resumed =~ at\ step\ $stopped$ ]] ||
  { netns_logs; echo "generation 3 did not resume from the step generation 2 stopped after" \
    "(${stopped:-no stop in its log}; $resumed)"; exit 1; }

# The job's history says why it has a second and a third generation.
history=$(netns_ctl s events "$job")
grep -q "requeued   node node-b lost (no heartbeat for" <<<"$history" &&
  grep -q "requeued   growing from 2 node(s): node-b free again" <<<"$history" ||
  { echo "$history"; echo "the job's events do not say that node-b was lost and the job grew back"; exit 1; }

netns_ctl s cancel "$job" >/dev/null
until_ 30 "the job is cancelled" eval '[ "$(job state)" = JOB_STATE_CANCELLED ]'
seconds() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
echo "partition: cut to generation 2 running $(seconds "$cut_at" "$restarted_at") s, to its first step" \
  "$(seconds "$cut_at" "$stepping_at") s ($resumed_gen2); b joined to ready with its old rank ended" \
  "$(seconds "$joined_at" "$b_back_at") s ($how_b_ended); joined to generation 3 on three nodes training" \
  "$(seconds "$joined_at" "$grown_at") s ($resumed)"
echo "netns partition: ok"
