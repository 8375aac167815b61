#!/usr/bin/env python3
"""Cluster speed test: runs a job spec on a llamad cluster the size of a hostfile and
prints the training throughput of its steps after warm-up (tokens/s, per device, MFU).

  ops/bench/cluster_bench.py --job ops/bench/7b/job.yaml --hostfile HOSTS
        [--devices-per-node 8] [--server HOST:PORT] [--token-file FILE]
        [--steps N] [--plugin zero3] [--batch B] [--seq T] [--model M] [--dataset D]
  ops/bench/cluster_bench.py --job ops/bench/7b/job.yaml --local 2 --model tiny \\
        --precision fp32 --seq 64 --batch 2 --steps 4        # the harness on this machine

A hostfile lists the cluster's nodes, one per line (`#` starts a comment), by the node
id or host name llamad registered them with. Every node runs llamad (ops/install-llamad.sh)
pointed at the scheduler that --server (or LLAMACTL_SERVER) names; the test checks that
each listed node is registered, ready and idle with --devices-per-node devices, sizes the
job to them (resources.nodes = the hostfile's nodes, the global batch = micro-batch x
every device, no accumulation), submits it with llamactl and follows it to its end,
keeping the step reports of rank 0 that `llamactl status` shows on the way.

--local N starts a scheduler and N node daemons with one CPU slot each on this machine
(tearing them down after), so that the whole path can be checked without a cluster.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "build", "bin")


def fail(message):
    sys.exit(f"cluster_bench.py: {message}")


def read_hostfile(path):
    hosts = []
    with open(path) as f:
        for line in f:
            host = line.split("#", 1)[0].strip()
            if host:
                hosts.append(host.split()[0])
    if not hosts:
        fail(f"{path}: no hosts in the hostfile")
    if len(set(hosts)) != len(hosts):
        fail(f"{path}: a host is listed twice")
    return hosts


class Cluster:
    """llamactl against one scheduler."""

    def __init__(self, llamactl, server, token_file):
        self.base = [llamactl]
        if server:
            self.base += ["--server", server]
        if token_file:
            self.base += ["--token-file", token_file]

    def run(self, *args, check=True):
        p = subprocess.run(self.base + ["--json", *args], capture_output=True, text=True)
        if check and p.returncode != 0:
            fail(f"llamactl {' '.join(args)} exited with {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def json(self, *args):
        out = self.run(*args).stdout
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            # One JSON object per line (lists).
            return [json.loads(line) for line in out.splitlines() if line.strip()]


def node_list(cluster):
    nodes = cluster.json("nodes")
    if isinstance(nodes, dict):
        nodes = nodes.get("nodes", [])
    return nodes


def check_nodes(cluster, hosts, devices_per_node, wait_s):
    """Every host is registered, ready and idle with enough devices (waits for them)."""
    deadline = time.time() + wait_s
    while True:
        problems = []
        nodes = node_list(cluster)
        by_name = {}
        for n in nodes:
            by_name[n.get("id", "")] = n
            by_name.setdefault(n.get("hostname", ""), n)
        for host in hosts:
            n = by_name.get(host)
            if n is None:
                problems.append(f"{host}: not registered with the scheduler")
                continue
            state = str(n.get("state", ""))
            free = int(n.get("devices", 0)) - int(n.get("devicesInUse", n.get("devices_in_use", 0)))
            if "READY" not in state.upper():
                problems.append(f"{host}: {state}")
            elif free < devices_per_node:
                problems.append(f"{host}: {free} free device(s), the test needs {devices_per_node}")
        if not problems:
            return
        if time.time() > deadline:
            fail("the cluster is not ready:\n  " + "\n  ".join(problems))
        time.sleep(0.5)


def write_spec(args, nodes, workdir):
    with open(args.job) as f:
        spec = yaml.safe_load(f)
    training = spec.setdefault("training", {})
    for key, value in (("batch_size", args.batch), ("max_length", args.seq), ("steps", args.steps),
                       ("mixed_precision", args.precision)):
        if value is not None:
            training[key] = value
    if args.model:
        spec["model"] = args.model
    if args.plugin:
        spec.setdefault("parallel", {})["plugin"] = args.plugin
    if args.dataset:
        spec.setdefault("data", {})["dataset"] = os.path.abspath(args.dataset)
    devices = nodes * args.devices_per_node
    training["global_batch_size"] = int(training.get("batch_size", 1)) * devices
    training.setdefault("log_interval", 1)
    spec["resources"] = {"nodes": nodes, "devices_per_node": args.devices_per_node}
    spec.setdefault("checkpoint", {})["interval"] = 0
    spec["name"] = f"{spec.get('name', 'bench')}-{nodes}x{args.devices_per_node}"
    path = os.path.join(workdir, "job.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path, spec


def follow(cluster, job_id, timeout_s):
    """Polls the job to its end; returns it and rank 0's step reports seen on the way
    (step -> (total steps, loss, tokens/s, MFU %)): the scheduler keeps the latest."""
    deadline = time.time() + timeout_s
    steps = {}
    while True:
        job = cluster.json("status", job_id)
        progress = job.get("progress") or {}
        if "step" in progress:
            steps[int(progress["step"])] = (int(progress.get("totalSteps", progress.get("total_steps", 0))),
                                            float(progress.get("loss", 0)),
                                            float(progress.get("tokensPerS", progress.get("tokens_per_s", 0))),
                                            100 * float(progress.get("mfu", 0)))
        state = str(job.get("state", ""))
        if any(s in state for s in ("SUCCEEDED", "FAILED", "CANCELLED")):
            return job, steps
        if time.time() > deadline:
            cluster.run("cancel", job_id, check=False)
            fail(f"job {job_id} still {state} after {timeout_s} s: cancelled")
        time.sleep(0.2)


def start_local(n, workdir, bin_dir):
    """A scheduler and n node daemons with one CPU slot each, on loopback (the ranks too)."""
    procs = []
    sched_dir = os.path.join(workdir, "scheduler")
    log = open(os.path.join(workdir, "daemons.log"), "w")
    procs.append(subprocess.Popen([os.path.join(bin_dir, "llamad"), "--role", "scheduler", "--listen", "127.0.0.1:0",
                                   "--data-dir", sched_dir, "--heartbeat-interval-ms", "200"],
                                  stdout=log, stderr=subprocess.STDOUT))
    address_file = os.path.join(sched_dir, "scheduler.address")
    for _ in range(200):
        if os.path.exists(address_file) and os.path.getsize(address_file) > 0:
            break
        time.sleep(0.05)
    else:
        stop_local(procs)
        fail(f"the local scheduler did not start (see {log.name})")
    address = open(address_file).read().strip()
    token = os.path.join(sched_dir, "token")
    hosts = []
    for i in range(n):
        node = f"local-{i}"
        hosts.append(node)
        procs.append(subprocess.Popen([os.path.join(bin_dir, "llamad"), "--role", "node", "--node-id", node,
                                       "--devices", "cpu:1", "--worker-threads", "1", "--scheduler", address,
                                       "--comm-host", "127.0.0.1",
                                       "--token-file", token, "--data-dir", os.path.join(workdir, node)],
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs, address, token, hosts


def stop_local(procs):
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()


def write_tokens(path, vocab, count=20000):
    import random
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.write(b"".join(rng.randrange(vocab).to_bytes(4, "little") for _ in range(count)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", required=True, help="job spec (ops/bench/7b/job.yaml, ops/bench/65b/job.yaml)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="the nodes, one per line")
    where.add_argument("--local", type=int, help="start this many node daemons here (one CPU slot each)")
    p.add_argument("--devices-per-node", type=int, default=None, help="ranks per node (default: the spec's)")
    p.add_argument("--server", default=os.environ.get("LLAMACTL_SERVER", ""), help="scheduler host:port")
    p.add_argument("--token-file", default=os.environ.get("LLAMACTL_TOKEN_FILE", ""))
    p.add_argument("--llamactl", default=shutil.which("llamactl") or os.path.join(BIN, "llamactl"))
    p.add_argument("--bin", default=BIN, help="--local: where llamad and llamactl are (default: build/bin)")
    p.add_argument("--model")
    p.add_argument("--plugin")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--dataset", help="dataset path (default: the spec's; --local: synthetic tokens)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the medians (default: a third)")
    p.add_argument("--timeout", type=int, default=24 * 3600, help="seconds the job may take")
    args = p.parse_args()

    workdir = tempfile.mkdtemp(prefix="llamad-cluster-bench-")
    procs = []
    try:
        if args.local is not None:
            if args.local < 1:
                fail("--local needs at least 1 node")
            args.devices_per_node = 1
            procs, args.server, args.token_file, hosts = start_local(args.local, workdir, args.bin)
            args.llamactl = os.path.join(args.bin, "llamactl")
            if not args.dataset:
                args.dataset = os.path.join(workdir, "tokens.u32")
                write_tokens(args.dataset, vocab=256)
        else:
            hosts = read_hostfile(args.hostfile)
            if args.devices_per_node is None:
                with open(args.job) as f:
                    args.devices_per_node = int(yaml.safe_load(f).get("resources", {}).get("devices_per_node", 1))
        cluster = Cluster(args.llamactl, args.server, args.token_file)
        check_nodes(cluster, hosts, args.devices_per_node, wait_s=30 if args.local else 5)
        spec_path, spec = write_spec(args, len(hosts), workdir)
        submitted = cluster.json("submit", spec_path)
        job_id = submitted.get("id") if isinstance(submitted, dict) else None
        if not job_id:
            fail(f"llamactl submit printed no job id: {submitted}")
        started = time.time()
        print(f"job {job_id} ({spec['name']}): model {spec.get('model')}, {len(hosts)} node(s) x "
              f"{args.devices_per_node} device(s), micro-batch {spec['training'].get('batch_size')} x "
              f"{spec['training'].get('max_length')}, plugin {spec.get('parallel', {}).get('plugin', 'ddp')}",
              flush=True)
        job, steps = follow(cluster, job_id, args.timeout)
        state = str(job.get("state", ""))
        if "SUCCEEDED" not in state:
            tail = job.get("lastLogLines", job.get("last_log_lines", []))
            fail(f"job {job_id} ended {state}: {job.get('reason', '')}\n" + "\n".join(tail[-20:]))
        if not steps:
            fail(f"job {job_id} succeeded but reported no steps")
        last = max(steps)
        warmup = args.warmup if args.warmup is not None else max(1, last // 3)
        measured = [v for k, v in sorted(steps.items()) if k > warmup] or [steps[last]]
        tokens = statistics.median(v[2] for v in measured)
        mfu = statistics.median(v[3] for v in measured)
        devices = len(hosts) * args.devices_per_node
        print(f"{last} steps in {time.time() - started:.0f} s (submit to end); median of the {len(measured)} "
              f"step reports seen after step {warmup}:")
        print(f"{'tokens/s':>12} {'per device':>12} {'MFU':>7} {'final loss':>11}")
        print(f"{tokens:12.0f} {tokens / devices:12.0f} {mfu:6.1f}% {steps[last][1]:11.4f}")
        print(json.dumps({"job": job_id, "nodes": len(hosts), "devices": devices, "tokens_per_s": tokens,
                          "tokens_per_s_per_device": tokens / devices, "mfu_percent": mfu, "steps": last}))
    finally:
        stop_local(procs)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
