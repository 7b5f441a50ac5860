"""Every example config loads, names a known objective, and fits its model architecture."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.model import preset
from ferry.train import load_train_config
from ferry.train.objectives import all_objectives, objective_class

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid(path):
    config = load_train_config(path)
    objective = objective_class(config.objective)
    model = preset(config.model.preset, **config.model.overrides)
    assert model.architecture in objective.architectures
    assert config.data.train and config.data.eval


def test_there_is_an_example_per_objective_and_task():
    names = {load_train_config(p).objective for p in EXAMPLES}
    assert set(all_objectives()) == names
    pairs = [load_train_config(p) for p in EXAMPLES if load_train_config(p).data.pair_field]
    assert pairs, "an example of sentence-pair classification"
