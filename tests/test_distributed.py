"""Data parallelism on PyTorch's own engine: `torchrun --nproc_per_node 2` on the CPU (gloo)
follows the single-process loss curve at the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_train_config


def _config(date_data: Path, run_dir: Path) -> dict:
    config = tiny_train_config(date_data, run_dir, max_steps=40, batch_size=32,
                               grad_accum_steps=2)
    config["eval"].update(every=40, max_examples=40)
    config["log"] = {"every": 5}
    config["threads"] = 1
    return config


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


@pytest.fixture(scope="module")
def runs(date_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    results = {}
    for name, launcher in (
        ("single", [sys.executable, "-m", "ferry"]),
        ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "ferry"]),
    ):
        config_path = root / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(_config(date_data, root / name)))
        done = subprocess.run([*launcher, "train", "finetune", "--config", str(config_path)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = (root / name, done)
    return results


def test_two_ranks_follow_the_single_process_loss_curve(runs):
    single, ddp = _losses(runs["single"][0]), _losses(runs["ddp"][0])
    assert [s for s, _ in single] == [s for s, _ in ddp] and len(single) == 8
    for (step, a), (_, b) in zip(single, ddp):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: single {a:.6f} vs 2 ranks {b:.6f}"
    assert single[-1][1] < single[0][1]


def test_only_rank_zero_writes_and_reports(runs):
    run_dir, done = runs["ddp"]
    assert done.stdout.count("done in") == 1
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    assert len(list((run_dir / "checkpoints").iterdir())) == 1
    assert "2 × cpu" in done.stdout + done.stderr
