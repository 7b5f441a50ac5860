"""The embedded demo, end to end (minutes): accuracy, parity, and the README's runtime example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_demo_learns_the_task_and_backends_agree(demo_run):
    workdir, passed, lines = demo_run
    text = "\n".join(lines)
    accuracy = float(re.search(r"held-out exact match \(ONNX Runtime\): ([\d.]+)%", text)[1])
    assert accuracy >= 95.0, text
    same, total = map(int, re.search(r"greedy tokens identical, torch vs onnxruntime: "
                                     r"(\d+)/(\d+)", text).groups())
    assert total == 500 and same == total, text
    assert "parity PASS" in text
    assert re.search(r"exact_match: model [\d.]+ vs trivial baseline \(.+\) [\d.]+: better", text)
    assert passed, text
    assert (workdir / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_readme_runtime_example_runs_without_torch(demo_run, tmp_path):
    """The README's embedding example, run as written against the demo's bundle, in a process
    where importing torch is made impossible."""
    workdir, _, _ = demo_run
    blocks = _readme_python_blocks()
    assert blocks, "README.md has no python example"
    (tmp_path / "demo-run").symlink_to(workdir)
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2021-03-05" in result.stdout, result.stdout
