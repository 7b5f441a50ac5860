"""An imported checkpoint is an ordinary ferry checkpoint: every objective that fits its
architecture trains on it (with its own tokenizer and special tokens), and the result exports to
a bundle and back to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_families import BUILDERS

from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.export.hf_export import export_hf
from ferry.model import load_checkpoint
from ferry.runtime import load
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.dates import write_date_task
from ferry.train.datasets.task_data import write_task_data
from ferry.train.datasets.text_corpus import write_text_corpus
from ferry.train.hf_import import import_hf


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_task_data(root / "tasks", num_train=600, num_eval=60, seed=3)
    write_date_task(root / "dates", num_train=600, num_eval=40, seed=1)
    write_text_corpus(root / "docs")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family → (HF directory, imported ferry checkpoint)."""
    root = tmp_path_factory.mktemp("imported")
    made = {}
    for family, kwargs in (("bert", {"model_class": "BertForMaskedLM"}),
                           ("albert", {"model_class": "AlbertForMaskedLM"}),
                           ("xlnet", {"model_class": "XLNetLMHeadModel"}),
                           ("roberta", {"model_class": "RobertaForMaskedLM"}),
                           ("gpt2", {}), ("bart", {}), ("marian", {})):
        hf_dir = BUILDERS[family](root / family, **kwargs)
        made[family] = hf_dir, import_hf(hf_dir, root / f"{family}-ferry", log=quiet)
    return made


def run(config: dict, out: Path):
    config = {"seed": 0, "out_dir": str(out), **config}
    config.setdefault("optim", {}).update(lr=1e-3, warmup_steps=2, batch_size=16)
    config.setdefault("eval", {}).update(every=config["optim"]["max_steps"], batch_size=32,
                                         max_examples=32)
    config.setdefault("log", {"every": 2})
    return train(train_config_from_dict(config), progress=False, log=quiet)


def losses(result) -> list[float]:
    return [r["train_loss"] for r in result.history if "train_loss" in r]


def test_a_classifier_fine_tuned_from_an_imported_bert_exports_both_ways(checkpoints, data,
                                                                         tmp_path):
    hf_dir, checkpoint = checkpoints["bert"]
    tasks = data / "tasks" / "seasons"
    result = run({"objective": "classification",
                  "model": {"init_from": str(checkpoint), "overrides": {"dropout": 0.0}},
                  "data": {"train": str(tasks / "train.csv"), "eval": str(tasks / "eval.csv"),
                           "max_source_len": 48},
                  "optim": {"max_steps": 12}}, tmp_path / "run")
    assert losses(result)[-1] < losses(result)[0]
    tuned, meta = load_checkpoint(result.checkpoint)
    # BERT's own tokenizer and special tokens: [CLS] starts every input, [PAD] pads
    assert meta["special_ids"] == load_checkpoint(checkpoint)[1]["special_ids"]
    assert tuned.config.embedding_norm == "layernorm" and tuned.config.task_head != "none"
    # every variant: fused (the CPU default), int8, fp16, bf16, each within its tolerance
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle",
                           precisions=("fp32", "fused", "int8", "fp16", "bf16"), log=quiet)
    assert set(load(bundle).bundle.precisions) == {"fp32", "fused", "int8", "fp16", "bf16"}
    labels = [load(bundle, b).classify(["We met on 3 July 1999.", "Snow on 2 Jan."])
              for b in ("onnxruntime", "torch")]
    assert [r["label"] for r in labels[0]] == [r["label"] for r in labels[1]]
    assert np.allclose([r["score"] for r in labels[0]], [r["score"] for r in labels[1]],
                       atol=1e-5)
    # published back: transformers' BertForSequenceClassification computes ferry's logits
    out = export_hf(result.checkpoint, tmp_path / "hf", log=quiet)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.id2label == dict(enumerate(meta["task"]["labels"]))
    encoded = transformers.AutoTokenizer.from_pretrained(out)(
        ["We met on 3 July 1999.", "Snow"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reloaded(**encoded).logits
        ours = tuned.head_logits(encoded["input_ids"], encoded["attention_mask"],
                                 encoded["token_type_ids"])
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("family, objective, corpus", [
    ("roberta", "masked_lm", "docs"),
    ("albert", "masked_lm_sop", "documents"),
    ("xlnet", "permutation_lm", "docs"),  # with 8 tokens of each block read as memory
    ("gpt2", "causal_lm", "docs"),
    ("bart", "denoising", "docs"),
    ("bart", "seq2seq", "dates"),
    ("marian", "seq2seq", "dates"),
])
def test_every_fitting_objective_trains_an_imported_model(checkpoints, data, tmp_path, family,
                                                          objective, corpus):
    _, checkpoint = checkpoints[family]
    files = ({"train": str(data / "docs" / "documents" / "train.jsonl"),
              "eval": str(data / "docs" / "documents" / "eval.jsonl"),
              "block_size": 48, "max_ngram": 3} if corpus == "documents" else
             {"train": str(data / "docs" / "train.jsonl"),
              "eval": str(data / "docs" / "eval.jsonl"),
              "block_size": 32} if corpus == "docs" else
             {"train": str(data / "dates" / "train.jsonl"),
              "eval": str(data / "dates" / "eval.jsonl"), "max_source_len": 32,
              "max_target_len": 24})
    result = run({"objective": objective, "data": files,
                  "model": {"init_from": str(checkpoint), "overrides": {"dropout": 0.0}},
                  "eval": {"max_new_tokens": 8}, "optim": {"max_steps": 10}},
                 tmp_path / "run")
    assert losses(result)[-1] < losses(result)[0]
    head = ({"task_head": "sequence_classification", "num_labels": 2}
            if objective == "masked_lm_sop" else {})  # sentence order adds its classifier
    assert load_checkpoint(result.checkpoint)[0].config == \
        load_checkpoint(checkpoint)[0].config.__class__(
            **{**load_checkpoint(checkpoint)[0].config.to_dict(), "dropout": 0.0, **head})


def test_an_objective_needing_a_token_the_model_lacks_is_refused_by_name(checkpoints, data,
                                                                         tmp_path):
    _, checkpoint = checkpoints["marian"]  # Marian's vocabulary has no mask token
    with pytest.raises(FerryError, match="objective denoising needs a mask token"):
        run({"objective": "denoising", "model": {"init_from": str(checkpoint)},
             "data": {"train": str(data / "docs" / "train.jsonl"),
                      "eval": str(data / "docs" / "eval.jsonl"), "block_size": 32},
             "optim": {"max_steps": 2}}, tmp_path / "run")


def test_the_readme_user_story_runs_as_written(checkpoints, tmp_path, monkeypatch):
    """The `ferry import hf` block of docs/hf.md, command by command, on a small BERT (fewer
    steps and examples; every command as written otherwise)."""
    import re
    import shlex

    from click.testing import CliRunner

    from ferry.cli import main

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "hf.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", page, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert [c.split()[1:3] for c in commands][0] == ["import", "hf"]
    hf_dir, _ = checkpoints["bert"]
    shorter = {"data": ["--train", "200", "--eval", "20"],
               "train": ["--set", "optim.max_steps=4", "--set", "eval.every=4",
                         "--set", "eval.max_examples=16"]}
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = [str(hf_dir) if a == "path/to/bert-base-uncased" else
                str(root / a) if a.startswith("examples/") else a
                for a in shlex.split(command)[1:]]
        result = CliRunner().invoke(main, args + shorter.get(args[0], []))
        assert result.exit_code == 0, (command, result.output)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf" / "classifier").architectures \
        == ["BertForSequenceClassification"]
