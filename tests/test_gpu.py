"""The torch backend on CUDA agrees with the CPU reference (runs in scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
from conftest import MODERN_FAMILIES, assert_decodes_like_onnxruntime

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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
def test_the_cuda_decode_step_on_a_static_cache_decodes_like_the_reference(tiny_bundle, backend):
    cpu = load(tiny_bundle, backend="onnxruntime")
    cuda = load(tiny_bundle, backend=backend)
    ids, mask = cpu.codec.encode(["March 5, 2021", "12/25/2003", "5th of May, 1999"])
    for settings in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 5},
                     {"max_new_tokens": 80, "min_new_tokens": 80}):  # the cache doubles
        assert (cpu.generate_ids(ids, mask, **settings) ==
                cuda.generate_ids(ids, mask, **settings)).all(), settings


@pytest.mark.gpu
def test_onnxruntime_cuda_keeps_the_caches_on_the_gpu(tiny_bundle):
    import onnxruntime as ort

    from ferry.runtime.backends.onnxruntime import OrtArray

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    cpu = load(tiny_bundle, backend="onnxruntime")
    cuda = load(tiny_bundle, backend="onnxruntime-cuda")
    ids, mask = cpu.codec.encode(["March 5, 2021", "12/25/2003"])
    encoded = cuda.graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    assert isinstance(encoded["cross_key_0"], OrtArray)
    assert encoded["cross_key_0"].value.device_name().lower() == "cuda"
    for settings in ({}, {"num_beams": 3}):
        assert (cpu.generate_ids(ids, mask, **settings) ==
                cuda.generate_ids(ids, mask, **settings)).all(), settings


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch-cuda", "torch-cuda-graphs"])
@pytest.mark.parametrize("family", list(MODERN_FAMILIES))
def test_modern_families_decode_on_cuda_like_the_reference(modern_bundle, family, backend):
    """Llama/Qwen3 (rotary, grouped-query, chunked prefill over left padding) and T5 (relative
    bias) on the CUDA static cache, eager and as CUDA graphs, generate what ONNX Runtime on the
    CPU generates."""
    assert_decodes_like_onnxruntime(modern_bundle(family), backend)
