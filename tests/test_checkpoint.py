"""ferry.model checkpoints: round trip, and a FerryError naming the problem for every damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ferry.errors import FerryError
from ferry.model import Transformer, load_checkpoint, preset, save_checkpoint


def make_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=89, **overrides)).eval()


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_checkpoint(make_model(), tmp_path / "ckpt", {"special_ids": {"pad": 0}})


@pytest.mark.parametrize("architecture", ["encoder-decoder", "decoder-only"])
def test_checkpoints_of_ferry_0_1_load_unchanged(tmp_path, architecture):
    """0.1 kept one learned position table for both stacks and the untied projection as
    lm_head.weight: those names are read as the stacks' tables and lm_head.projection."""
    from safetensors.torch import save_file

    model = make_model(architecture=architecture, positional="learned", tie_embeddings=False)
    table = torch.randn(128, 64)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            if stack is not None:
                stack.embed.learned_positions.weight.copy_(table)
    state = {k: v for k, v in model.state_dict().items() if "learned_positions" not in k}
    state["embedding.learned_positions.weight"] = table
    state["lm_head.weight"] = state.pop("lm_head.projection.weight")
    directory = tmp_path / "old"
    save_checkpoint(model, directory)  # config.json; the weights are replaced by 0.1's layout
    save_file(state, str(directory / "model.safetensors"))
    loaded, _ = load_checkpoint(directory)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def rewrite_model_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data["model"].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("overrides", [
    {},
    {"architecture": "decoder-only", "positional": "learned", "tie_embeddings": False},
    {"norm_placement": "pre", "activation": "gelu"},
])
def test_round_trip_gives_identical_outputs(tmp_path, overrides):
    model = make_model(**overrides)
    directory = save_checkpoint(model, tmp_path / "ckpt", {"special_ids": {"eos": 2}, "step": 7})
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]

    loaded, data = load_checkpoint(directory)
    assert not loaded.training
    assert loaded.config == model.config
    assert data["special_ids"] == {"eos": 2} and data["step"] == 7
    assert data["model"] == model.config.to_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    ids = torch.randint(0, 89, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if model.config.architecture == "encoder-decoder":
            mask = torch.ones_like(ids)
            mask[1, 4:] = 0
            expected = model(ids, mask, ids[:, :3])
            actual = loaded(ids, mask, ids[:, :3])
        else:
            expected, actual = model(ids), loaded(ids)
    assert torch.equal(expected, actual)


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    directory = save_checkpoint(make_model(), tmp_path / "ckpt")
    other = make_model(norm_placement="pre")
    save_checkpoint(other, directory)
    loaded, _ = load_checkpoint(directory)
    assert loaded.config.norm_placement == "pre"
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_missing_config_json(checkpoint):
    (checkpoint / "config.json").unlink()
    with pytest.raises(FerryError, match="config.json is missing"):
        load_checkpoint(checkpoint)


def test_missing_directory(tmp_path):
    with pytest.raises(FerryError, match="not a ferry checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01binary"])
def test_config_json_that_is_not_json(checkpoint, text):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(FerryError, match="not valid JSON"):
        load_checkpoint(checkpoint)


def test_config_json_that_is_not_utf8(checkpoint):
    (checkpoint / "config.json").write_bytes(b'{"model": "\xff\xfe"}')
    with pytest.raises(FerryError, match="config.json"):
        load_checkpoint(checkpoint)


def test_config_json_without_a_model_section(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({"special_ids": {}}))
    with pytest.raises(FerryError, match="no 'model' section"):
        load_checkpoint(checkpoint)


def test_config_json_whose_model_section_is_not_a_mapping(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({"model": 5}))
    with pytest.raises(FerryError, match="model"):
        load_checkpoint(checkpoint)


def test_config_json_with_an_unknown_model_key(checkpoint):
    rewrite_model_config(checkpoint, colour="red")
    with pytest.raises(FerryError, match="colour"):
        load_checkpoint(checkpoint)


def test_missing_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(FerryError, match="no model.safetensors"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("damage", ["truncated", "header only", "garbage", "empty"])
def test_unreadable_weights(checkpoint, damage):
    path = checkpoint / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({
        "truncated": raw[: len(raw) // 2],
        "header only": raw[:20],
        "garbage": b"this is not a safetensors file" * 20,
        "empty": b"",
    }[damage])
    with pytest.raises(FerryError, match="model.safetensors is not a readable safetensors"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("change", [
    {"num_decoder_layers": 3},  # missing tensors
    {"num_encoder_layers": 1},  # unexpected tensors
    {"tie_embeddings": False},  # missing lm_head
    {"positional": "learned"},  # missing learned positions
    {"architecture": "decoder-only"},  # no encoder, no cross-attention
    {"d_model": 32, "num_heads": 4},  # every tensor has the wrong shape
    {"vocab_size": 88},  # the embedding has the wrong shape
    {"d_ff": 96},  # the FFN matrices have the wrong shape
], ids=lambda change: ",".join(f"{k}={v}" for k, v in change.items()))
def test_weights_that_do_not_match_the_config(checkpoint, change):
    rewrite_model_config(checkpoint, **change)
    with pytest.raises(FerryError, match="does not match its config"):
        load_checkpoint(checkpoint)
