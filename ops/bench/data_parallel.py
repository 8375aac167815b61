#!/usr/bin/env python3
"""Data-parallel step time per plugin: compute, communication and exposed communication.

Runs `llama-train train --nproc N -p PLUGIN` (CPU backend, Gloo over loopback) on a
synthetic token stream for each plugin and prints the median over the steps after the
first two: the step time, the seconds spent inside collectives, the seconds the step
waited for them (not overlapped with the backward), the compute (step minus exposed
communication) and the memory each rank holds for parameters, gradients and optimizer
state.

  ops/bench/data_parallel.py [--nproc 2] [--steps 8] [--hidden 512] [--layers 8]
                             [--plugins ddp,zero1,zero2,zero3] [--llama-train build/bin/llama-train]

A plugin entry may carry its flags: --plugins "zero3,gemini --shard-param-frac 0.5".
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank and micro-batch")
    p.add_argument("--plugins", default="ddp,zero1,zero2,zero3")
    p.add_argument("--llama-train", default=os.path.join(ROOT, "build", "bin", "llama-train"))
    a = p.parse_args()
    if a.steps < 3:
        sys.exit("data_parallel.py: --steps must be at least 3 (the first two are warm-up)")

    work = tempfile.mkdtemp(prefix="llamad-dp-bench-")
    # A token stream with structure (so that the loss moves), fixed by a seed.
    tokens = bytearray()
    state = 12345
    for i in range(400_000):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        tokens += int((i * 7 + (state >> 40) % 5) % a.vocab).to_bytes(4, "little")
    with open(os.path.join(work, "tokens.u32"), "wb") as f:
        f.write(tokens)
    heads = max(1, a.hidden // 64)
    with open(os.path.join(work, "job.yaml"), "w") as f:
        f.write(f"""name: dp-bench
model: {{hidden_size: {a.hidden}, intermediate_size: {a.hidden * 8 // 3 // 64 * 64}, num_hidden_layers: {a.layers},
        num_attention_heads: {heads}, num_key_value_heads: {heads}, vocab_size: {a.vocab},
        max_position_embeddings: {a.seq}}}
training: {{max_length: {a.seq}, batch_size: {a.batch}, global_batch_size: {a.batch * a.nproc},
           steps: {a.steps}, lr: 1.0e-3, warmup_steps: 2}}
data: {{dataset: tokens.u32}}
checkpoint: {{dir: ckpt, interval: 0}}
""")

    rows = []
    for plugin in a.plugins.split(","):
        cmd = [a.llama_train, "train", "--config", os.path.join(work, "job.yaml"), "--log-format", "json",
               "--nproc", str(a.nproc), "--threads", "1", "-p", *plugin.split(), "--fresh"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{plugin}: llama-train failed ({out.returncode}): {out.stderr.strip()[-400:]}")
            continue
        steps = [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")][2:]
        med = lambda k: statistics.median(s[k] for s in steps)
        step, comm, exposed = med("step_time_s"), med("communication_s"), med("exposed_communication_s")
        rows.append((plugin, step, step - exposed, comm, exposed, steps[-1]["parameter_bytes"],
                     steps[-1]["gradient_bytes"], steps[-1]["optimizer_state_bytes"],
                     steps[-1]["peak_memory_bytes"], med("tokens_per_s")))

    mib = lambda b: f"{b / (1 << 20):8.1f}"
    print(f"world size {a.nproc}, hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
          f"{a.batch} x {a.seq} tokens per rank, CPU backend (1 thread per rank), Gloo on loopback; "
          f"median of steps 3..{a.steps}")
    # peak: rank 0's high-water mark of backend memory since start (start-up included).
    width = max([8] + [len(r[0]) for r in rows])
    print(f"{'plugin':{width}} {'step s':>8} {'compute s':>10} {'comm s':>8} {'exposed s':>10} "
          f"{'params MiB':>11} {'grads MiB':>10} {'optim MiB':>10} {'peak MiB':>9} {'tokens/s':>9}")
    for plugin, step, compute, comm, exposed, params, grads, optim, peak, tps in rows:
        print(f"{plugin:{width}} {step:8.3f} {compute:10.3f} {comm:8.3f} {exposed:10.3f} {mib(params):>11} "
              f"{mib(grads):>10} {mib(optim):>10} {mib(peak):>9} {tps:9.0f}")


if __name__ == "__main__":
    main()
