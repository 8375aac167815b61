"""Runs the engine's reference dump and checks its float32 loss and gradients against
the float64 numpy reference (llama_reference.py): 1e-5 relative, per tensor."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_reference import Llama  # noqa: E402

TOLERANCE = 1e-5


def check(dump_tool, workdir, flags):
    prefix = os.path.join(workdir, "dump" + "".join(f.replace("-", "_") for f in flags))
    subprocess.run([dump_tool, prefix, *flags], check=True)
    with open(prefix + ".json") as f:
        meta = json.load(f)
    raw = np.fromfile(prefix + ".bin", dtype="<f4")
    n = meta["num_params"]
    assert raw.size == 2 * n, f"{prefix}.bin holds {raw.size} floats, expected {2 * n}"
    params, grads = {}, {}
    for p in meta["params"]:
        sl = slice(p["offset"], p["offset"] + p["numel"])
        params[p["name"]] = raw[:n][sl].astype(np.float64).reshape(p["shape"])
        grads[p["name"]] = raw[n:][sl].astype(np.float64).reshape(p["shape"])
    B, T = meta["batch"], meta["seq"]
    tokens = np.array(meta["tokens"]).reshape(B, T)
    targets = np.array(meta["targets"]).reshape(B, T)
    loss, ref = Llama(meta["config"], params).loss_and_grads(tokens, targets)

    failures = []
    loss_err = abs(meta["loss"] - loss) / abs(loss)
    print(f"[{' '.join(flags) or 'default'}] loss engine {meta['loss']:.8f} reference {loss:.8f} "
          f"relative error {loss_err:.2e}")
    if loss_err > TOLERANCE:
        failures.append(f"loss: relative error {loss_err:.2e}")
    assert set(ref) == set(grads), f"parameter names differ: {set(ref) ^ set(grads)}"
    worst = 0.0
    for name in grads:
        err = np.linalg.norm(grads[name] - ref[name]) / max(np.linalg.norm(ref[name]), 1e-30)
        worst = max(worst, err)
        if err > TOLERANCE:
            failures.append(f"{name}: relative error {err:.2e}")
    print(f"  {len(grads)} gradient tensors, worst relative error {worst:.2e}")
    return failures


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump-tool", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    failures = []
    for flags in ([], ["--checkpoint"], ["--unfused"]):
        failures += check(args.dump_tool, args.workdir, flags)
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("the engine matches the numpy reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
