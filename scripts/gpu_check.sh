#!/usr/bin/env bash
# Every GPU test and GPU benchmark in one call, for a machine with CUDA; prints a short table at
# the end. Installs ferry over the machine's own torch without fetching anything.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "warning: editable install failed; using the checkout as is"
export PYTHONPATH="${PYTHONPATH:-}"
out="$(mktemp -d)"

python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
PY

echo "== GPU tests (pytest -m 'gpu or tensorrt')"
python -m pytest -m "gpu or tensorrt" -q -rA -p no:cacheprovider > "$out/tests.txt" 2>&1
tests_rc=$?
tail -15 "$out/tests.txt"

echo "== training throughput: base preset, bf16, torch.compile, 128-token sequences"
python benchmarks/train_overhead.py --device cuda --preset base --precision bf16 --compile \
    --sequence-length 127 --batch-size 128 --steps 80 --warmup 30 --json > "$out/train.json"
bench_rc=$?

python - "$out" "$tests_rc" "$bench_rc" <<'PY'
import json, sys, pathlib
out, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print("\n== summary")
print(f"{'check':<44} {'result':>24}")
print(f"{'GPU tests':<44} {'pass' if tests_rc == 0 else f'FAIL (rc {tests_rc})':>24}")
if bench_rc == 0:
    r = json.loads((out / "train.json").read_text())
    print(f"{'ferry train tokens/s (base, bf16, compile)':<44} {r['ferry_tokens_per_s']:>24,.0f}")
    print(f"{'bare loop tokens/s':<44} {r['bare_tokens_per_s']:>24,.0f}")
    print(f"{'ferry / bare':<44} {r['ferry_over_bare']:>24.3f}")
    mfu = r.get("ferry_mfu")
    print(f"{'ferry MFU (target ≥ 45% on H200)':<44} {f'{100 * mfu:.1f}%' if mfu else 'n/a':>24}")
    print(f"{'machine':<44} {r['machine']:>24}")
else:
    print(f"{'training benchmark':<44} {f'FAIL (rc {bench_rc})':>24}")
PY
