"""The training loop's scale features on the CPU: gradient accumulation, bf16 autocast, NaN stop,
early stopping, MFU reporting, checkpoint retention, and `ferry plot`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_train_config

from ferry.cli import main
from ferry.errors import FerryError
from ferry.train import train
from ferry.train.checkpointing import verify_checkpoint
from ferry.train.config import train_config_from_dict
from ferry.train.objectives import Seq2SeqObjective


def quiet(message: str) -> None:
    pass


def run(date_data: Path, out: Path, *, optim: dict | None = None, **top) -> object:
    config = tiny_train_config(date_data, out, **(optim or {}))
    sections = {k: top.pop(k) for k in ("eval", "log", "checkpoint") if k in top}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    config.update(top)
    return train(train_config_from_dict(config), progress=False, log=quiet)


def train_losses(result) -> list[float]:
    return [r["train_loss"] for r in result.history if "train_loss" in r]


def test_gradient_accumulation_matches_the_full_batch(date_data, tmp_path):
    common = {"max_steps": 30, "batch_size": 32}
    log = {"every": 5}
    full = run(date_data, tmp_path / "full", optim=common, log=log, eval={"every": 30})
    accumulated = run(date_data, tmp_path / "accum", optim={**common, "grad_accum_steps": 4},
                      log=log, eval={"every": 30})
    for a, b in zip(train_losses(full), train_losses(accumulated), strict=True):
        assert abs(a - b) <= 1e-4 * a, (a, b)


def test_bf16_autocast_trains_on_cpu(date_data, tmp_path):
    result = run(date_data, tmp_path / "bf16", optim={"max_steps": 60}, precision="bf16",
                 log={"every": 10}, eval={"every": 60})
    losses = train_losses(result)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.7 * losses[0]
    assert "bf16" in (result.run_dir / "config.yaml").read_text()


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(date_data, tmp_path,
                                                                monkeypatch):
    real = Seq2SeqObjective.loss_sum
    calls = {"n": 0}

    def failing_after_twelve_steps(self, model, batch):
        calls["n"] += 1
        loss = real(self, model, batch)
        return loss * math.nan if calls["n"] > 12 else loss

    monkeypatch.setattr(Seq2SeqObjective, "loss_sum", failing_after_twelve_steps)
    with pytest.raises(FerryError, match="loss became nan at step 13"):
        run(date_data, tmp_path / "nan", optim={"max_steps": 40},
            checkpoint={"every": 5}, eval={"every": 40})
    checkpoints = sorted((tmp_path / "nan" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000005", "step-00000010"]
    verify_checkpoint(tmp_path / "nan" / "checkpoint")


def test_early_stopping_when_the_metric_stops_improving(date_data, tmp_path):
    result = run(date_data, tmp_path / "early", optim={"max_steps": 100, "lr": 1e-9},
                 eval={"every": 10, "patience": 2, "max_examples": 20})
    assert result.stopped_early
    evals = [r for r in result.history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]


def test_mfu_is_reported_against_a_given_peak(date_data, tmp_path):
    result = run(date_data, tmp_path / "mfu", optim={"max_steps": 20},
                 log={"every": 10, "peak_tflops": 1.0}, eval={"every": 20})
    logged = [r for r in result.history if "train_loss" in r]
    assert len(logged) == 2 and all(0 < r["mfu"] < 1 for r in logged)
    assert all(r["tokens_per_s"] > 0 for r in logged)


def test_only_the_last_checkpoints_are_kept_and_nothing_temporary_is_left(date_data, tmp_path):
    result = run(date_data, tmp_path / "keep", optim={"max_steps": 50},
                 checkpoint={"every": 10, "keep_last": 2}, eval={"every": 25})
    kept = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert kept == ["step-00000040", "step-00000050"]
    assert result.checkpoint.resolve() == result.run_dir / "checkpoints" / "step-00000050"
    assert (result.best_checkpoint / "model.safetensors").is_file()
    leftovers = [p.name for p in result.run_dir.rglob(".*")]
    assert leftovers == []


def test_configuration_errors_are_clear(date_data, tmp_path):
    with pytest.raises(FerryError, match="fp16 needs a CUDA GPU"):
        run(date_data, tmp_path / "a", precision="fp16")
    with pytest.raises(FerryError, match="multiple of ranks × grad_accum_steps"):
        run(date_data, tmp_path / "b", optim={"batch_size": 30, "grad_accum_steps": 4})
    with pytest.raises(FerryError, match="precision must be one of"):
        run(date_data, tmp_path / "c", precision="int4")


def test_ferry_plot_redraws_the_loss_curve(tiny_run, tmp_path):
    plot = tiny_run.run_dir / "loss.png"
    plot.unlink()
    result = CliRunner().invoke(main, ["plot", str(tiny_run.run_dir)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert missing.exit_code == 2 and "metrics.jsonl" in missing.output


def test_tensorboard_scalars_mirror_metrics_jsonl(date_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run(date_data, tmp_path / "tb", optim={"max_steps": 20},
                 log={"every": 10, "tensorboard": True}, eval={"every": 20})
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/train_loss")]
    expected = [(r["step"], r["train_loss"]) for r in result.history if "train_loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in expected] == [10, 20]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(losses, expected))
    assert "eval/loss" in events.Tags()["scalars"]
