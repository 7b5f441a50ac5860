"""The runtime half of the CLI (`generate`, `verify`, `inspect`) works where torch cannot be
imported at all, as on a deployment machine with only the base install."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _run_blocking_torch(tmp_path, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    return subprocess.run([sys.executable, "-m", "ferry", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_verify_generate_inspect_run_without_torch(tiny_bundle, tmp_path):
    verified = _run_blocking_torch(tmp_path, "verify", str(tiny_bundle), "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["passed"] and report["candidate"] == "onnxruntime"
    assert max(o["max_abs"] for o in report["outputs"]) <= 1e-4

    generated = _run_blocking_torch(tmp_path, "generate", str(tiny_bundle), "March 5, 2021",
                                    "--json")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)[0]["input"] == "March 5, 2021"

    inspected = _run_blocking_torch(tmp_path, "inspect", str(tiny_bundle))
    assert inspected.returncode == 0, inspected.stderr
    assert "decoder_step" in inspected.stdout


def test_torch_backend_without_torch_is_one_clear_error(tiny_bundle, tmp_path):
    result = _run_blocking_torch(tmp_path, "generate", str(tiny_bundle), "x", "--backend",
                                 "torch")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
