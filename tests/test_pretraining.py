"""Self-supervised objectives on real text (the standard library's docstrings): the statistics
of each corruption, consistency of inputs and targets, no label leakage, and loss falling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import pretraining_config

from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.corruption import (
    IGNORE_INDEX,
    mask_tokens,
    ngram_spans,
    span_corruption,
    text_infilling,
)
from ferry.train.data import encode_all
from ferry.train.datasets.text_corpus import docstring_paragraphs, write_text_corpus
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


ALBERT = {"embedding_size": 32, "layer_groups": 1, "lm_head_transform": "dense_norm",
          "lm_head_bias": True}  # factorised embeddings, every layer the same weights


XLNET = {"positional": "relative_xl", "attention_bias": "none", "embedding_scale": "none",
         "activation": "gelu", "lm_head_bias": True, "memory_length": 16}  # two streams, memory


@pytest.mark.parametrize(("objective", "architecture", "options"), [
    ("masked_lm", "encoder-only", {}), ("masked_lm_whole_word", "encoder-only", {}),
    ("masked_lm_sop", "encoder-only", ALBERT),
    ("permutation_lm", "encoder-only", XLNET),
    ("span_corruption", "encoder-decoder", {}), ("denoising", "encoder-decoder", {}),
])
def test_each_objective_learns_on_real_text(objective, architecture, options, tmp_path_factory):
    data = tmp_path_factory.mktemp("docs")
    paths = write_text_corpus(data)
    config = pretraining_config(data, tmp_path_factory.mktemp("run"), objective, max_steps=50,
                                model={"preset": "tiny",
                                       "overrides": {"architecture": architecture, **options}})
    if objective == "masked_lm_sop":  # segment pairs come from whole documents; n-grams
        config["data"].update(train=str(paths["documents/train"]),
                              eval=str(paths["documents/eval"]), max_ngram=3)
    result = train(train_config_from_dict(config), progress=False, log=lambda message: None)
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # nats
    assert 0 < result.final_metrics["accuracy"] <= 1
    if objective == "permutation_lm":  # predicting a sixth of each order beats the commonest
        assert result.final_metrics["accuracy"] > result.baseline["accuracy"], result.baseline


@pytest.fixture(scope="module")
def nsp_objective(tmp_path_factory):
    """next_sentence / masked_lm_nsp on the standard library's whole docstrings (real text)."""
    from ferry.train.config import TrainConfig
    from ferry.train.objectives import objective_class

    data = tmp_path_factory.mktemp("docs")
    paths = write_text_corpus(data)
    documents = [line for line in paths["documents/train"].read_text().splitlines()]
    tokenizer = train_tokenizer((d for d in documents), vocab_size=800, num_sentinels=8)

    def make(name: str):
        config = TrainConfig(objective=name)
        config.data.block_size = 96
        objective = objective_class(name)(config, tokenizer, special_token_ids(tokenizer))
        return objective, objective.load(str(paths["documents/train"]))

    return make


def test_next_sentence_pairs_are_half_continuations_with_segment_ids(nsp_objective):
    objective, examples = nsp_objective("next_sentence")
    eos = objective.special["eos"]
    rng = np.random.default_rng(0)
    labels, lengths = [], []
    for start in range(0, 3200, 64):
        batch = objective.collate([examples[i % len(examples)] for i in range(start, start + 64)],
                                  rng=rng)
        labels += batch["next_sentence_labels"].tolist()
        for ids, types, mask in zip(batch["input_ids"], batch["token_type_ids"],
                                    batch["attention_mask"]):
            ids, types = ids[mask == 1].tolist(), types[mask == 1].tolist()
            lengths.append(len(ids))
            cut = ids.index(eos)  # A </s> B </s>: segment 0 up to the first </s>, then 1
            assert types == [0] * (cut + 1) + [1] * (len(ids) - cut - 1) and ids[-1] == eos
        assert (batch["labels"] == IGNORE_INDEX).all()  # NSP alone predicts no tokens
    assert abs(np.mean(labels) - 0.5) < 0.03 and len(labels) == 3200
    assert max(lengths) <= 96


def test_is_next_pairs_continue_their_document_and_random_ones_come_from_another(nsp_objective):
    objective, examples = nsp_objective("next_sentence")
    rng = np.random.default_rng(1)
    for index, cut, documents in examples[:200:7]:
        ids, types, label = objective._pair(index, cut, documents, rng)
        second = [t for t, s in zip(ids, types) if s == 1][:-1]
        continuation = [t for s in documents[index][cut:] for t in s]
        assert (second == continuation[: len(second)]) == (label == 0)


def test_masked_lm_nsp_masks_only_real_tokens_and_keeps_both_losses(nsp_objective):
    objective, examples = nsp_objective("masked_lm_nsp")
    batch = objective.collate(examples[:64], rng=np.random.default_rng(2))
    scored = batch["labels"] != IGNORE_INDEX
    share = scored.sum() / batch["attention_mask"].sum()
    assert 0.10 < float(share) < 0.20  # 15% of the non-special tokens
    hidden = batch["input_ids"][scored] != batch["labels"][scored]
    assert hidden.float().mean() > 0.8  # 80% <mask> + 10% random: the label is not visible
    assert not scored[batch["attention_mask"] == 0].any()
    assert objective.target_tokens(batch) == int(scored.sum())


def test_ngram_masking_chooses_spans_of_up_to_three_with_weights_one_over_n(corpus):
    """ALBERT's n-gram masking: 15 % of the maskable tokens, in spans of n ≤ 3 drawn with
    weight 1/n (6/11, 3/11, 2/11), never over special tokens."""
    tokenizer, rows = corpus
    rng = np.random.default_rng(4)
    chosen_share, runs = [], []
    for ids in rows[:300]:
        maskable = rng.random(len(ids)) > 0.05  # a few "special" tokens scattered in
        chosen = ngram_spans(maskable, rng, probability=0.15, max_ngram=3)
        assert not (chosen & ~maskable).any()
        chosen_share.append(chosen.sum() / maskable.sum())
        edges = np.diff(np.concatenate([[0], chosen.astype(int), [0]]))
        runs += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
    assert abs(np.mean(chosen_share) - 0.15) < 0.01
    lengths = np.bincount(runs)  # adjacent spans merge into longer runs, rarely
    assert lengths[2] > 0.2 * lengths[1] and lengths[3] > 0.1 * lengths[1]
    assert lengths[1:4].sum() > 0.9 * len(runs)
    inputs, labels = mask_tokens(rows[0], rng, mask_id=4, vocab_size=800,
                                 maskable=np.ones(len(rows[0]), bool), max_ngram=3)
    assert ((labels != IGNORE_INDEX) == (labels == rows[0])).all()


def test_sentence_order_pairs_are_consecutive_segments_swapped_half_the_time(nsp_objective):
    objective, examples = nsp_objective("sentence_order")
    eos = objective.special["eos"]
    rng = np.random.default_rng(5)
    labels = []
    for index, cut, documents in examples[:600:3]:
        ids, types, label = objective._pair(index, cut, documents, rng)
        labels.append(label)
        boundary = ids.index(eos)  # segment A </s> segment B </s>
        first, second = ids[:boundary], ids[boundary + 1:-1]
        assert types == [0] * (boundary + 1) + [1] * (len(second) + 1) and ids[-1] == eos
        earlier, later = (second, first) if label == 1 else (first, second)
        stream = [t for s in documents[index] for t in s]  # the document, as tokens
        joined = earlier + later
        # the earlier segment ends where the later one starts: one contiguous run of text
        assert any(stream[i:i + len(joined)] == joined for i in range(len(stream))), label
        assert [t for s in documents[index][:cut] for t in s][-len(earlier):] == earlier
    assert abs(np.mean(labels) - 0.5) < 0.07 and objective.labels == ["in_order", "swapped"]
    assert objective.task_metadata()["labels"] == ["in_order", "swapped"]
