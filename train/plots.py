"""PNG plots of a run's curves (training / eval loss, learning rate)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(history: list[dict], path: str | Path, *, train_label: str = "train loss"
                  ) -> Path:
    """Loss curves on the left axis, learning rate on the right, written to `path`."""
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
