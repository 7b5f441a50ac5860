"""Shared fixtures: a tiny trained checkpoint and its bundle (seconds), and the full demo run
(minutes, once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ferry.export import export_bundle
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.dates import write_date_task

torch.set_num_threads(2)


def tiny_train_config(data_dir: Path, out_dir: Path, **optim) -> dict:
    """A seq2seq run on the date task with the `tiny` preset: ~10 s on two cores."""
    return {
        "objective": "seq2seq",
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"preset": "tiny"},
        "tokenizer": {"vocab_size": 400, "num_sentinels": 8},
        "data": {"train": str(data_dir / "train.jsonl"), "eval": str(data_dir / "eval.jsonl"),
                 "max_source_len": 32, "max_target_len": 16},
        "optim": {"lr": 0.003, "warmup_steps": 20, "max_steps": 120, "batch_size": 32,
                  **optim},
        "eval": {"every": 60, "batch_size": 100, "max_new_tokens": 14},
    }


def pretraining_config(data_dir: Path, out_dir: Path, objective: str, *, max_steps: int,
                       model: dict) -> dict:
    """A pretraining run on the docstring corpus (`write_text_corpus(data_dir)`): `objective`
    for `max_steps` steps of 16 blocks of 48 tokens, evaluated once at the end."""
    config = tiny_train_config(data_dir, out_dir, max_steps=max_steps, batch_size=16, lr=0.004,
                               warmup_steps=10)
    config.update(objective=objective, model=model)
    config["tokenizer"] = {"vocab_size": 600, "num_sentinels": 32}
    config["data"].update(block_size=48)
    config["eval"] = {"every": max_steps, "batch_size": 32, "max_examples": 32}
    config["log"] = {"every": 10}
    return config


def flip_byte(path: Path) -> None:
    """Damage a file: invert the bits of its middle byte."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="session")
def date_data(tmp_path_factory) -> Path:
    """train.jsonl (3000 rows) and eval.jsonl (200 rows) of the date task."""
    directory = tmp_path_factory.mktemp("dates")
    write_date_task(directory, num_train=3000, num_eval=200, seed=1)
    return directory


@pytest.fixture(scope="session")
def tiny_run(date_data, tmp_path_factory):
    """A TrainResult of a short tiny-model seq2seq run (checkpoints under result.run_dir)."""
    out = tmp_path_factory.mktemp("tiny-run")
    config = train_config_from_dict(tiny_train_config(date_data, out))
    return train(config, progress=False, log=lambda message: None)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """The tiny run's latest checkpoint exported to a bundle. Read-only: copy before changing."""
    out = tmp_path_factory.mktemp("tiny-bundle") / "bundle"
    return export_bundle(tiny_run.checkpoint, out, log=lambda message: None)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The full `ferry demo` (minutes): (workdir, passed, log lines)."""
    from ferry.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    passed = run_demo(workdir, log=lines.append)
    return workdir, passed, lines


@pytest.fixture(scope="session")
def demo_variants_bundle(demo_run, tmp_path_factory) -> Path:
    """The demo's trained model (int8 needs a trained model to meet its gate) exported with its
    int8, fp16, bf16 and fused variants and, through a lowered threshold, every graph's weights
    in a side file: the path a > 2 GB model takes. Read-only: copy before changing."""
    import ferry.export.onnx_export as onnx_export

    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    try:
        out = tmp_path_factory.mktemp("variants") / "bundle"
        return export_bundle(demo_run[0] / "run" / "best", out,
                             precisions=("fp32", "int8", "fp16", "bf16", "fused"),
                             log=lambda m: None)
    finally:
        patch.undo()


def pytest_collection_modifyitems(config, items):
    """Skip GPU / TensorRT tests cleanly where those are absent."""
    import importlib.util

    has_cuda = torch.cuda.is_available()
    has_tensorrt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not has_tensorrt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT"))
