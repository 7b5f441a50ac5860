"""Stop a run any way at all and continue it: SIGKILL at a random step, `--resume auto`, and the
final weights are bit-identical to an uninterrupted run's (CPU, deterministic settings)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config
from safetensors.torch import load_file

from ferry.errors import FerryError
from ferry.train import train
from ferry.train.checkpointing import CheckpointManager
from ferry.train.config import train_config_from_dict

MAX_STEPS = 100


def resumable_config(date_data: Path, out_dir: Path) -> dict:
    config = tiny_train_config(date_data, out_dir, max_steps=MAX_STEPS)
    config["model"]["overrides"] = {"dropout": 0.1}  # the torch RNG matters across the resume
    config.update(deterministic=True, threads=1)
    config["eval"].update(every=50, max_examples=40)
    config["checkpoint"] = {"every": 10, "keep_last": 2}
    config["log"] = {"every": 10}  # log windows aligned with checkpoints: identical records
    return config


def _train_command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ferry", "train", "finetune", "--config", str(config_path),
            *extra]


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(date_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    config = tmp_path_factory.mktemp("configs") / "run.yaml"
    config.write_text(yaml.safe_dump(resumable_config(date_data, run_dir)))
    subprocess.run(_train_command(config), check=True, capture_output=True, timeout=600)
    return run_dir


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(uninterrupted, date_data,
                                                               tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(resumable_config(date_data, run_dir)))
    checkpoints = CheckpointManager(run_dir, keep_last=2)
    kill_after = random.Random(os.getpid()).randrange(10, MAX_STEPS - 30, 10)  # 30+ steps left
    process = subprocess.Popen(_train_command(config), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoints.step_dir(kill_after).exists():
            time.sleep(random.Random(kill_after).uniform(0.0, 0.05))  # lands mid-step
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = checkpoints.latest_intact(warn=lambda message: None)
    assert latest is not None and latest.name < checkpoints.step_dir(MAX_STEPS).name

    resumed = subprocess.run(_train_command(config, "--resume", "auto"), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr

    expected, got = _final_weights(uninterrupted), _final_weights(run_dir)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    assert _records(run_dir) == _records(uninterrupted)


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock throughput fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
            for line in lines]


def test_resume_auto_skips_a_torn_checkpoint(uninterrupted, tmp_path):
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run", symlinks=True))
    torn = run_dir / "checkpoints" / "step-99999999"
    shutil.copytree(run_dir / "checkpoint", torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    warnings: list[str] = []
    manager = CheckpointManager(run_dir, keep_last=2)
    assert manager.latest_intact(warn=warnings.append) == manager.step_dir(MAX_STEPS)
    assert len(warnings) == 1 and "step-99999999" in warnings[0]


def test_resume_of_a_finished_run_changes_nothing(uninterrupted, date_data, tmp_path):
    run_dir = Path(shutil.copytree(uninterrupted, tmp_path / "run", symlinks=True))
    before = _final_weights(run_dir)
    config = train_config_from_dict(resumable_config(date_data, run_dir))
    result = train(config, progress=False, log=lambda message: None, resume="auto")
    assert result.resumed_from == run_dir / "checkpoints" / f"step-{MAX_STEPS:08d}"
    after = _final_weights(run_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_from_a_path_that_is_not_a_checkpoint_is_refused(date_data, tmp_path):
    config = train_config_from_dict(resumable_config(date_data, tmp_path / "run"))
    with pytest.raises(FerryError, match="no such checkpoint"):
        train(config, progress=False, log=lambda message: None, resume=str(tmp_path / "nope"))
