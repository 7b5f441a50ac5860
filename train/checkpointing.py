"""Run checkpoints that survive any interruption, and exact resume.

    run_dir/checkpoints/step-00000800/   config.json, model.safetensors, tokenizer.json,
                                         train_state.pt (optimizer, scaler, RNGs, progress)
    run_dir/checkpoint -> checkpoints/step-00000800     the latest (a symlink, swapped atomically)
    run_dir/best/                                        a copy of the best by the eval metric

A checkpoint directory is written under a temporary name, fsynced, then renamed: a reader sees a
complete checkpoint or none. The last `keep_last` are kept. `latest_intact` skips (with a warning)
any checkpoint that cannot be read back. `train_state.pt` holds only tensors and plain Python
values and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ferry.errors import FerryError
from ferry.files import (
    atomic_write_bytes,
    recover_directory,
    staged_directory,
)
from ferry.model import Transformer, save_checkpoint
from ferry.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_checkpoint_config

STATE_FILE = "train_state.pt"
TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, STATE_FILE)


def capture_rng() -> dict:
    """Every random generator training touches: python, numpy, torch CPU and CUDA."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    """What a checkpoint restores beyond the model weights."""

    directory: Path
    step: int
    state: dict  # optimizer, scaler, rng, best, evals_without_improvement


class CheckpointManager:
    """Writes, prunes and finds the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, *, keep_last: int) -> None:
        self.run_dir = run_dir
        self.directory = run_dir / "checkpoints"
        self.keep_last = max(1, keep_last)

    @property
    def latest_link(self) -> Path:
        return self.run_dir / "checkpoint"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "best"

    def step_dir(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def recover(self) -> None:
        """Finish (or undo) what an interrupted run left mid-way: a swap of `best/` or of a step
        checkpoint, staging directories of dead processes, a half-made `checkpoint` link."""
        recover_directory(self.best_dir)
        if self.directory.is_dir():
            names = {p.name.split(".")[1] for p in self.directory.glob(".step-*.*")}
            for name in names:
                recover_directory(self.directory / name)
        (self.run_dir / ".checkpoint.link-tmp").unlink(missing_ok=True)

    def save(self, step: int, model: Transformer, *, metadata: dict, train_state: dict) -> Path:
        """Write the checkpoint of `step` atomically, point `checkpoint` at it, prune old ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.step_dir(step)
        with staged_directory(final) as staging:
            save_checkpoint(model, staging, metadata)
            atomic_write_bytes(staging / TOKENIZER_FILE,
                               (self.run_dir / TOKENIZER_FILE).read_bytes())
            buffer = io.BytesIO()
            torch.save(train_state, buffer)
            atomic_write_bytes(staging / STATE_FILE, buffer.getvalue())
        link_tmp = self.run_dir / ".checkpoint.link-tmp"
        link_tmp.unlink(missing_ok=True)
        link_tmp.symlink_to(final.relative_to(self.run_dir))
        os.replace(link_tmp, self.latest_link)
        self._prune()
        return final

    def save_best(self, step_dir: Path) -> Path:
        """Copy a saved checkpoint to `best/` (replacing the previous best recoverably: an
        interruption leaves the old or the new best, restored by `recover`)."""
        with staged_directory(self.best_dir) as staging:
            shutil.copytree(step_dir, staging, dirs_exist_ok=True)
        return self.best_dir

    def _prune(self) -> None:
        for old in self.completed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def completed(self) -> list[Path]:
        """Step directories in step order (temporary ones excluded)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("step-*") if p.is_dir())

    def latest_intact(self, warn: Callable[[str], None]) -> Path | None:
        """The newest checkpoint that reads back completely; torn ones are skipped with a
        warning naming them."""
        for candidate in reversed(self.completed()):
            try:
                verify_checkpoint(candidate)
                return candidate
            except FerryError as exc:
                warn(f"warning: skipping torn checkpoint {candidate}: {exc}")
        return None


def verify_checkpoint(directory: Path) -> None:
    """Raise FerryError unless every file of a run checkpoint is present and readable."""
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise FerryError(f"{directory} lacks {missing}")
    read_checkpoint_config(directory)
    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            for key in weights.keys():
                weights.get_slice(key)
    except Exception as exc:  # safetensors raises several untyped errors on torn files
        raise FerryError(f"{directory / WEIGHTS_FILE} is unreadable ({exc})") from exc
    load_train_state(directory)


def load_train_state(directory: Path) -> dict:
    try:
        return torch.load(directory / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch.load raises assorted errors on truncated files
        raise FerryError(f"{directory / STATE_FILE} is unreadable ({exc})") from exc
