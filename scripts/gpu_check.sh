#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one call, for a machine with CUDA; prints a short table at
# the end. Installs ferry over the machine's own torch without fetching anything. Each section has
# its own time limit (about 9 minutes in all, inside the 10 a device call may run), so the table
# is printed even when one section hangs. Its logs and results go to $OUT when that is set.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python="$(command -v python || command -v python3)"
export PATH="$(dirname "$python"):$PATH"  # the `ferry` command the install puts beside it
"$python" -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "warning: editable install failed; using the checkout as is"
export PYTHONPATH="${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
out="$(mktemp -d)"

"$python" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
PY

echo "== GPU tests (pytest -m 'gpu or tensorrt')"
timeout 230 "$python" -m pytest -m "gpu or tensorrt" -q -rA -p no:cacheprovider --durations=12 \
    > "$out/tests.txt" 2>&1
tests_rc=$?
tail -40 "$out/tests.txt"

echo "== training throughput: base preset, bf16, torch.compile, 128-token sequences"
timeout 80 "$python" benchmarks/train_overhead.py --device cuda --preset base --precision bf16 --compile \
    --sequence-length 127 --batch-size 128 --steps 80 --warmup 30 --json > "$out/train.json"
bench_rc=$?

echo "== backends on the GPU: the demo model (fp32 + fp16 graphs) on every backend that loads"
timeout 70 ferry demo --workdir "$out/demo" --steps 300 > "$out/log.txt" 2>&1
timeout 50 ferry export onnx "$out/demo/run/best" --out "$out/bundle" --precision fp32,fp16,bf16,fused \
    >> "$out/log.txt" 2>&1
if "$python" -c "import tensorrt" 2>/dev/null; then
    for precision in fp32 fp16; do
        timeout 45 ferry export tensorrt "$out/bundle" --precision "$precision" \
            --workspace-gib 8 >> "$out/engines.txt" 2>&1 \
            || echo "engine build ($precision) failed: $out/engines.txt"
    done
fi
echo "== ferry compare" >> "$out/log.txt"
timeout 60 ferry compare "$out/bundle" --json --plot "$out/compare.png" > "$out/compare.json" \
    2>> "$out/log.txt"
compare_rc=$?
backends=$("$python" - "$out/compare.json" <<'PY'
import json, sys
try:
    print(",".join(r["candidate"] for r in json.load(open(sys.argv[1]))["reports"]))
except ValueError:  # compare failed: its reason is in log.txt
    print("torch-cuda")
PY
)
timeout 40 ferry bench "$out/bundle" --backend "$backends" --batch 1,16 --new-tokens 32 --runs 3 --json \
    > "$out/bench.json" 2>> "$out/log.txt"
backend_bench_rc=$?
# CUDA graphs for the torch decode step (static cache, torch.compile "reduce-overhead"): its own
# call, as compiling takes a while and must not cost the table the other backends' figures
timeout 50 ferry bench "$out/bundle" --backend torch-cuda-graphs --batch 1,16 --new-tokens 32 \
    --runs 3 --json > "$out/bench_graphs.json" 2>> "$out/log.txt"

"$python" - "$out" "$tests_rc" "$bench_rc" "$compare_rc" "$backend_bench_rc" <<'PY'
import json, sys, pathlib
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
compare_rc, backend_bench_rc = int(sys.argv[4]), int(sys.argv[5])


def parsed(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None


print("\n== summary")
print(f"{'check':<44} {'result':>24}")
tail = (out / "tests.txt").read_text().strip().splitlines()[-1].strip("= ")
print(f"{'GPU tests':<44} {('' if tests_rc == 0 else 'FAIL: ') + tail:>24}")
if bench_rc == 0 and parsed("train.json"):
    r = parsed("train.json")
    print(f"{'ferry train tokens/s (base, bf16, compile)':<44} {r['ferry_tokens_per_s']:>24,.0f}")
    print(f"{'bare loop tokens/s':<44} {r['bare_tokens_per_s']:>24,.0f}")
    print(f"{'ferry / bare':<44} {r['ferry_over_bare']:>24.3f}")
    mfu = r.get("ferry_mfu")
    print(f"{'ferry MFU (target ≥ 45% on H200)':<44} {f'{100 * mfu:.1f}%' if mfu else 'n/a':>24}")
    print(f"{'machine':<44} {r['machine']:>24}")
else:
    print(f"{'training benchmark':<44} {f'FAIL (rc {bench_rc})':>24}")
report = parsed("compare.json")
if compare_rc in (0, 1) and report:
    for r in report["reports"]:
        worst = max(d["max_abs"] for d in r["outputs"])
        print(f"{'parity ' + r['candidate'] + ' vs ' + r['reference']:<44} "
              f"{('ok' if r['passed'] else 'FAIL') + f' max|Δ| {worst:.1e}':>24}")
    for name in report["skipped"]:
        print(f"{'parity ' + name:<44} {'skipped (not here)':>24}")
else:
    print(f"{'backend parity (ferry compare)':<44} {f'FAIL (rc {compare_rc}, log.txt)':>24}")
if backend_bench_rc == 0 and parsed("bench.json"):
    results = parsed("bench.json")["results"]
    if parsed("bench_graphs.json"):
        results += parsed("bench_graphs.json")["results"]
    else:
        print(f"{'tokens/s torch-cuda-graphs':<44} {'FAIL (see log.txt)':>24}")
    for r in results:
        print(f"{'tokens/s ' + r['backend'] + ' batch ' + str(r['batch']):<44} "
              f"{r['tokens_per_s']:>24,.0f}")
else:
    print(f"{'backend benchmark (ferry bench)':<44} {f'FAIL (rc {backend_bench_rc})':>24}")
print(f"(files in {out}: log.txt, compare.png, engines.txt, bench.json)")
PY
# a device call brings back what is under $OUT: the logs and results, not the bundles
if [ -n "${OUT:-}" ]; then
    for name in tests.txt train.json log.txt compare.json compare.png bench.json bench_graphs.json; do
        [ -f "$out/$name" ] && cp "$out/$name" "$OUT/"
    done
fi
