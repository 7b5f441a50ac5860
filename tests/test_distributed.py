"""Data parallelism on PyTorch's own engine: `torchrun --nproc_per_node 2` on the CPU (gloo),
replicated (DDP) or sharded (FSDP), follows the single-process loss curve at the same global
batch; only rank 0 writes; an FSDP run resumed from its halfway checkpoint ends bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config


def _config(date_data: Path, run_dir: Path, **top_level) -> dict:
    config = tiny_train_config(date_data, run_dir, max_steps=24, batch_size=32,
                               grad_accum_steps=2)
    config["eval"].update(every=24, max_examples=40)
    config["log"] = {"every": 4}
    config["threads"] = 1
    config["checkpoint"] = {"every": 12, "keep_last": 3}
    return {**config, **top_level}


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


@pytest.fixture(scope="module")
def runs(date_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    results = {}
    single = [sys.executable, "-m", "ferry"]
    two_ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "2", "-m", "ferry"]
    halfway = ["--resume", str(root / "fsdp" / "checkpoints" / "step-00000012")]
    for name, launcher, settings, extra in (
        ("single", single, {}, []),
        ("ddp", two_ranks, {}, []),
        ("fsdp", two_ranks, {"parallel": "fsdp"}, []),
        ("fsdp_resumed", two_ranks, {"parallel": "fsdp"}, halfway),
    ):
        config_path = root / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(_config(date_data, root / name, **settings)))
        done = subprocess.run([*launcher, "train", "finetune", "--config", str(config_path),
                               *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = (root / name, done)
    return results


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_follow_the_single_process_loss_curve(runs, strategy):
    single, ranks = _losses(runs["single"][0]), _losses(runs[strategy][0])
    assert [s for s, _ in single] == [s for s, _ in ranks] and len(single) == 6
    for (step, a), (_, b) in zip(single, ranks):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: single {a:.6f} vs 2 ranks {b:.6f}"
    assert single[-1][1] < single[0][1]


def test_fsdp_checkpoints_hold_full_weights_and_resume_exactly(runs):
    from safetensors.torch import load_file

    def weights(name: str) -> dict:
        return load_file(str(runs[name][0] / "checkpoint" / "model.safetensors"))

    single, sharded, resumed = weights("single"), weights("fsdp"), weights("fsdp_resumed")
    assert set(sharded) == set(single)  # full (gathered) weights, the single-process layout
    assert all(sharded[k].shape == single[k].shape for k in single)
    assert all(torch.equal(sharded[k], resumed[k]) for k in sharded)  # bit-identical resume
    assert "resuming from" in runs["fsdp_resumed"][1].stdout + runs["fsdp_resumed"][1].stderr
    eval_loss = [json.loads(line) for line in (runs["fsdp"][0] / "metrics.jsonl").read_text()
                 .splitlines() if "eval_loss" in line]
    assert eval_loss, "rank 0 evaluated the gathered model"


def test_only_rank_zero_writes_and_reports(runs):
    run_dir, done = runs["ddp"]
    assert done.stdout.count("done in") == 1
    assert (run_dir / "checkpoint" / "model.safetensors").is_file()
    assert len(list((run_dir / "checkpoints").iterdir())) == 2  # steps 12 and 24
    assert "2 × cpu" in done.stdout + done.stderr


def test_unknown_strategy_and_fsdp_with_fp16_are_refused_by_name():
    from ferry.errors import FerryError
    from ferry.train.sharding import check_strategy

    with pytest.raises(FerryError, match=r"parallel must be one of \['ddp', 'fsdp'\]"):
        check_strategy("zero3", "fp32")
    with pytest.raises(FerryError, match="precision=bf16"):
        check_strategy("fsdp", "fp16")
    check_strategy("fsdp", "bf16")
