"""ferry.train.train: a seq2seq and a causal-LM run learn and leave a complete run directory;
configuration mistakes and malformed data files are FerryErrors that say where."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import yaml
from conftest import tiny_train_config
from tokenizers import Tokenizer

from ferry.errors import FerryError
from ferry.model import load_checkpoint
from ferry.train import TrainResult, train
from ferry.train.config import train_config_from_dict
from ferry.train.data import read_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json"}


def quiet(message: str) -> None:
    pass


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def train_losses(history: list[dict]) -> list[float]:
    return [record["train_loss"] for record in history if "train_loss" in record]


# --- seq2seq on the date task ------------------------------------------------------------------


@pytest.fixture(scope="module")
def seq2seq_run(tiny_run) -> TrainResult:
    """The session's tiny seq2seq run (conftest's `tiny_run`: `tiny_train_config` on the date
    task, 120 steps), shared rather than trained again: the tests here only read it."""
    return tiny_run


def test_seq2seq_train_loss_falls(seq2seq_run):
    losses = train_losses(seq2seq_run.history)
    assert len(losses) >= 4
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(losses[len(losses) // 2 :]) < min(losses[: len(losses) // 2])


def test_seq2seq_metrics_file_matches_history(seq2seq_run):
    records = read_metrics(seq2seq_run.run_dir)
    assert records == json.loads(json.dumps(seq2seq_run.history))
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == sorted(steps) and steps[-1] == 120
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [60, 120]
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert seq2seq_run.final_metrics == {"loss": evals[-1]["eval_loss"],
                                         "exact_match": evals[-1]["eval_exact_match"],
                                         "bleu": evals[-1]["eval_bleu"],
                                         "chrf": evals[-1]["eval_chrf"]}
    assert set(seq2seq_run.best_metrics) == {"loss", "exact_match", "bleu", "chrf"}
    assert all(0.0 <= r["eval_bleu"] <= 100.0 and 0.0 <= r["eval_chrf"] <= 100.0 for r in evals)
    assert seq2seq_run.best_metrics["exact_match"] == max(r["eval_exact_match"] for r in evals)


def test_seq2seq_run_directory_is_complete(seq2seq_run):
    run_dir = seq2seq_run.run_dir
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    assert seq2seq_run.checkpoint == run_dir / "checkpoint"
    assert seq2seq_run.best_checkpoint == run_dir / "best"
    for directory in (seq2seq_run.checkpoint, seq2seq_run.best_checkpoint):
        assert CHECKPOINT_FILES <= {p.name for p in directory.iterdir()}, directory
        assert ((directory / "tokenizer.json").read_bytes()
                == (run_dir / "tokenizer.json").read_bytes())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["objective"] == "seq2seq"
    assert saved["optim"]["max_steps"] == 120
    assert saved["out_dir"] == str(run_dir)
    assert not [p for p in run_dir.rglob("*.tmp")]


def test_seq2seq_checkpoint_carries_special_ids_and_samples(seq2seq_run, date_data):
    data = json.loads((seq2seq_run.checkpoint / "config.json").read_text())
    assert data["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": 4,
                                   "decoder_start": 1}
    assert data["objective"] == "seq2seq"
    assert data["step"] == 120
    eval_sources = [row["source"] for row in read_jsonl(date_data / "eval.jsonl", ["source"])]
    assert data["samples"] == eval_sources[:16]
    assert data["metrics"] == seq2seq_run.final_metrics
    tokenizer = Tokenizer.from_file(str(seq2seq_run.checkpoint / "tokenizer.json"))
    assert data["model"]["vocab_size"] == tokenizer.get_vocab_size()
    assert data["model"]["d_model"] == 64  # the tiny preset

    best = json.loads((seq2seq_run.best_checkpoint / "config.json").read_text())
    assert best["special_ids"] == data["special_ids"]
    assert best["samples"] == data["samples"]
    assert best["metrics"] == seq2seq_run.best_metrics


def test_seq2seq_checkpoint_loads(seq2seq_run):
    model, data = load_checkpoint(seq2seq_run.checkpoint)
    assert model.config.architecture == "encoder-decoder"
    assert model.config.vocab_size == data["model"]["vocab_size"]


# --- causal LM on a decoder-only model ---------------------------------------------------------


def write_sentences(path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "a bird"]
    verbs = ["sees", "likes", "finds", "follows", "watches", "carries"]
    objects = ["the ball", "a red box", "the old tree", "some bread", "the river", "a small key"]
    places = ["in the park", "at home", "near the school", "by the sea", "every morning"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
             f"{rng.choice(places)}." for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def causal_config(tmp_path: Path, **optim) -> dict:
    return {
        "objective": "causal_lm",
        "out_dir": str(tmp_path / "lm-run"),
        "seed": 0,
        "model": {"preset": "tiny", "overrides": {"architecture": "decoder-only"}},
        "tokenizer": {"vocab_size": 300, "num_sentinels": 4},
        "data": {"train": str(write_sentences(tmp_path / "train.txt", 400, seed=1)),
                 "eval": str(write_sentences(tmp_path / "eval.txt", 60, seed=2)),
                 "block_size": 32},
        "optim": {"lr": 0.003, "warmup_steps": 10, "max_steps": 100, "batch_size": 16, **optim},
        "eval": {"every": 50, "batch_size": 64},
    }


def test_causal_lm_decoder_only_run(tmp_path):
    config = train_config_from_dict(causal_config(tmp_path))
    result = train(config, progress=False, log=quiet)

    losses = train_losses(result.history)
    assert len(losses) == 4
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(result.final_metrics) == {"loss", "perplexity"}
    assert result.final_metrics["perplexity"] == pytest.approx(
        math.exp(result.final_metrics["loss"]), rel=1e-9
    )
    # a repetitive toy language: far better than a uniform guess over the vocabulary
    tokenizer = Tokenizer.from_file(str(result.run_dir / "tokenizer.json"))
    assert result.final_metrics["perplexity"] < tokenizer.get_vocab_size() / 10
    evals = [r for r in result.history if "eval_perplexity" in r]
    assert [r["step"] for r in evals] == [50, 100]
    assert evals[-1]["eval_perplexity"] < evals[0]["eval_perplexity"]
    assert result.best_metrics == result.final_metrics  # perplexity fell, so the last is best

    assert (result.run_dir / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    for directory in (result.checkpoint, result.best_checkpoint):
        assert CHECKPOINT_FILES <= {p.name for p in directory.iterdir()}
    data = json.loads((result.checkpoint / "config.json").read_text())
    assert data["objective"] == "causal_lm"
    assert data["model"]["architecture"] == "decoder-only"
    assert data["special_ids"]["eos"] == 2
    assert data["samples"] == []
    model, _ = load_checkpoint(result.checkpoint)
    assert model.encoder is None


def test_causal_lm_with_too_little_text(tmp_path):
    config = causal_config(tmp_path)
    write_sentences(Path(config["data"]["eval"]), 1, seed=3)
    with pytest.raises(FerryError, match="fewer than one block"):
        train(train_config_from_dict(config), progress=False, log=quiet)


# --- configuration mistakes --------------------------------------------------------------------


def test_seq2seq_with_a_decoder_only_model_is_refused(date_data, tmp_path):
    out = tmp_path / "run"
    config = train_config_from_dict(tiny_train_config(date_data, out),
                                    ["model.overrides.architecture=decoder-only"])
    with pytest.raises(FerryError, match="architecture") as info:
        train(config, progress=False, log=quiet)
    assert "decoder-only" in str(info.value)
    assert not out.exists()  # refused before anything was written


def test_causal_lm_with_an_encoder_decoder_model_is_refused(tmp_path):
    config = causal_config(tmp_path)
    config["model"]["overrides"] = {}
    with pytest.raises(FerryError, match="encoder-decoder"):
        train(train_config_from_dict(config), progress=False, log=quiet)


def test_unknown_objective_is_refused(date_data, tmp_path):
    config = train_config_from_dict(tiny_train_config(date_data, tmp_path / "run"),
                                    ["objective=translation"])
    with pytest.raises(FerryError, match="translation"):
        train(config, progress=False, log=quiet)


def test_batch_larger_than_the_data_is_refused(date_data, tmp_path):
    config = train_config_from_dict(tiny_train_config(date_data, tmp_path / "run"),
                                    ["optim.batch_size=5000"])
    with pytest.raises(FerryError, match="batch_size"):
        train(config, progress=False, log=quiet)


def test_a_run_puts_the_process_torch_settings_back(date_data, tmp_path):
    """Threads and deterministic algorithms (and TF32 on CUDA) hold for the run only: code that
    trains and then decodes in the same process decodes under its own settings."""
    import torch

    config = tiny_train_config(date_data, tmp_path / "run", max_steps=4)
    config.update(threads=1, deterministic=True)
    config["eval"].update(every=4, max_examples=8)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert (threads, deterministic) != (1, True)
    train(train_config_from_dict(config), progress=False, log=quiet)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


# --- malformed data files ------------------------------------------------------------------------

GOOD = b'{"source": "March 5, 2021", "target": "2021-03-05"}\n'


@pytest.mark.parametrize(("bad_line", "words"), [
    (b'{"source": "March 5, 2021"}\n', "'target' is missing"),
    (b'{"source": "x", "target": 5}\n', "'target' is missing or not a string"),
    (b"\n", "empty line"),
    (b"   \n", "empty line"),
    (b'{"source": "x", "target": \n', "invalid JSON"),
    (b"not json at all\n", "invalid JSON"),
    (b'["source", "target"]\n', "expected a JSON object"),
    (b'{"source": "caf\xe9", "target": "x"}\n', "not UTF-8"),
])
def test_read_jsonl_names_the_file_and_line(tmp_path, bad_line, words):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD + GOOD + bad_line + GOOD)
    with pytest.raises(FerryError) as info:
        read_jsonl(path, ["source", "target"])
    message = str(info.value)
    assert f"{path}:3" in message
    assert words in message


def test_read_jsonl_reads_good_files(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD + '{"source": "日本", "target": "x", "extra": 1}\n'.encode())
    rows = read_jsonl(path, ["source", "target"])
    assert rows[0] == {"source": "March 5, 2021", "target": "2021-03-05"}
    assert rows[1]["source"] == "日本"


def test_read_jsonl_missing_and_empty_files(tmp_path):
    with pytest.raises(FerryError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", ["source"])
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(FerryError, match="empty"):
        read_jsonl(tmp_path / "empty.jsonl", ["source"])


def test_training_on_a_malformed_file_reports_the_line(date_data, tmp_path):
    bad = tmp_path / "train.jsonl"
    lines = (date_data / "train.jsonl").read_bytes().splitlines(keepends=True)[:100]
    lines[41] = b'{"source": "oops"}\n'
    bad.write_bytes(b"".join(lines))
    config = tiny_train_config(date_data, tmp_path / "run")
    config["data"]["train"] = str(bad)
    with pytest.raises(FerryError, match=re.escape(f"{bad}:42: field 'target'")):
        train(train_config_from_dict(config), progress=False, log=quiet)
