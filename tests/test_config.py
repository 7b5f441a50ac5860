"""ferry.train.config: strict keys, `--set` overrides, type checks, YAML files, saving."""

from __future__ import annotations

import pytest
import yaml

from ferry.errors import FerryError
from ferry.train.config import (
    OptimSection,
    TrainConfig,
    load_train_config,
    train_config_from_dict,
)


def base_dict() -> dict:
    return {
        "objective": "seq2seq",
        "out_dir": "runs/x",
        "model": {"preset": "tiny", "overrides": {"dropout": 0.0}},
        "data": {"train": "a.jsonl", "eval": "b.jsonl"},
        "optim": {"lr": 0.01, "max_steps": 10},
    }


def test_defaults_and_sections():
    config = train_config_from_dict(base_dict())
    assert isinstance(config, TrainConfig)
    assert config.optim.lr == 0.01 and config.optim.max_steps == 10
    assert config.optim.warmup_steps == OptimSection().warmup_steps
    assert config.model.overrides == {"dropout": 0.0}
    assert config.data.train == "a.jsonl"
    assert train_config_from_dict({}) == TrainConfig()


def test_unknown_top_level_key_is_named():
    with pytest.raises(FerryError, match="unknown config key epochs") as info:
        train_config_from_dict({**base_dict(), "epochs": 3})
    assert "objective" in str(info.value)  # lists what is allowed


@pytest.mark.parametrize(("section", "key"), [
    ("optim", "lrr"), ("data", "trian"), ("eval", "evry"), ("model", "name"),
    ("tokenizer", "size"),
])
def test_unknown_nested_key_is_named_with_its_section(section, key):
    data = base_dict()
    data.setdefault(section, {})[key] = 1
    with pytest.raises(FerryError, match=rf"{section}\.{key}\b"):
        train_config_from_dict(data)


def test_unknown_key_through_an_override():
    with pytest.raises(FerryError, match=r"optim\.lrr"):
        train_config_from_dict(base_dict(), ["optim.lrr=0.5"])


def test_overrides_apply_with_yaml_types():
    config = train_config_from_dict(base_dict(), [
        "optim.lr=0.5", "model.overrides.d_model=32", "optim.max_steps=77",
        "optim.schedule=linear", "data.max_source_len=16", "tokenizer.path=tok.json",
        "optim.betas=[0.8, 0.9]", "model.overrides.tie_embeddings=false", "seed=3",
    ])
    assert config.optim.lr == 0.5 and isinstance(config.optim.lr, float)
    assert config.model.overrides == {"dropout": 0.0, "d_model": 32, "tie_embeddings": False}
    assert config.optim.max_steps == 77 and isinstance(config.optim.max_steps, int)
    assert config.optim.schedule == "linear"
    assert config.data.max_source_len == 16
    assert config.tokenizer.path == "tok.json"
    assert config.optim.betas == (0.8, 0.9)
    assert config.seed == 3


def test_override_creates_missing_sections_and_ints_become_floats():
    config = train_config_from_dict({}, ["eval.every=5", "optim.lr=1"])
    assert config.eval.every == 5
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)


def test_overrides_do_not_change_the_input_dict():
    data = base_dict()
    train_config_from_dict(data, ["optim.lr=0.5", "model.overrides.d_model=32"])
    assert data == base_dict()


def test_override_needs_key_equals_value():
    with pytest.raises(FerryError, match="key=value"):
        train_config_from_dict(base_dict(), ["optim.lr"])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(FerryError, match="not a section"):
        train_config_from_dict(base_dict(), ["optim.lr.x=1"])


@pytest.mark.parametrize(("assignment", "key"), [
    ('optim.max_steps="abc"', "optim.max_steps"),
    ("optim.max_steps=abc", "optim.max_steps"),
    ("optim.max_steps=1.5", "optim.max_steps"),
    ("optim.max_steps=true", "optim.max_steps"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=true", "optim.lr"),
    ("seed=zero", "seed"),
    ("objective=3", "objective"),
])
def test_wrong_types_are_errors(assignment, key):
    with pytest.raises(FerryError, match=rf"config key {key} must be"):
        train_config_from_dict(base_dict(), [assignment])


def test_a_section_that_is_not_a_mapping():
    with pytest.raises(FerryError, match="optim must be a mapping"):
        train_config_from_dict({"optim": [1, 2]})


def test_missing_config_file(tmp_path):
    with pytest.raises(FerryError, match="does not exist"):
        load_train_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["optim: {lr: 0.1\nseed: 1\n", "a: b: c\n", "key: [unclosed\n"])
def test_invalid_yaml_file(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FerryError, match="not valid YAML") as info:
        load_train_config(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_non_utf8_yaml_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("out_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(FerryError, match="not valid YAML"):
        load_train_config(path)


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_train_config(path) == TrainConfig()


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_dict()))
    config = load_train_config(path, ["optim.lr=0.25"])
    assert config.optim.lr == 0.25
    assert config.model.preset == "tiny"


def test_save_writes_yaml_that_reloads_equal(tmp_path):
    config = train_config_from_dict(base_dict(), [
        "optim.betas=[0.85, 0.95]", "model.overrides.d_model=32", "tokenizer.path=t.json",
    ])
    path = tmp_path / "nested" / "config.yaml"
    config.save(path)
    raw = yaml.safe_load(path.read_text())
    assert raw["optim"]["lr"] == 0.01
    assert raw["model"]["overrides"]["d_model"] == 32
    reloaded = load_train_config(path)
    assert reloaded == config
    assert reloaded.optim.betas == (0.85, 0.95)
    # and the defaults round trip too
    TrainConfig().save(tmp_path / "defaults.yaml")
    assert load_train_config(tmp_path / "defaults.yaml") == TrainConfig()
