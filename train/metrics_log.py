"""A run's metrics: `metrics.jsonl` always, TensorBoard scalars when asked for (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes


class MetricsLog:
    """Appends one JSON object per record; a resumed run first drops records after its step.

    Args:
        run_dir: where metrics.jsonl (and tensorboard/) live.
        resume_step: the step a resumed run continues from; None starts a new log.
        tensorboard: also write every numeric field as a TensorBoard scalar.
    """

    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.history = read_history(self.path, up_to=resume_step) if resume_step else []
        atomic_write_bytes(self.path,
                           "".join(json.dumps(r) + "\n" for r in self.history).encode())
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise FerryError("log.tensorboard needs the tensorboard package: "
                                 "pip install 'ferry[tensorboard]'") from exc
            self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                        purge_step=resume_step or None)

    def write(self, record: dict) -> None:
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("eval_")
                                           else f"train/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_history(path: Path, up_to: int) -> list[dict]:
    """metrics.jsonl records up to step `up_to`."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("step", 0) <= up_to]
