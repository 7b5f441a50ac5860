"""The runtime: torch-free import, backend selection, feed checks, input limits, batching,
text generation and verification against the bundle's golden outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ferry.runtime
from ferry.errors import FerryError
from ferry.runtime.backends.base import check_feed
from ferry.runtime.parity import (
    FP32_ATOL,
    FeedSizes,
    graph_feeds,
    load_golden,
    trim,
    verify_against_golden,
)

TEXTS = ["March 5, 2021", "5th of March, 2021", "12/25/1999"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ferry.runtime.load(tiny_bundle, backend="onnxruntime")


@pytest.fixture(scope="module")
def feeds(model, tiny_bundle):
    bundle = ferry.runtime.Bundle.open(tiny_bundle)
    return graph_feeds(model.graphs, sizes=FeedSizes(batch=2, src_len=7, tgt_len=3, past_len=4),
                       vocab_size=bundle.model_config["vocab_size"],
                       pad=bundle.special_ids["pad"], seed=5)


# ---------------------------------------------------------------- no torch


def test_runtime_does_not_import_torch(tiny_bundle):
    script = (
        "import sys, json\n"
        "import ferry.runtime\n"
        "assert 'torch' not in sys.modules, 'torch imported by ferry.runtime'\n"
        f"model = ferry.runtime.load({str(tiny_bundle)!r}, backend='onnxruntime')\n"
        "out = model.generate(['March 5, 2021', '1 May 1999'], max_new_tokens=16)\n"
        "print('OUTPUTS=' + json.dumps(out))\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH_LOADED=' + json.dumps(leaked))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert "OUTPUTS" in lines and "TORCH_LOADED" in lines, done.stdout
    outputs = json.loads(lines["OUTPUTS"])
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    assert json.loads(lines["TORCH_LOADED"]) == []


# ---------------------------------------------------------------- backend selection


def test_unknown_backend_lists_available(tiny_bundle):
    with pytest.raises(FerryError) as excinfo:
        ferry.runtime.load(tiny_bundle, backend="nope")
    message = str(excinfo.value)
    assert "nope" in message
    assert "onnxruntime" in message and "torch" in message


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_unknown_backend_option(backend, tiny_bundle):
    with pytest.raises(FerryError) as excinfo:
        ferry.runtime.load(tiny_bundle, backend=backend, bogus_option=1)
    assert "bogus_option" in str(excinfo.value)


def test_known_backend_option_is_accepted(tiny_bundle):
    loaded = ferry.runtime.load(tiny_bundle, backend="onnxruntime", intra_op_threads=1,
                                optimization="basic")
    assert loaded.backend == "onnxruntime"
    assert len(loaded.generate(TEXTS[:1], max_new_tokens=4)) == 1


@pytest.mark.parametrize("spinning", [True, False])
def test_onnxruntime_threads_spin_or_sleep_between_operators_as_asked(tiny_bundle, model,
                                                                     spinning):
    loaded = ferry.runtime.load(tiny_bundle, backend="onnxruntime", spinning=spinning)
    for graph in loaded.graphs.values():
        entry = graph.session.get_session_options().get_session_config_entry
        if spinning:
            with pytest.raises(RuntimeError):  # not set: ONNX Runtime's default (spinning)
                entry("session.intra_op.allow_spinning")
        else:
            assert entry("session.intra_op.allow_spinning") == "0"
            assert entry("session.inter_op.allow_spinning") == "0"
    assert loaded.generate(TEXTS, num_beams=2) == model.generate(TEXTS, num_beams=2)
    with pytest.raises(FerryError, match="spinning"):
        ferry.runtime.load(tiny_bundle, backend="onnxruntime", spinning="no")


# ---------------------------------------------------------------- feed checks


def test_valid_feeds_pass(model, feeds):
    for name, feed in feeds.items():
        check_feed(model.graphs[name].spec, feed)
        outputs = model.graphs[name].infer(feed)
        assert list(outputs) == model.graphs[name].spec.output_names


def _bad_feeds(feeds):
    encoder = feeds["encoder"]
    step = feeds["decoder_step"]
    ids = encoder["input_ids"]
    return {
        "missing-input": ("encoder", {"input_ids": ids}, "attention_mask"),
        "unexpected-input": ("encoder", {**encoder, "extra": ids}, "extra"),
        "wrong-dtype": ("encoder", {**encoder, "input_ids": ids.astype(np.int32)}, "int32"),
        "float-mask": ("encoder", {**encoder, "attention_mask":
                                   encoder["attention_mask"].astype(np.float32)},
                       "attention_mask"),
        "not-an-array": ("encoder", {**encoder, "input_ids": ids.tolist()}, "input_ids"),
        "wrong-rank": ("encoder", {**encoder, "input_ids": ids[None]}, "input_ids"),
        "inconsistent-src_len": ("encoder", {**encoder, "attention_mask":
                                             encoder["attention_mask"][:, :-1]}, "src_len"),
        "inconsistent-batch": ("decoder_step", {**step, "past_key_0": step["past_key_0"][:1]},
                               "batch"),
        "inconsistent-past_len": ("decoder_step", {**step, "past_value_1":
                                                   step["past_value_1"][:, :, :-1]},
                                  "past_len"),
        "fixed-dim": ("decoder_step", {**step, "input_ids":
                                       np.concatenate([step["input_ids"]] * 2, axis=1)},
                      "input_ids"),
    }


BAD_FEEDS = ["missing-input", "unexpected-input", "wrong-dtype", "float-mask", "not-an-array",
             "wrong-rank", "inconsistent-src_len", "inconsistent-batch", "inconsistent-past_len",
             "fixed-dim"]


@pytest.mark.parametrize("case", BAD_FEEDS)
def test_bad_feed_is_refused(case, model, feeds):
    graph, feed, named = _bad_feeds(feeds)[case]
    backend = model.graphs[graph]
    with pytest.raises(FerryError) as excinfo:
        check_feed(backend.spec, feed)
    assert named in str(excinfo.value)
    with pytest.raises(FerryError) as excinfo:
        backend.infer(feed)
    assert named in str(excinfo.value)


def test_torch_backend_checks_feeds_too(tiny_bundle, feeds):
    reference = ferry.runtime.load(tiny_bundle, backend="torch")
    graph, feed, named = _bad_feeds(feeds)["inconsistent-src_len"]
    with pytest.raises(FerryError, match=named):
        reference.graphs[graph].infer(feed)
    graph, feed, named = _bad_feeds(feeds)["wrong-dtype"]
    with pytest.raises(FerryError, match=named):
        reference.graphs[graph].infer(feed)


def test_dim_outside_declared_range_is_refused(model):
    spec = model.graphs["encoder"].spec
    too_long = spec.dims["src_len"].max + 1
    ids = np.full((1, too_long), 5, dtype=np.int64)
    with pytest.raises(FerryError, match=str(too_long)):
        model.graphs["encoder"].infer({"input_ids": ids, "attention_mask": np.ones_like(ids)})


# ---------------------------------------------------------------- input limits


def test_overlong_text_is_refused_with_its_length(model):
    max_positions = model.bundle.model_config["max_positions"]
    text = " ".join(["March 5, 2021"] * max_positions)
    length = len(model.codec.tokenizer.encode(text).ids)
    assert length > max_positions
    with pytest.raises(FerryError) as excinfo:
        model.generate(["May 1, 2000", text])
    message = str(excinfo.value)
    assert str(length) in message
    assert str(max_positions) in message


def test_overlong_ids_are_refused_with_their_length(model):
    max_positions = model.bundle.model_config["max_positions"]
    ids = np.full((2, max_positions + 3), 7, dtype=np.int64)
    with pytest.raises(FerryError) as excinfo:
        model.generate_ids(ids)
    assert str(max_positions + 3) in str(excinfo.value)


def test_ids_outside_the_vocabulary_are_refused_by_name(model):
    vocab = model.bundle.model_config["vocab_size"]
    for bad in (vocab, -1):
        ids = np.array([[5, 6, bad]], dtype=np.int64)
        with pytest.raises(FerryError, match=rf"input_ids must lie in \[0, {vocab}\)"):
            model.generate_ids(ids)


def test_input_of_exactly_max_positions_runs(model):
    max_positions = model.bundle.model_config["max_positions"]
    ids = np.full((2, max_positions), 7, dtype=np.int64)
    ids[1, max_positions // 2:] = model.special.pad
    out = model.generate_ids(ids, max_new_tokens=3)
    assert out.shape[0] == 2 and 1 <= out.shape[1] <= 3


def test_generate_ids_rejects_non_2d(model):
    with pytest.raises(FerryError):
        model.generate_ids(np.array([5, 6, 7], dtype=np.int64))


def test_empty_text_list_is_refused(model):
    with pytest.raises(FerryError):
        model.generate([])


# ---------------------------------------------------------------- batching and text


def test_batch_larger_than_graph_max_matches_per_row(model, date_data):
    max_batch = model.graphs["encoder"].spec.dims["batch"].max
    rows = [json.loads(line) for line in
            (date_data / "eval.jsonl").read_text(encoding="utf-8").splitlines() if line]
    sources = [rows[i % len(rows)]["source"] + ("" if i < len(rows) else " ")
               for i in range(300)]
    assert len(sources) > max_batch
    input_ids, mask = model.codec.encode(sources)
    batched = model.generate_ids(input_ids, mask, max_new_tokens=16)
    assert batched.shape[0] == 300
    pad = model.special.pad
    for i in (0, 1, max_batch - 1, max_batch, 299):
        single = model.generate_ids(input_ids[i : i + 1], mask[i : i + 1], max_new_tokens=16)
        assert np.array_equal(trim(batched[i], pad), trim(single[0], pad)), i
        assert (batched[i, single.shape[1]:] == pad).all(), i
    # the default mask (ids != pad) gives the same result as the explicit one
    assert np.array_equal(model.generate_ids(input_ids, max_new_tokens=16), batched)


def test_generate_returns_one_string_per_input(model):
    outputs = model.generate(TEXTS, max_new_tokens=16)
    assert isinstance(outputs, list) and len(outputs) == len(TEXTS)
    assert all(isinstance(o, str) for o in outputs)
    single = model.generate(TEXTS[0], max_new_tokens=16)
    assert single == outputs[:1]
    assert model.generate(TEXTS[::-1], max_new_tokens=16) == outputs[::-1]


def test_generate_matches_generate_ids(model):
    ids, mask = model.codec.encode(TEXTS)
    assert model.generate(TEXTS, max_new_tokens=16) == model.codec.decode(
        model.generate_ids(ids, mask, max_new_tokens=16))


def test_max_new_tokens_bounds_output(model):
    out = model.generate_ids(*model.codec.encode(TEXTS), max_new_tokens=2)
    assert out.shape[0] == len(TEXTS) and 1 <= out.shape[1] <= 2
    with pytest.raises(FerryError):
        model.generate_ids(*model.codec.encode(TEXTS), max_new_tokens=0)


# ---------------------------------------------------------------- golden


def test_onnxruntime_verifies_against_golden(model):
    golden = load_golden(model.bundle.file("golden"))
    report = verify_against_golden(model.graphs, golden, special=model.special,
                                   backend="onnxruntime")
    assert report.diffs, "no outputs compared"
    graphs = {d.graph for d in report.diffs}
    assert graphs == {"encoder", "decoder_init", "decoder_step"}
    assert all(d.max_abs <= FP32_ATOL for d in report.diffs), report.diffs
    assert report.sequences == len(golden["generation/output_ids"]) > 0
    assert report.identical_sequences == report.sequences
    assert report.passed
    assert report.to_dict()["passed"] is True


def test_golden_verification_detects_a_change(model):
    golden = load_golden(model.bundle.file("golden"))
    golden["encoder/out/encoder_hidden_states"] = golden["encoder/out/encoder_hidden_states"] + 0.01
    report = verify_against_golden(model.graphs, golden, special=model.special,
                                   backend="onnxruntime")
    assert not report.passed
    failed = [d for d in report.diffs if not d.passed]
    assert [(d.graph, d.output) for d in failed] == [("encoder", "encoder_hidden_states")]


# ---------------------------------------------------------------- threads


def test_one_model_shared_by_threads_matches_serial(model):
    from concurrent.futures import ThreadPoolExecutor

    requests = [TEXTS[i % len(TEXTS)] for i in range(4)] + ["1 May 1999", "Feb 3, 2025"]
    serial = [model.generate([text], max_new_tokens=16) for text in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda t: model.generate([t], max_new_tokens=16),
                                 requests * 4))
    assert threaded == serial * 4


def test_the_torch_backend_keeps_the_caches_on_its_device(tiny_bundle):
    from ferry.runtime.backends.torch import TorchArray

    model = ferry.runtime.load(tiny_bundle, backend="torch")
    ids, mask = model.codec.encode(["March 5, 2021", "12/25/2003"])
    encoded = model.graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    cross = encoded["cross_key_0"]
    assert isinstance(cross, TorchArray) and cross.dtype == np.float32
    assert isinstance(encoded["encoder_hidden_states"], np.ndarray)  # read by people, not fed
    host = np.asarray(cross)
    assert np.array_equal(np.asarray(np.repeat(cross, 3, axis=0)), np.repeat(host, 3, axis=0))
    assert np.array_equal(np.asarray(cross[np.array([1, 0])]), host[[1, 0]])
    reference = ferry.runtime.load(tiny_bundle, backend="onnxruntime")
    expected = reference.graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    assert np.abs(host - expected["cross_key_0"]).max() < 1e-4
    # fed straight back (no host copy) and accepted by the onnxruntime backend too
    assert model.generate_ids(ids, mask).tolist() == reference.generate_ids(ids, mask).tolist()


def test_io_bound_onnxruntime_keeps_the_caches_in_its_own_memory(tiny_bundle):
    from ferry.runtime.backends.onnxruntime import OrtArray

    bound = ferry.runtime.load(tiny_bundle, backend="onnxruntime", io_binding=True)
    plain = ferry.runtime.load(tiny_bundle, backend="onnxruntime")
    ids, mask = plain.codec.encode(["March 5, 2021", "12/25/2003"])
    feed = {"input_ids": ids, "attention_mask": mask}
    encoded, expected = bound.graphs["encoder"].infer(feed), plain.graphs["encoder"].infer(feed)
    cross = encoded["cross_key_0"]
    assert isinstance(cross, OrtArray) and cross.dtype == np.float32
    assert isinstance(encoded["encoder_hidden_states"], np.ndarray)  # read by people, not fed
    host = np.asarray(cross)
    assert np.array_equal(host, expected["cross_key_0"]) and cross.shape == host.shape
    assert np.array_equal(np.asarray(np.repeat(cross, 3, axis=0)), np.repeat(host, 3, axis=0))
    assert np.array_equal(np.asarray(cross[np.array([1, 0])]), host[[1, 0]])
    assert bound.generate_ids(ids, mask).tolist() == plain.generate_ids(ids, mask).tolist()


def test_the_static_cache_is_written_in_place_and_grows_when_full(tiny_bundle):
    from ferry.runtime.backends.base import MIN_CAPACITY
    from ferry.runtime.backends.torch import TorchCacheView

    static = ferry.runtime.load(tiny_bundle, backend="torch", static_cache=True)
    reference = ferry.runtime.load(tiny_bundle, backend="onnxruntime")
    ids, mask = reference.codec.encode(["March 5, 2021", "12/25/2003", "1 May 1999"])
    encoded = static.graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    start = np.full((3, 1), static.special.decoder_start, dtype=np.int64)
    first = static.graphs["decoder_init"].infer({"input_ids": start, "encoder_attention_mask": mask,
                                                 **{k: v for k, v in encoded.items()
                                                    if k.startswith("cross_")}})
    step_feed = {"input_ids": start, "attention_mask": np.ones((3, 2), np.int64),
                 "encoder_attention_mask": mask,
                 **{k: v for k, v in encoded.items() if k.startswith("cross_")},
                 **{k.replace("present_", "past_"): v for k, v in first.items()
                    if k.startswith("present_")}}
    stepped = static.graphs["decoder_step"].infer(step_feed)
    present = stepped["present_key_0"]
    assert isinstance(present, TorchCacheView) and present.shape[2] == 2
    assert present.buffer.shape[2] == MIN_CAPACITY  # room to grow in place
    again = static.graphs["decoder_step"].infer(
        {**step_feed, "attention_mask": np.ones((3, 3), np.int64),
         **{k.replace("present_", "past_"): v for k, v in stepped.items()
            if k.startswith("present_")}})
    assert again["present_key_0"].buffer is present.buffer  # the same buffer, written in place
    assert again["present_key_0"].shape[2] == 3
    # 80 forced tokens fill the first 64 positions: the cache doubles and decoding goes on
    long = {"max_new_tokens": 80, "min_new_tokens": 80}
    expected = reference.generate_output(ids, mask, **long)
    got = static.generate_output(ids, mask, **long)
    assert np.array_equal(expected.sequences, got.sequences)
    assert np.allclose(expected.token_scores, got.token_scores, atol=1e-4)
    with pytest.raises(FerryError, match="compile needs static_cache=True"):
        ferry.runtime.load(tiny_bundle, backend="torch", compile="default")


def test_the_compiled_static_step_traces_and_decodes_the_same(tiny_bundle, monkeypatch):
    # Dynamo traces the static-cache step (in-place buffer writes, position tensor) as the
    # inductor / CUDA-graph modes would; the eager compiler backend keeps the test fast.
    import torch

    compiled_modes = []
    compile_ = torch.compile

    def eager_compile(module, mode=None):
        compiled_modes.append(mode)
        return compile_(module, backend="eager", fullgraph=True)

    monkeypatch.setattr(torch, "compile", eager_compile)
    model = ferry.runtime.load(tiny_bundle, backend="torch", static_cache=True,
                               compile="reduce-overhead")
    reference = ferry.runtime.load(tiny_bundle, backend="onnxruntime")
    ids, mask = reference.codec.encode(["March 5, 2021", "12/25/2003", "1 May 1999"])
    for settings in ({}, {"num_beams": 3}):
        assert model.generate_ids(ids, mask, **settings).tolist() == \
            reference.generate_ids(ids, mask, **settings).tolist()
    assert compiled_modes == ["reduce-overhead"]
