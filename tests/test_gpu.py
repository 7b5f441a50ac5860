"""The torch backend on CUDA agrees with the CPU reference (runs in scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest

from ferry.runtime import load
from ferry.runtime.parity import FP32_ATOL, FeedSizes, compare_graphs, graph_feeds


@pytest.mark.gpu
def test_torch_cuda_matches_onnxruntime_cpu(tiny_bundle, date_data):
    cpu = load(tiny_bundle, backend="onnxruntime")
    cuda = load(tiny_bundle, backend="torch", device="cuda")
    feeds = graph_feeds(cpu.graphs, sizes=FeedSizes(batch=4, src_len=19, tgt_len=5, past_len=7),
                        vocab_size=cpu.bundle.model_config["vocab_size"], pad=cpu.special.pad,
                        seed=11)
    diffs = compare_graphs(cpu.graphs, cuda.graphs, feeds, FP32_ATOL)
    worst = max(diffs, key=lambda d: d.max_abs)
    assert all(d.passed for d in diffs), f"{worst.graph}/{worst.output}: {worst.max_abs:.2e}"
    sources = ["March 5, 2021", "12/25/2003", "5th of May, 1999"]
    ids, mask = cpu.codec.encode(sources)
    assert (cpu.generate_ids(ids, mask) == cuda.generate_ids(ids, mask)).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "compile_model"), [("bf16", True), ("fp16", False)])
def test_mixed_precision_training_on_gpu(date_data, tmp_path, precision, compile_model):
    from conftest import tiny_train_config

    from ferry.train import train
    from ferry.train.config import train_config_from_dict

    config = tiny_train_config(date_data, tmp_path / "run", max_steps=60)
    config.update(device="cuda", precision=precision, compile=compile_model)
    config["log"] = {"every": 10, "peak_tflops": 0.0}
    config["eval"].update(every=60, max_examples=40)
    result = train(train_config_from_dict(config), progress=False, log=lambda message: None)
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert all(loss == loss for loss in losses) and losses[-1] < 0.7 * losses[0]
    assert (result.checkpoint / "model.safetensors").is_file()
