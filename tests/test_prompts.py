"""Prompt-based classification: template filling, the scored positions, label parsing, and the
BIO / span helpers the task heads share between training and the runtime."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.errors import FerryError
from ferry.runtime.prompts import Prompt, label_scores, prompt_rows
from ferry.runtime.text_tasks import (
    best_span,
    bio_entities,
    encode_texts,
    first_tokens,
    word_spans,
)
from ferry.train.task_metrics import entity_f1
from ferry.train.tokenizer import special_token_ids, train_tokenizer

TEXTS = ["The weather was cold and it snowed all week.", "We swam in the warm sea every day.",
         "Leaves fell and the nights grew longer."] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS + ["It was winter. It was summer. It was autumn."],
                           vocab_size=300, num_sentinels=2, min_frequency=1)


def test_labels_and_verbalizer_words_parse():
    prompt = Prompt.parse("{text} It was {label}.", "cold=winter, warm=summer")
    assert prompt.labels == ("cold", "warm") and prompt.words == ("winter", "summer")
    assert Prompt.parse("{text} {label}", ["a", "b"]).words == ("a", "b")
    for template, labels in [("{text}", "a,b"), ("{label} {label} {text}", "a,b"),
                             ("{text} {label}", "a"), ("{text} {label}", "a,a")]:
        with pytest.raises(FerryError):
            Prompt.parse(template, labels)


def test_masked_rows_hide_exactly_the_label_word(tokenizer):
    special = special_token_ids(tokenizer)
    prompt = Prompt.parse("{text} It was {label}.", "winter,summer")
    rows = prompt_rows(tokenizer, prompt, TEXTS[:2], masked=True, mask_id=special["mask"],
                       max_length=64)
    assert len(rows.ids) == 4 and rows.num_labels == 2
    for r, (ids, positions, targets) in enumerate(zip(rows.ids, rows.positions, rows.targets)):
        word = prompt.words[r % 2]
        assert [ids[p] for p in positions] == [special["mask"]] * len(positions)
        assert tokenizer.decode(targets).strip() == word
        unmasked = list(ids)
        for p, t in zip(positions, targets):
            unmasked[p] = t
        filled = prompt.fill(TEXTS[r // 2], None, word)[0]
        assert tokenizer.decode(unmasked) == filled


def test_causal_rows_score_the_word_from_the_tokens_before_it(tokenizer):
    prompt = Prompt.parse("{text} It was {label}.", "winter,autumn")
    examples = [("Snow fell.", None, "winter")]
    rows = prompt_rows(tokenizer, prompt, TEXTS[:1], masked=False, mask_id=4, max_length=128,
                       examples=examples)
    for ids, positions, targets in zip(rows.ids, rows.positions, rows.targets):
        assert [ids[p + 1] for p in positions] == targets  # logits at p predict token p + 1
        assert tokenizer.decode(ids).startswith("Snow fell. It was winter.\n")
    # (B, L) mean log-probabilities: uniform log-probs give equal scores
    vocab = tokenizer.get_vocab_size()
    uniform = [np.full((len(t), vocab), -np.log(vocab)) for t in rows.targets]
    assert np.allclose(label_scores(uniform, rows), -np.log(vocab))


def test_over_long_prompts_and_missing_pairs_are_refused(tokenizer):
    prompt = Prompt.parse("{text} / {text_pair} = {label}", "a,b")
    with pytest.raises(FerryError, match="give a pair"):
        prompt_rows(tokenizer, prompt, ["x"], masked=True, mask_id=4, max_length=64)
    with pytest.raises(FerryError, match="positions"):
        prompt_rows(tokenizer, prompt, [TEXTS[0] * 5], ["y"], masked=True, mask_id=4,
                    max_length=16)


def test_words_align_to_their_first_sub_word(tokenizer):
    words = ["Snowfall", "covered", "Oslo", "on", "12", "May", "."]
    text, spans = word_spans(words)
    encoding = tokenizer.encode(text)
    firsts = first_tokens(encoding, spans)
    assert firsts == sorted(firsts) and len(set(firsts)) == len(words) and min(firsts) >= 0
    for word, (start, end), t in zip(words, spans, firsts):
        token_start, token_end = encoding.offsets[t]
        assert text[start:end] == word and token_end > start and token_start <= start


def test_bio_entities_and_entity_f1():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "B-DATE", "I-DATE", "I-PER"]
    assert bio_entities(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("DATE", 4, 6), ("PER", 6, 7)]
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == 0.5  # one of two right
    assert entity_f1(gold, [["O"] * 4]) == 0.0


def test_best_span_respects_order_length_and_the_context():
    start = np.array([0.0, 5.0, 1.0, 0.0, 10.0])
    end = np.array([0.0, 0.0, 4.5, 0.0, 0.0])
    allowed = np.array([False, True, True, True, True])
    assert best_span(start, end, allowed, 30)[:2] == (4, 4)  # 10 + 0 beats 5 + 4.5
    assert best_span(start, end, allowed & (np.arange(5) < 4), 30)[:2] == (1, 2)
    assert best_span(start, end, allowed & (np.arange(5) < 4), 1)[:2] == (2, 2)
    with pytest.raises(FerryError):
        best_span(start, end, np.zeros(5, dtype=bool), 30)


def test_pairs_get_segment_ids(tokenizer):
    batch = encode_texts(tokenizer, ["It was cold.", "Warm"], ["Snow fell.", "sea and sun"],
                         pad=0, max_length=32)
    for types, mask in zip(batch.token_type_ids, batch.attention_mask):
        real = types[mask == 1].tolist()
        assert real[0] == 0 and real[-1] == 1 and real == sorted(real)
    with pytest.raises(FerryError, match="positions"):
        encode_texts(tokenizer, [TEXTS[0]], pad=0, max_length=4)
