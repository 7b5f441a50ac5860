"""Shared fixtures: a tiny trained checkpoint and its bundle (seconds), and the full demo run
(minutes, once per session)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ferry.export import export_bundle
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.dates import write_date_task

torch.set_num_threads(2)

# what ferry records per machine goes to a scratch directory, and loads take the fused graphs
# without timing both fp32 variants first (test_variant_choice measures)
if "FERRY_CACHE_DIR" not in os.environ:
    os.environ["FERRY_CACHE_DIR"] = tempfile.mkdtemp(prefix="ferry-cache-")
    atexit.register(shutil.rmtree, os.environ["FERRY_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("FERRY_CPU_VARIANT", "fused")


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


def exported(model, tokenizer, task: dict, directory: Path) -> Path:
    """`model` (random weights) and `tokenizer` saved as a checkpoint of `task` in
    `directory`, exported there (fp32): the bundle's path."""
    from ferry.model.checkpoint import save_checkpoint
    from ferry.train.tokenizer import save_tokenizer, special_token_ids

    checkpoint = save_checkpoint(model, directory / "checkpoint", {
        "special_ids": special_token_ids(tokenizer), "task": task})
    save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
    return export_bundle(checkpoint, directory / "bundle", log=lambda m: None)


@pytest.fixture(scope="session")
def task_bundles(tmp_path_factory):
    """Random-weight encoder-only bundles with a classification, tagging and QA head, by the
    command that uses them (classify, tag, answer). Read-only."""
    from ferry.model import Transformer, preset
    from ferry.train.datasets.text_corpus import docstring_paragraphs
    from ferry.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(docstring_paragraphs()[:200], vocab_size=300, num_sentinels=4)
    heads = {"classify": ("sequence_classification", "classification", ["neg", "pos"]),
             "tag": ("token_classification", "tagging", ["O", "B-X", "I-X"]),
             "answer": ("question_answering", "qa", [])}
    bundles = {}
    for endpoint, (head, kind, labels) in heads.items():
        config = preset("tiny", architecture="encoder-only", num_decoder_layers=0,
                        vocab_size=tokenizer.get_vocab_size(), task_head=head,
                        num_labels=len(labels), dropout=0.0)
        torch.manual_seed(0)
        bundles[endpoint] = exported(
            Transformer(config), tokenizer,
            {"kind": kind, "labels": labels, "pairs": False, "lm": False},
            tmp_path_factory.mktemp(endpoint))
    return bundles


# random-weight language models of the modern families, exported (fp32): fed to the backends
# whose decode paths have no oracle-model test of their own (the torch static cache, CUDA)
MODERN_FAMILIES = {
    "llama": ("llama_small", {"num_kv_heads": 2, "head_size": 16}),
    "qwen3": ("llama_small", {"num_kv_heads": 1, "head_size": 16, "qk_norm": True,
                              "attention_bias": "none"}),
    "t5": ("t5_small", {"head_size": 8}),
}


@pytest.fixture(scope="session")
def modern_bundle(tmp_path_factory):
    """`modern_bundle(family)`: the fp32 bundle of a random-weight model of one of
    `MODERN_FAMILIES` (2 layers, width 64, 128 positions; weights N(0, 0.2²) so that its
    tokens are not near-ties), made once per session. Read-only."""
    from ferry.model import Transformer, preset
    from ferry.train.datasets.text_corpus import docstring_paragraphs
    from ferry.train.tokenizer import train_tokenizer

    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family in made:
            return made[family]
        name, options = MODERN_FAMILIES[family]
        tokenizer = train_tokenizer(docstring_paragraphs()[:300], vocab_size=400,
                                    num_sentinels=4)
        config = preset(name, vocab_size=tokenizer.get_vocab_size(), d_model=64, num_heads=4,
                        d_ff=128, num_decoder_layers=2, dropout=0.0, max_positions=128,
                        **options)
        decoder_only = config.architecture == "decoder-only"
        config = preset(name, **{**config.to_dict(),
                                 "num_encoder_layers": 0 if decoder_only else 2})
        torch.manual_seed(0)
        model = Transformer(config)
        with torch.no_grad():
            for parameter_name, tensor in model.named_parameters():
                if parameter_name.endswith("norm.weight"):
                    tensor.copy_(1 + 0.2 * torch.randn_like(tensor))
                else:
                    tensor.copy_(0.2 * torch.randn_like(tensor))
        directory = tmp_path_factory.mktemp(f"modern-{family}")
        kind = "causal_lm" if decoder_only else "seq2seq"
        made[family] = exported(model, tokenizer, {"kind": kind, "lm": True}, directory)
        return made[family]

    return make


MODERN_PROMPTS = ["Returns the sum of two numbers.", "A",
                  "Load the checkpoint, then export every graph of it to a bundle directory."]


def generator(model):
    """A loaded bundle's `Generator` (a decoder-only LM loads as a `TaskModel` holding one)."""
    return model.as_generator() if hasattr(model, "as_generator") else model


def assert_decodes_like_onnxruntime(bundle: Path, backend: str, **options) -> None:
    """`backend` generates what the bundle's portable ONNX graphs on the CPU generate: greedy
    and beam search with prompts prefilled in 3-position chunks (decoder-only), sampling with a
    seed, and 80 forced tokens (a static cache doubles on the way)."""
    import ferry.runtime.decoding_state as decoding_state
    from ferry.runtime import load

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decoding_state, "PREFILL_CHUNK", 3)
        reference, candidate = (generator(load(bundle, name, **kwargs)) for name, kwargs in
                                (("onnxruntime:fp32", {}), (backend, options)))
        ids, mask = reference.codec.encode(MODERN_PROMPTS)
        for settings in ({"max_new_tokens": 12}, {"max_new_tokens": 12, "num_beams": 3},
                         {"max_new_tokens": 12, "do_sample": True, "seed": 5},
                         {"max_new_tokens": 80, "min_new_tokens": 80}):
            expected = reference.generate_ids(ids, mask, **settings)
            got = candidate.generate_ids(ids, mask, **settings)
            assert expected.shape == got.shape and (expected == got).all(), (backend, settings)


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
