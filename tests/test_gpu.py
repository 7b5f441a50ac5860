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
