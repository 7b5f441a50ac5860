"""Self-supervised objectives on real text (the standard library's docstrings): the statistics
of each corruption, consistency of inputs and targets, no label leakage, and loss falling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_train_config

from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.corruption import IGNORE_INDEX, mask_tokens, span_corruption, text_infilling
from ferry.train.data import encode_all
from ferry.train.text_corpus import docstring_paragraphs, write_text_corpus
from ferry.train.tokenizer import sentinel, special_token_ids, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    paragraphs = docstring_paragraphs()
    tokenizer = train_tokenizer(paragraphs, vocab_size=800, num_sentinels=64)
    ids = [np.array(row[:-1]) for row in encode_all(tokenizer, paragraphs[:600]) if len(row) > 20]
    return tokenizer, ids


def test_masked_lm_statistics_and_no_leakage(corpus):
    tokenizer, rows = corpus
    special = special_token_ids(tokenizer)
    rng = np.random.default_rng(0)
    chosen = maskable_total = masked = randomised = kept = 0
    for ids in rows:
        maskable = ids >= 5 + 64  # ordinary tokens only
        inputs, labels = mask_tokens(ids, rng, mask_id=special["mask"],
                                     vocab_size=tokenizer.get_vocab_size(), maskable=maskable)
        picked = labels != IGNORE_INDEX
        assert not (picked & ~maskable).any()
        assert (labels[picked] == ids[picked]).all()
        assert (inputs[~picked] == ids[~picked]).all()
        chosen += picked.sum()
        maskable_total += maskable.sum()
        masked += (inputs[picked] == special["mask"]).sum()
        kept += (inputs[picked] == ids[picked]).sum()
        randomised += ((inputs[picked] != special["mask"]) & (inputs[picked] != ids[picked])).sum()
    assert abs(chosen / maskable_total - 0.15) < 0.01
    assert abs(masked / chosen - 0.8) < 0.02
    assert abs(randomised / chosen - 0.1) < 0.02
    assert abs(kept / chosen - 0.1) < 0.02


def test_whole_word_masking_takes_every_piece_of_a_word():
    ids = np.arange(100, 130)
    word_starts = np.zeros(30, dtype=bool)
    word_starts[::3] = True  # ten words of three tokens
    rng = np.random.default_rng(1)
    for _ in range(50):
        _, labels = mask_tokens(ids, rng, mask_id=4, vocab_size=200,
                                maskable=np.ones(30, dtype=bool), word_starts=word_starts)
        picked = (labels != IGNORE_INDEX).reshape(10, 3)
        assert (picked.all(axis=1) | ~picked.any(axis=1)).all()


def _spans(mask: np.ndarray) -> list[int]:
    lengths, run = [], 0
    for noisy in mask:
        if noisy:
            run += 1
        elif run:
            lengths.append(run)
            run = 0
    return lengths + ([run] if run else [])


def test_span_corruption_statistics_and_consistency(corpus):
    tokenizer, rows = corpus
    sentinels = [tokenizer.token_to_id(sentinel(i)) for i in range(64)]
    eos = special_token_ids(tokenizer)["eos"]
    rng = np.random.default_rng(2)
    noise = total = 0
    span_lengths: list[int] = []
    for ids in rows:
        inputs, targets = span_corruption(ids, rng, sentinel_ids=sentinels, eos_id=eos)
        assert inputs[-1] == eos and targets[-1] == eos
        used = [t for t in inputs[:-1] if t in sentinels]
        assert used == sentinels[: len(used)]  # in order, from <extra_id_0>
        assert [t for t in targets[:-1] if t in sentinels] == used
        # inputs + targets rebuild the original exactly; no hidden token is in the input
        pieces, current = {}, None
        for t in targets[:-1]:
            if t in sentinels:
                current = t
                pieces[current] = []
            else:
                pieces[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (pieces[t] if t in sentinels else [t])]
        assert rebuilt == ids.tolist()
        hidden = sum(len(p) for p in pieces.values())
        noise += hidden
        total += len(ids)
        span_lengths += [len(p) for p in pieces.values()]
    assert abs(noise / total - 0.15) < 0.01
    assert abs(np.mean(span_lengths) - 3.0) < 0.3


def test_text_infilling_masks_about_thirty_percent_in_poisson_spans(corpus):
    tokenizer, rows = corpus
    mask_id = special_token_ids(tokenizer)["mask"]
    rng = np.random.default_rng(3)
    kept = total = masks = 0
    for ids in rows:
        corrupted = text_infilling(ids, rng, mask_id=mask_id)
        visible = [t for t in corrupted if t != mask_id]
        iterator = iter(ids.tolist())
        assert all(t in iterator for t in visible)  # an ordered subsequence of the original
        kept += len(visible)
        total += len(ids)
        masks += int((corrupted == mask_id).sum())
    assert abs(1 - kept / total - 0.3) < 0.05
    assert masks > 0


@pytest.mark.parametrize(("objective", "architecture"), [
    ("masked_lm", "encoder-only"), ("masked_lm_whole_word", "encoder-only"),
    ("span_corruption", "encoder-decoder"), ("denoising", "encoder-decoder"),
])
def test_each_objective_learns_on_real_text(objective, architecture, tmp_path_factory):
    data = tmp_path_factory.mktemp("docs")
    write_text_corpus(data)
    config = tiny_train_config(data, tmp_path_factory.mktemp("run"), max_steps=50,
                               batch_size=16, lr=0.004, warmup_steps=10)
    config.update(objective=objective)
    config["model"]["overrides"] = {"architecture": architecture}
    config["tokenizer"] = {"vocab_size": 600, "num_sentinels": 32}
    config["data"].update(block_size=48)
    config["eval"] = {"every": 50, "batch_size": 32, "max_examples": 32}
    config["log"] = {"every": 10}
    result = train(train_config_from_dict(config), progress=False, log=lambda message: None)
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # nats
    assert 0 < result.final_metrics["accuracy"] <= 1
