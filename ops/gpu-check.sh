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
# Options for --run: --batch N --seq N (the training step; default 8 x 2048),
# --test-budget SECONDS (default 150): tests not started by then are listed as not run,
# so that the benchmarks and PyTorch's step always get their turn; --test-jobs N
# (default 4): tests run side by side; --bf16-moments: the 7B host-optimizer step once more
# with its moments in bf16 (offload.host_moments), beside the f32 one (one more 7B
# host-optimizer run, limited to 150 s).
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
  # patchelf moves our programs onto the bundled C library where the GPU machine's is older.
  command -v patchelf > /dev/null ||
    { echo "gpu-check: patchelf is missing (ops/setup.sh installs it)" >&2; exit 1; }
  cp "$(command -v patchelf)" "$stage/bin/"
  # Every shared library they load, except the C library, the driver and cuBLASLt.
  ldd build/bin/cuda_test build/bin/bench-gpu build/bin/llama-train "$(command -v patchelf)" |
    awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libpthread|libdl|librt|libcuda|libcublasLt|libcublas|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$stage/lib/"; done
  # The C library too, for a GPU machine whose own is older than this one's.
  mkdir -p "$stage/glibc"
  for lib in ld-linux-x86-64.so.2 libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$stage/glibc/"
  done
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
TEST_BUDGET=150
TEST_JOBS=4
BF16_MOMENTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --batch) BATCH=$2; shift 2 ;;
    --seq) SEQ=$2; shift 2 ;;
    --test-budget)
      [[ "$2" =~ ^[0-9]+$ ]] || { echo "gpu-check: --test-budget takes whole seconds, not '$2'" >&2; exit 2; }
      TEST_BUDGET=$2; shift 2 ;;
    --test-jobs)
      [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "gpu-check: --test-jobs takes a count, not '$2'" >&2; exit 2; }
      TEST_JOBS=$2; shift 2 ;;
    --bf16-moments) BF16_MOMENTS=1; shift ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-/tmp/llamad-gpu-check}
mkdir -p "$OUT"
# A reused $OUT must not show an earlier run's numbers for a part that fails or is skipped
# now. Each run lists the files it wrote there (whatever its parts are by then) in a
# manifest, and the next run removes those first; nothing else in $OUT is touched.
manifest=.gpu-check-files
if [[ -f "$OUT/$manifest" ]]; then
  (cd "$OUT" && while IFS= read -r f; do if [[ -n $f && $f != */* ]]; then rm -f -- "$f"; fi; done < "$manifest")
fi
run_stamp=$(mktemp)
work=$(mktemp -d)
finish() {
  (cd "$OUT" && find . -maxdepth 1 -type f -newer "$run_stamp" ! -name "$manifest" -printf '%f\n' > "$manifest")
  rm -rf "$run_stamp" "$work"
}
trap finish EXIT
# Each part's wall time, for the table: the whole check is to stay within 5 minutes.
: > "$OUT/times.txt"
part_start=$SECONDS
took() {  # took NAME: the time since the last part ended
  echo "$1 $((SECONDS - part_start))" >> "$OUT/times.txt"
  part_start=$SECONDS
}
tar xzf "$BUNDLE_DIR/bundle.tgz" -C "$work"
# cuBLASLt, cuDNN with what it loads (the CUDA runtime, NVRTC) and NCCL: the toolkit's, then
# those PyTorch's wheels carry. The bundled libraries are for our programs alone
# (PyTorch keeps its own C++ runtime): `ours` runs one of them.
libs=$work/lib
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do [[ -d $d ]] && libs=$libs:$d; done
wheel_libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
import nvidia
dirs = []
for root in nvidia.__path__:
    for name in ("libcublasLt.so.13", "libcudnn_graph.so.9", "libcudart.so.13", "libnvrtc.so.13", "libnccl.so.2"):
        for hit in glob.glob(os.path.join(root, "**", name), recursive=True):
            if os.path.dirname(hit) not in dirs:
                dirs.append(os.path.dirname(hit))
print(":".join(dirs))
PY
)
[[ -n "$wheel_libs" ]] && libs=$libs:$wheel_libs
echo "gpu-check: libraries from $libs"
ours() {  # ours SECONDS [NAME=VALUE...] PROGRAM ARGS...: one of our programs, under a time limit
  local limit=$1
  shift
  local vars=()
  while [[ "${1:-}" == *=* ]]; do vars+=("$1"); shift; done
  timeout "$limit" env LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "${vars[@]}" "$@"
}
# A machine whose C library is older than the build machine's runs our programs on the
# bundled one: their ELF interpreter and search path point into the bundle, so the
# llama-train processes the tests start (the same files) get it too, while the shell and
# Python keep the machine's. The programs also name the C library's parts that only
# cuBLASLt asks for: its own RUNPATH would otherwise find the machine's, which do not
# go with the bundled libc. LLAMAD_GPU_CHECK_BUNDLED_GLIBC=1 takes this path anywhere.
if [[ "${LLAMAD_GPU_CHECK_BUNDLED_GLIBC:-0}" == 1 ]] ||
   ! ours 60 "$work/bin/cuda_test" --gtest_list_tests > "$OUT/tests-list.txt" 2> "$OUT/preflight.log"; then
  [[ -s "$OUT/preflight.log" ]] && cat "$OUT/preflight.log"
  echo "gpu-check: using the bundled C library"
  for exe in cuda_test bench-gpu llama-train; do
    "$work/glibc/ld-linux-x86-64.so.2" --library-path "$work/glibc:$work/lib" "$work/bin/patchelf" \
      --set-interpreter "$work/glibc/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$work/glibc" \
      --add-needed libpthread.so.0 --add-needed libdl.so.2 --add-needed librt.so.1 "$work/bin/$exe"
  done
  ours 60 "$work/bin/cuda_test" --gtest_list_tests > "$OUT/tests-list.txt"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$OUT/nvidia-smi.txt" || true

echo "== tests (one process each, so that a test that aborts leaves the others' results;" \
     "$TEST_JOBS at a time: their jobs are small next to the GPU)"
set +e
mkdir -p "$work/tests"
# The kernel tests (the parameterized attention shapes among them, which gtest lists
# last) before the tests that start llama-train, so that a budget spent on slow ones
# leaves the quick ones run.
awk '/^[^ ]/ {suite=$1} /^  / {print suite $1}' "$OUT/tests-list.txt" > "$work/tests-listed.txt"
{ grep '^Shapes/' "$work/tests-listed.txt"; grep -v '^Shapes/' "$work/tests-listed.txt"; } > "$work/tests.txt"
: > "$OUT/tests-not-run.txt"
tests_start=$SECONDS
run_test() {  # run_test TEST: the test in a process of its own, its output in a log of its own
  local test=$1 name=${1//\//_}
  # OpenMP threads sleep while they wait, as under ctest: tests run side by side, and
  # spinning threads would take the cores the others' CPU work needs.
  # NCCL_DEBUG=WARN: NCCL's own reason for a failure lands in the test's log.
  ours 90 OMP_WAIT_POLICY=PASSIVE NCCL_DEBUG=WARN "$work/bin/cuda_test" --gtest_filter="$test" --gtest_output="json:$work/tests/$name.json" \
    > "$work/tests/$name.log" 2>&1 < /dev/null
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "FAILED $test (exit $rc)"
    tail -n 15 "$work/tests/$name.log"
    # Bad memory accesses and races, where the machine's runtime lets the sanitizer in;
    # not after a timeout (exit 124), which a slower rerun would only repeat.
    if [[ $rc -ne 124 ]] && command -v compute-sanitizer > /dev/null && (( SECONDS - tests_start < TEST_BUDGET )); then
      timeout 60 env LD_LIBRARY_PATH="$libs" compute-sanitizer --print-limit 5 "$work/bin/cuda_test" \
        --gtest_filter="$test" > "$work/tests/$name.sanitizer" 2>&1 < /dev/null
      grep -E "=========" "$work/tests/$name.sanitizer" | tail -n 12
    fi
  else
    echo "ok     $test"
  fi
}
running=0
while read -r test; do
  if (( SECONDS - tests_start >= TEST_BUDGET )); then
    echo "$test" >> "$OUT/tests-not-run.txt"
    echo "skip   $test (test budget of ${TEST_BUDGET}s spent)"
    continue
  fi
  run_test "$test" &
  if (( ++running >= TEST_JOBS )); then
    wait -n
    (( running-- ))
  fi
done < "$work/tests.txt"
wait
# The logs in the list's order.
while read -r test; do
  for f in "$work/tests/${test//\//_}".{log,sanitizer}; do
    [[ -f $f ]] && { echo "### $test"; cat "$f"; }
  done >> "$OUT/tests.log"
done < "$work/tests.txt"
python3 - "$work/tests" "$OUT/tests.json" <<'PY'
import glob, json, sys
merged = {"testsuites": []}
for f in sorted(glob.glob(sys.argv[1] + "/*.json")):
    try:
        merged["testsuites"] += json.load(open(f))["testsuites"]
    except Exception:
        pass
json.dump(merged, open(sys.argv[2], "w"), indent=1)
PY
expected=$(wc -l < "$work/tests.txt")
took "unpacking and tests"
echo "== llama-train on the CUDA backend (tiny preset, bf16, checkpoints at steps 100 and 200)"
ours 90 "$work/bin/llama-train" train --config configs/tiny.yaml -x bf16 --steps 200 \
  -i 100 -o "$work/runs" --log-format json > "$OUT/train-tiny.jsonl" 2> "$OUT/train-tiny.log"
echo "exit $?"; tail -n 3 "$OUT/train-tiny.log"
took "llama-train tiny"
echo "== llamad benchmark"
ours 200 "$work/bin/bench-gpu" --batch "$BATCH" --seq "$SEQ" --timeline --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
took "kernels and 1b step"
echo "== llamad 7B step on one GPU (batch 2 x seq 2048, activation checkpointing)"
ours 150 "$work/bin/bench-gpu" --model 7b --batch 2 --seq 2048 --grad-checkpoint --no-kernels \
  --steps 3 --json "$OUT/bench-7b.json" 2>&1 | tee "$OUT/bench-7b.log"
took "7b step"
echo "== llamad 7B step with the optimizer state in host memory (batch 8 x seq 2048, checkpointing)"
ours 240 "$work/bin/bench-gpu" --model 7b --batch 8 --seq 2048 --grad-checkpoint --no-kernels \
  --offload-optimizer-host --warmup 1 --steps 2 --timeline --json "$OUT/bench-7b-host.json" 2>&1 | tee "$OUT/bench-7b-host.log"
took "7b host-optimizer step"
if (( BF16_MOMENTS )); then
  echo "== the same with the host's AdamW moments in bf16 (offload.host_moments: bf16)"
  ours 150 "$work/bin/bench-gpu" --model 7b --batch 8 --seq 2048 --grad-checkpoint --no-kernels \
    --offload-optimizer-host --host-moments-bf16 --warmup 1 --steps 2 --json "$OUT/bench-7b-host-bf16.json" 2>&1 |
    tee "$OUT/bench-7b-host-bf16.log"
  took "7b host-optimizer step, bf16 moments"
fi
flops=$(python3 -c "import json; print(json.load(open('$OUT/bench.json'))['flops_per_token'])" 2>/dev/null)
peak=$(python3 -c "import json; print(json.load(open('$OUT/bench.json'))['peak_tflops'])" 2>/dev/null)
echo "== PyTorch (transformers.LlamaForCausalLM, bf16, AdamW) on the same card"
if [[ -n "$flops" ]]; then
  PYTHONUNBUFFERED=1 timeout 200 python3 "$work/torch_llama_step.py" --batch "$BATCH" --seq "$SEQ" \
    --flops-per-token "$flops" --peak-tflops "$peak" --json > "$OUT/torch.json" 2> "$OUT/torch.log"
  tail -n 3 "$OUT/torch.log"
fi
took "pytorch step"
set -e

python3 - "$OUT" "$expected" <<'EOF'
import json, os, sys
out, expected = sys.argv[1], int(sys.argv[2])
not_run = [l.strip() for l in open(os.path.join(out, "tests-not-run.txt")) if l.strip()]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception as e:
        return {"error": f"{name}: {e}"}
tests, bench, torch = load("tests.json"), load("bench.json"), load("torch.json")
bench7b, bench7b_host = load("bench-7b.json"), load("bench-7b-host.json")
# Run only with --bf16-moments (which leaves its log).
bench7b_host16 = load("bench-7b-host-bf16.json") if os.path.exists(os.path.join(out, "bench-7b-host-bf16.log")) else None
print()
print(f"GPU check on {bench.get('device', '?')}")
if tests.get("testsuites") or not_run:
    cases = [(f"{s['name']}.{t['name']}", t) for s in tests.get("testsuites", []) for t in s["testsuite"]]
    failed = [name for name, t in cases if t.get("failures")]
    skipped = [name for name, t in cases if t.get("result") == "SKIPPED"]
    passed = len(cases) - len(failed) - len(skipped)
    missing = expected - len(cases) - len(not_run)  # aborted or timed out: no report
    print(f"tests: {passed} passed, {len(failed)} failed, {len(skipped)} skipped, "
          f"{missing} crashed or timed out, {len(not_run)} not run (time budget) (of {expected})"
          + (f" (failed: {', '.join(failed)})" if failed else "")
          + (f" (not run: {', '.join(not_run)})" if not_run else ""))
    # A GPU test skips only where the machine lacks a part (NCCL, cuDNN, a second GPU):
    # name them, so that a skip is never read as a pass.
    if skipped:
        print(f"skipped: {', '.join(skipped[:12])}" + (f" and {len(skipped) - 12} more" if len(skipped) > 12 else ""))
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
for impl, why in bench.get("attention_unavailable", {}).items():
    print(f"attention {impl}: not measured ({why})")
ours = bench.get("step")
print(f"llamad's step runs attention on: {bench.get('step_attention', '?')}")
print(f"{'training step':22} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}")
rows = [("llamad", ours), ("pytorch", torch if "tokens_per_s" in torch else None),
        ("llamad 7b (ckpt, b2)", bench7b.get("step")),
        ("llamad 7b host-opt b8", bench7b_host.get("step"))]
if bench7b_host16 is not None:
    rows.append(("llamad 7b host bf16-m", bench7b_host16.get("step")))
for name, s in rows:
    if s:
        print(f"{name:22} {s['tokens_per_s']:10.0f} {s['tflops']:8.1f} {100 * s['mfu']:5.1f}% "
              f"{s.get('peak_mem_gib', 0):9.1f}")
    else:
        err = {"pytorch": torch, "llamad": bench, "llamad 7b host-opt b8": bench7b_host,
               "llamad 7b host bf16-m": bench7b_host16}.get(name, bench7b).get("error", "did not finish")
        print(f"{name:22} failed: {err}")
# The host-optimizer steps' CPU update (the optimizer's share of the step).
for name, b in (("f32", bench7b_host), ("bf16", bench7b_host16)):
    s = (b or {}).get("step")
    if s:
        print(f"7b host-opt b8, {name} moments: optimizer {s['optimizer_s']:.3f} of {s['step_s']:.3f} s per step")
# One more step of each, traced (bench-gpu --timeline): how much of it the GPU was busy, and
# its longest idle gap with the host phase and the operations around it.
for name, b in (("llamad", bench), ("llamad 7b host-opt b8", bench7b_host)):
    t = b.get("timeline")
    if not t:
        if b.get("timeline_error"):
            print(f"timeline {name}: not recorded ({b['timeline_error']})")
        continue
    line = (f"timeline {name}: GPU busy {1e3 * t['busy_s']:.1f} of {1e3 * t['wall_s']:.1f} ms "
            f"({100 * t['busy_s'] / max(t['wall_s'], 1e-12):.1f}%), {t['gaps_of_10us']} idle gaps of 10 us or more "
            f"({1e3 * t['gaps_of_10us_s']:.1f} ms)")
    if t["gaps"]:
        g = t["gaps"][0]
        line += f"; longest {1e3 * g['s']:.2f} ms in {g['phase']} ({g['after']} -> {g['before']})"
    if t.get("dropped"):
        line += f"; {t['dropped']} records dropped (busier than shown)"
    print(line)
try:
    parts = [l.strip().rsplit(" ", 1) for l in open(os.path.join(out, "times.txt")) if l.strip()]
    print("time: " + ", ".join(f"{name} {s} s" for name, s in parts) +
          f"; {sum(int(s) for _, s in parts)} s in all")
except Exception as e:
    print(f"time: not recorded ({e})")
if ours and "tokens_per_s" in torch:
    print(f"llamad / pytorch tokens/s: {ours['tokens_per_s'] / torch['tokens_per_s']:.2f}x "
          f"(model {ours['model']}, batch {ours['batch']} x seq {ours['seq']})")
EOF
