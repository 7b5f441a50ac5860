"""Each objective's trivial baseline, the bar its model must clear (printed after training)."""

from __future__ import annotations

import math

from conftest import tiny_train_config

from ferry.train.config import train_config_from_dict
from ferry.train.datasets.dates import write_jsonl
from ferry.train.objectives import CausalLMObjective, MaskedLMObjective, Seq2SeqObjective
from ferry.train.tokenizer import special_token_ids, train_tokenizer


def _objective(cls, tmp_path, rows, **data):
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "eval.jsonl", rows)
    config = tiny_train_config(tmp_path, tmp_path / "run")
    config["data"].update(data)
    texts = [v for row in rows for v in row.values()]
    tokenizer = train_tokenizer(texts, vocab_size=300, num_sentinels=4)
    objective = cls(train_config_from_dict(config), tokenizer, special_token_ids(tokenizer))
    examples = objective.load(str(tmp_path / "train.jsonl"))
    return objective, examples


def test_seq2seq_baseline_is_the_better_of_copy_and_majority(tmp_path):
    rows = [{"source": f"word {i}", "target": f"word {i}" if i % 4 == 0 else "yes"}
            for i in range(40)]
    objective, examples = _objective(Seq2SeqObjective, tmp_path, rows)
    name, value = objective.baseline(examples, examples)
    assert name == "always the commonest target" and value == 0.75
    copy_rows = [{"source": f"w {i}", "target": f"w {i}" if i % 2 else f"x {i}"} for i in range(40)]
    objective, examples = _objective(Seq2SeqObjective, tmp_path, copy_rows)
    assert objective.baseline(examples, examples) == ("copy the input", 0.5)


def test_causal_lm_baseline_is_unigram_perplexity(tmp_path):
    rows = [{"text": "the cat sat on the mat and the dog sat on the log"} for _ in range(30)]
    objective, examples = _objective(CausalLMObjective, tmp_path, rows, block_size=16)
    name, perplexity = objective.baseline(examples, examples)
    assert name == "unigram frequencies"
    assert 1 < perplexity < objective.tokenizer.get_vocab_size() / 10  # far below uniform
    assert math.isfinite(perplexity)


def test_masked_lm_baseline_predicts_the_commonest_token(tmp_path):
    rows = [{"text": "a a a a a a a a b c"} for _ in range(60)]
    objective, examples = _objective(MaskedLMObjective, tmp_path, rows, block_size=16)
    name, accuracy = objective.baseline(examples, examples)
    assert name == "always the commonest token" and 0.4 < accuracy < 1.0
