#!/usr/bin/env bash
# The GPU check, in two halves.
#
#   ops/gpu-check.sh            here (no GPU needed): builds the GPU tests and benchmark
#                               and bundles them with the libraries they load into
#                               .gpu-bundle/bundle.tgz (cuBLASLt and the driver excepted:
#                               every CUDA machine has those).
#   ops/gpu-check.sh --run      on a GPU machine that has CUDA 13 and Python with PyTorch
#                               and transformers (no network needed): unpacks the bundle,
#                               runs the CUDA tests, the kernel benchmarks and the 1B
#                               training step, then PyTorch's step on the same card, and
#                               prints one table. Results go to $OUT (default
#                               /tmp/llamad-gpu-check): tests.json, bench.json, torch.json.
#
# Options for --run: --batch N --seq N (the training step; default 8 x 2048).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE_DIR=$ROOT/.gpu-bundle

if [[ "${1:-}" != "--run" ]]; then
  [[ -f build/build.ninja ]] || ./ops/setup.sh
  grep -q "libllamad_cuda.a" build/build.ninja ||
    { echo "gpu-check: build/ has no CUDA backend (nvcc missing?)" >&2; exit 1; }
  cmake --build build --target cuda_test bench-gpu llama-train
  stage=$(mktemp -d)
  mkdir -p "$stage/bin" "$stage/lib"
  for exe in cuda_test bench-gpu llama-train; do
    strip --strip-unneeded -o "$stage/bin/$exe" "build/bin/$exe"
  done
  # Every shared library they load, except the C library, the driver and cuBLASLt.
  ldd build/bin/cuda_test build/bin/bench-gpu build/bin/llama-train | awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libpthread|libdl|librt|libcuda|libcublasLt|libcublas|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
  cp ops/bench/gpu/torch_llama_step.py "$stage/"
  mkdir -p "$BUNDLE_DIR"
  tar czf "$BUNDLE_DIR/bundle.tgz" -C "$stage" .
  rm -rf "$stage"
  echo "gpu-check: bundle $(du -h "$BUNDLE_DIR/bundle.tgz" | cut -f1) in .gpu-bundle/bundle.tgz;" \
       "on the GPU machine: ops/gpu-check.sh --run"
  exit 0
fi
shift
BATCH=8
SEQ=2048
while [[ $# -gt 0 ]]; do
  case "$1" in
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-/tmp/llamad-gpu-check}
mkdir -p "$OUT"
work=$(mktemp -d)
tar xzf "$BUNDLE_DIR/bundle.tgz" -C "$work"
# cuBLASLt: the toolkit's, else the one PyTorch's wheels carry.
libs=$work/lib
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do [[ -d $d ]] && libs=$libs:$d; done
wheel_cublas=$(python3 -c 'import nvidia.cublas, os; print(os.path.join(list(nvidia.cublas.__path__)[0], "lib"))' 2>/dev/null || true)
[[ -n "$wheel_cublas" ]] && libs=$libs:$wheel_cublas
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$OUT/nvidia-smi.txt" || true

echo "== tests"
set +e
timeout 240 "$work/bin/cuda_test" --gtest_brief=1 --gtest_output="json:$OUT/tests.json" 2>&1 | tee "$OUT/tests.log"
echo "== llama-train on the CUDA backend (tiny preset, bf16)"
timeout 120 "$work/bin/llama-train" train --config configs/tiny.yaml -x bf16 --steps 200 \
  --log-format json > "$OUT/train-tiny.jsonl" 2> "$OUT/train-tiny.log"
echo "exit $?"; tail -n 2 "$OUT/train-tiny.log"
echo "== llamad benchmark"
timeout 240 "$work/bin/bench-gpu" --batch "$BATCH" --seq "$SEQ" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
flops=$(python3 -c "import json; print(json.load(open('$OUT/bench.json'))['step']['flops_per_token'])" 2>/dev/null)
peak=$(python3 -c "import json; print(json.load(open('$OUT/bench.json'))['step']['peak_tflops'])" 2>/dev/null)
echo "== PyTorch (transformers.LlamaForCausalLM, bf16, AdamW) on the same card"
if [[ -n "$flops" ]]; then
  PYTHONUNBUFFERED=1 timeout 240 python3 "$work/torch_llama_step.py" --batch "$BATCH" --seq "$SEQ" \
    --flops-per-token "$flops" --peak-tflops "$peak" --json > "$OUT/torch.json" 2> "$OUT/torch.log"
  tail -n 3 "$OUT/torch.log"
fi
set -e

python3 - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
tests, bench, torch = load("tests.json"), load("bench.json"), load("torch.json")
print()
print(f"GPU check on {bench.get('device', '?')}")
if "tests" in tests:
    cases = [(f"{s['name']}.{t['name']}", t) for s in tests["testsuites"] for t in s["testsuite"]]
    failed = [name for name, t in cases if t.get("failures")]
    skipped = [name for name, t in cases if t.get("result") == "SKIPPED"]
    passed = len(cases) - len(failed) - len(skipped)
    print(f"tests: {passed} passed, {len(failed)} failed, {len(skipped)} skipped"
          + (f" (failed: {', '.join(failed)})" if failed else ""))
else:
    print(f"tests: did not finish ({tests.get('error')})")
print(f"{'kernel':30} {'shape':36} {'ms':>9} {'rate':>16}")
for r in bench.get("kernels", []):
    rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
    print(f"{r['kernel']:30} {r['shape']:36} {r['ms']:9.3f} {rate:>16}")
try:
    lines = [json.loads(l) for l in open(os.path.join(out, "train-tiny.jsonl")) if l.strip()]
    print(f"llama-train tiny bf16: loss {lines[0]['loss']:.3f} -> {lines[-1]['loss']:.3f} over "
          f"{lines[-1]['step']} steps, {lines[-1]['tokens_per_s']:.0f} tokens/s")
except Exception as e:
    print(f"llama-train tiny bf16: failed ({e})")
ours = bench.get("step")
print(f"{'training step':22} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
rows = [("llamad", ours), ("pytorch", torch if "tokens_per_s" in torch else None)]
for name, s in rows:
    if s:
        print(f"{name:22} {s['tokens_per_s']:10.0f} {s['tflops']:8.1f} {100 * s['mfu']:5.1f}% "
              f"{s.get('peak_mem_gib', 0):9.1f}")
    else:
        err = (torch if name == "pytorch" else bench).get("error", "did not finish")
        print(f"{name:22} failed: {err}")
if ours and "tokens_per_s" in torch:
    print(f"llamad / pytorch tokens/s: {ours['tokens_per_s'] / torch['tokens_per_s']:.2f}x "
          f"(model {ours['model']}, batch {ours['batch']} x seq {ours['seq']})")
EOF
