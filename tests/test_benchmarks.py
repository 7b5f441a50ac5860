"""The shipped benchmarks run and report what they claim (figures belong in issue notes, not
assertions: only sanity is checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_training_overhead_benchmark_reports_both_loops(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_overhead.py"), "--preset", "tiny", "--steps",
         "40", "--warmup", "10", "--batch-size", "16", "--peak-tflops", "1", "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ferry_tokens_per_s"] > 0 and report["bare_tokens_per_s"] > 0
    ratio = report["ferry_tokens_per_s"] / report["bare_tokens_per_s"]
    assert abs(report["ferry_over_bare"] - ratio) < 1e-9
    assert 0 < report["ferry_mfu"] < 1 and 0 < report["bare_mfu"] < 1
    assert report["timed_steps"] == 30 and "threads" in report["machine"]
