"""Fine-tuning from a pretrained checkpoint: weights and tokenizer reused, the task trained on."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_config
from safetensors.torch import load_file

from ferry.errors import FerryError
from ferry.model import Transformer, TransformerConfig
from ferry.model.checkpoint import read_checkpoint_config
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.text_corpus import write_text_corpus
from ferry.train.loop import initialise_from


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny encoder-decoder pretrained with span corruption on the docstring corpus."""
    data = tmp_path_factory.mktemp("docs")
    write_text_corpus(data)
    config = tiny_train_config(data, tmp_path_factory.mktemp("pretrain"), max_steps=20,
                               batch_size=16)
    config.update(objective="span_corruption")
    config["tokenizer"] = {"vocab_size": 500, "num_sentinels": 32}
    config["data"].update(block_size=32)
    config["eval"] = {"every": 20, "batch_size": 32, "max_examples": 16}
    return train(train_config_from_dict(config), progress=False, log=lambda message: None)


def test_finetuning_starts_from_the_pretrained_weights_and_tokenizer(pretrained, date_data,
                                                                     tmp_path):
    source = pretrained.checkpoint
    messages: list[str] = []
    config = tiny_train_config(date_data, tmp_path / "finetune", max_steps=30)
    config["model"] = {"init_from": str(source), "overrides": {"dropout": 0.0}}
    result = train(train_config_from_dict(config), progress=False, log=messages.append)
    assert any("initialised from" in m and "tensors loaded" in m for m in messages)
    assert (result.run_dir / "tokenizer.json").read_text() == \
        (source / "tokenizer.json").read_text()
    tuned = read_checkpoint_config(result.checkpoint)["model"]
    base = read_checkpoint_config(source)["model"]
    assert {k: v for k, v in tuned.items() if k != "dropout"} == \
        {k: v for k, v in base.items() if k != "dropout"}
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < losses[0]


def test_initialise_from_copies_every_shared_tensor(pretrained):
    config = TransformerConfig.from_dict(read_checkpoint_config(pretrained.checkpoint)["model"])
    model = Transformer(config)
    initialise_from(model, str(pretrained.checkpoint), log=lambda message: None)
    saved = load_file(str(pretrained.checkpoint / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_shape_mismatch_and_missing_checkpoint_are_clear(pretrained, date_data, tmp_path):
    config = tiny_train_config(date_data, tmp_path / "a", max_steps=5)
    config["model"] = {"init_from": str(pretrained.checkpoint), "overrides": {"d_ff": 96}}
    with pytest.raises(FerryError, match="has shape"):
        train(train_config_from_dict(config), progress=False, log=lambda message: None)
    config["model"] = {"init_from": str(tmp_path / "nope")}
    with pytest.raises(FerryError, match="ferry checkpoint|lacks"):
        train(train_config_from_dict(config), progress=False, log=lambda message: None)
