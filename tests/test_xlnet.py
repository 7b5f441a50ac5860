"""XLNet's ideas as options of the one config — Transformer-XL relative attention, segment
recurrence, two-stream permutation language modelling — trained by ferry: the position shift and
the factorisation orders do what the paper says, a classifier learns, exports, reads inputs
longer than one segment through its memory on every backend, and publishes as an XLNet that
`transformers` computes the same, segment by segment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers

from ferry.export import export_bundle
from ferry.export.hf_export import export_hf
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.model import Transformer, load_checkpoint, preset
from ferry.model.relative_attention import relative_sinusoids, shifted_to_keys
from ferry.runtime import Bundle, load
from ferry.runtime.bisect import bisect
from ferry.runtime.explain import attention_maps
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.corruption import factorisation_order
from ferry.train.datasets.task_data import write_task_data

XLNET = {"positional": "relative_xl", "attention_bias": "none", "embedding_scale": "none",
         "activation": "gelu", "lm_head_bias": True}
SEGMENT = 32  # the classifier's max_positions: longer inputs are read segment by segment
TEXTS = ["We met on 3 July 1999.", "Snow fell on 2 January 2004.", "Leaves on October 9th"]
LONG = " ".join(["The harvest came in late that year, long after the first frost."] * 5
                + [TEXTS[1]])


def quiet(message: str) -> None:
    pass


def test_the_position_term_puts_each_distance_under_its_key():
    T, K, width = 3, 7, 8  # 4 memory positions, then 3 queries
    scores = torch.randn(2, 3, T, K + T)  # (B, nh, T, K+T): each query against each distance
    shifted = shifted_to_keys(scores, K)  # (B, nh, T, K)
    encodings = relative_sinusoids(T, K, width)  # row p: distance K − p
    direct = relative_sinusoids(1, 1, width)  # rows: distances 1, 0
    for i in range(T):
        for j in range(K):
            column = T - i + j
            assert torch.equal(shifted[:, :, i, j], scores[:, :, i, column])
            distance = (K - T + i) - j  # the query's position (after the memory) minus the key's
            assert K - column == distance
    assert torch.allclose(encodings[K - 1], direct[0]) and torch.allclose(encodings[K], direct[1])
    clamped = relative_sinusoids(T, K, width, clamp=2)
    assert torch.equal(clamped[0], clamped[K - 2])  # distance 7 counts as 2


def test_factorisation_orders_predict_a_kth_and_hide_what_the_order_says():
    rng = np.random.default_rng(0)
    chosen = np.zeros(12)
    draws = 3000
    for draw in range(draws):
        length = 12 if draw % 2 == 0 else int(rng.integers(2, 40))
        visible, targets = factorisation_order(length, rng, partial_prediction=6)
        count = math.ceil(length / 6)
        assert targets.sum() == count
        context = ~targets
        # context tokens read the context as a whole, and no target
        assert (visible[context] == context).all()
        # each target sees the whole context, not itself, and the targets before it: the
        # targets seen form a chain 0, 1, …, count − 1 (one factorisation order)
        assert visible[targets][:, context].all()
        assert not visible[targets, np.flatnonzero(targets)].any()
        seen = visible[targets][:, targets].sum(axis=1)
        assert sorted(seen) == list(range(count))
        ranked = np.flatnonzero(targets)[np.argsort(seen)]
        for k, i in enumerate(ranked):
            assert set(np.flatnonzero(visible[i] & targets)) == set(ranked[:k])
        if length == 12:
            chosen += targets
    share = chosen / (draws // 2)  # every position is predicted a sixth of the time
    assert np.abs(share - 1 / 6).max() < 0.03, share


def test_the_query_stream_sees_only_what_the_order_shows():
    torch.manual_seed(0)
    config = preset("tiny", architecture="encoder-only", num_decoder_layers=0, vocab_size=50,
                    **XLNET)
    model = Transformer(config).eval()
    visible, targets = factorisation_order(10, np.random.default_rng(1), partial_prediction=3)
    order = torch.from_numpy(visible)[None]  # (1, T, T)
    ids = torch.randint(5, 50, (1, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model.permutation_logits(ids, mask, order)  # (1, T, V)
    for i in np.flatnonzero(targets):
        for j in range(10):
            changed = ids.clone()
            changed[0, j] = 5 + (ids[0, j] - 4) % 45  # another token
            with torch.no_grad():
                other = model.permutation_logits(changed, mask, order)
            moved = not torch.allclose(other[0, i], logits[0, i], atol=1e-6)
            assert moved == bool(visible[i, j]), (i, j)  # its own token included: hidden


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A seasons classifier with XLNet's options (pooling the last token, 32 states of memory),
    trained from scratch (120 steps)."""
    root = tmp_path_factory.mktemp("xlnet")
    write_task_data(root / "tasks", num_train=600, num_eval=60, seed=3)
    tasks = root / "tasks" / "seasons"
    config = {"seed": 0, "out_dir": str(root / "run"), "objective": "classification",
              "model": {"preset": "tiny", "overrides": {
                  "architecture": "encoder-only", "num_decoder_layers": 0, "dropout": 0.0,
                  "max_positions": SEGMENT, "memory_length": SEGMENT,
                  "pooled_position": "last", **XLNET}},
              "tokenizer": {"vocab_size": 400, "num_sentinels": 4},
              "data": {"train": str(tasks / "train.csv"), "eval": str(tasks / "eval.csv"),
                       "max_source_len": SEGMENT},
              "optim": {"max_steps": 120, "lr": 2e-3, "warmup_steps": 10, "batch_size": 16},
              "eval": {"every": 120, "batch_size": 32}, "log": {"every": 10}}
    return train(train_config_from_dict(config), progress=False, log=quiet)


def segment_logits(forward, ids: list[int]) -> torch.Tensor:
    """A classifier's logits for one long input read in SEGMENT-token segments, each after the
    memory `forward(segment ids, memory)` returned for the previous one."""
    memory, logits = None, None
    for start in range(0, len(ids), SEGMENT):
        logits, memory = forward(torch.tensor([ids[start:start + SEGMENT]]), memory)
    return logits


def test_an_xlnet_classifier_learns_exports_reads_long_inputs_and_publishes(classifier,
                                                                           tmp_path):
    history = [r["train_loss"] for r in classifier.history if "train_loss" in r]
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.2, history
    assert classifier.final_metrics["accuracy"] > 0.4  # 4 seasons: chance is 0.25
    bundle = export_bundle(classifier.checkpoint, tmp_path / "bundle",
                           precisions=("fp32", "int8"), log=quiet)
    head = Bundle.open(bundle).manifest.graphs["head"]
    assert {"memory", "memory_mask"} <= set(head.input_names)
    assert all(check.passed for check in check_bundle_for_tensorrt(Bundle.open(bundle), "fp32"))
    # the layers are probed and attention written out like any encoder's
    bisection = bisect(Bundle.open(bundle), "torch", "onnxruntime:fp32",
                       workdir=tmp_path / "bisect")
    assert bisection.passed, bisection.format_table()
    assert {f"probe.encoder.layer_{i}.ffn" for i in range(2)} <= {d.name for d in
                                                                  bisection.diffs}
    explained = attention_maps(Bundle.open(bundle), TEXTS[0], workdir=tmp_path / "explain")
    heads, queries, keys = explained.maps["encoder.layer_1.attention"].shape
    assert queries == keys == len(explained.source) and heads == 4
    assert np.allclose(explained.maps["encoder.layer_1.attention"].sum(-1), 1, atol=1e-5)
    models = {backend: load(bundle, backend)
              for backend in ("torch", "onnxruntime", "onnxruntime:int8")}
    tokenizer = models["torch"].tokenizer
    ids = tokenizer.encode(LONG).ids
    assert len(ids) > 3 * SEGMENT  # four segments
    results = {backend: model.classify([*TEXTS, LONG]) for backend, model in models.items()}
    reference = results["torch"]
    assert [r["label"] for r in results["onnxruntime"]] == [r["label"] for r in reference]
    assert np.allclose([r["score"] for r in results["onnxruntime"]],
                       [r["score"] for r in reference], atol=1e-5)
    assert [r["label"] for r in results["onnxruntime:int8"]] == [r["label"] for r in reference]
    # the long input is read as the model reads it: segment after segment, through its memory
    model = load_checkpoint(classifier.checkpoint)[0].eval()

    def ferry_segment(segment, memory):
        encoded = model.encode_segment(segment, torch.ones_like(segment),
                                       torch.zeros_like(segment), memory=memory)
        return model.head(encoded.states, torch.ones_like(segment)), encoded.memory

    with torch.no_grad():
        ours = segment_logits(ferry_segment, ids)
        alone = ferry_segment(torch.tensor([ids[3 * SEGMENT:]]), None)[0]
    assert not torch.allclose(ours, alone, atol=1e-3)  # the memory carries the earlier text
    names = models["torch"].labels
    probabilities = torch.softmax(ours[0], -1)
    assert np.allclose([reference[3]["scores"][n] for n in names], probabilities, atol=1e-5)
    # published as XLNet: transformers computes the same logits with its own memory (mems)
    out = export_hf(classifier.checkpoint, tmp_path / "hf", log=quiet)
    reloaded = transformers.XLNetForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.mem_len == SEGMENT

    def hf_segment(segment, mems):
        output = reloaded(input_ids=segment, token_type_ids=torch.zeros_like(segment),
                          mems=mems, use_mems=True)
        return output.logits, output.mems

    with torch.no_grad():
        theirs = segment_logits(hf_segment, ids)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours, theirs)
