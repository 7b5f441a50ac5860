"""PNG plots of a run's curves (training / eval loss, learning rate)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import yaml

from ferry.errors import FerryError

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: list[dict], path: str | Path, *, label_smoothing: float = 0.0
                  ) -> Path:
    """Loss curves on the left axis, learning rate on the right, written to `path`."""
    train_label = (f"train loss (label smoothing {label_smoothing})" if label_smoothing
                   else "train loss")
    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label=train_label)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in history if "lr" in r]
    if lrs:
        lr_axis = ax.twinx()
        lr_axis.plot(*zip(*lrs), color="gray", alpha=0.5, linestyle="--")
        lr_axis.set_ylabel("learning rate (dashed)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> Path:
    """Redraw `run_dir/loss.png` from the run's metrics.jsonl and config.yaml."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FerryError(f"{run_dir} has no metrics.jsonl; pass a run directory of `ferry train`")
    history = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FerryError(f"{metrics}:{number}: invalid JSON ({exc.msg})") from exc
        plotted = {k: record.get(k) for k in ("step", "train_loss", "eval_loss", "lr")
                   if isinstance(record, dict) and k in record}
        if not isinstance(record, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in plotted.values()
        ) or "step" not in plotted:
            raise FerryError(f"{metrics}:{number}: expected an object with a numeric step (and "
                             f"numeric train_loss / eval_loss / lr), got {line[:60]!r}")
        history.append(record)
    config_path = run_dir / "config.yaml"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    except yaml.YAMLError as exc:
        raise FerryError(f"{config_path} is not valid YAML ({exc})".splitlines()[0]) from exc
    optim = config.get("optim") if isinstance(config, dict) else None
    smoothing = optim.get("label_smoothing", 0.0) if isinstance(optim, dict) else 0.0
    if not isinstance(smoothing, int | float):
        smoothing = 0.0
    return plot_training(history, run_dir / "loss.png", label_smoothing=smoothing)
