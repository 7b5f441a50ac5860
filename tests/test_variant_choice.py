"""The default CPU variant is this machine's faster one: `load` times the fused and portable fp32
graphs at a bundle's first load, records the choice per machine and bundle, and follows the
record afterwards; `FERRY_CPU_VARIANT` pins one; `ferry tune` measures again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferry.cli import main
from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.runtime import Bundle, load, variant_choice
from ferry.runtime.variant_choice import CANDIDATES, RECORD_FILE, VariantTiming, measure


@pytest.fixture(scope="module")
def both_variants(demo_variants_bundle) -> Path:
    """The demo model's bundle: fused and portable fp32 graphs (and other variants). Read-only."""
    return demo_variants_bundle


@pytest.fixture
def measuring(monkeypatch, tmp_path) -> Path:
    """No pinned variant; records go to a fresh cache directory (returned)."""
    monkeypatch.delenv("FERRY_CPU_VARIANT", raising=False)
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def recorded(cache: Path) -> dict:
    return json.loads((cache / RECORD_FILE).read_text())


def label(variant: str) -> str:
    return "onnxruntime" if variant == "fp32" else f"onnxruntime:{variant}"


def test_the_first_load_measures_both_variants_and_records_the_faster(both_variants, measuring):
    model = load(both_variants)
    (key, entry), = recorded(measuring).items()
    assert entry["chosen"] in CANDIDATES
    assert model.backend == label(entry["chosen"])
    assert set(entry["seconds"]) == set(CANDIDATES)
    assert entry["batches"] == [1, 8]
    assert all(len(s) == 2 and min(s) > 0 for s in entry["seconds"].values())
    scores = {v: sum(np.log(s)) for v, s in entry["seconds"].items()}
    assert entry["chosen"] == min(CANDIDATES, key=lambda v: (scores[v], CANDIDATES.index(v)))
    assert key.startswith(entry["machine"]) and "onnxruntime=" in key
    ids, mask = model.codec.encode(["March 5, 2021"])
    assert model.generate_ids(ids, mask, max_new_tokens=6).shape[0] == 1
    assert "int8" in Bundle.open(both_variants).precisions  # not a candidate: precision differs


def test_later_loads_follow_the_record_without_measuring(both_variants, measuring, monkeypatch):
    load(both_variants)
    record = recorded(measuring)
    (key, entry), = record.items()
    other = next(v for v in CANDIDATES if v != entry["chosen"])
    entry["chosen"] = other  # as if the other had been faster here
    (measuring / RECORD_FILE).write_text(json.dumps(record))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again although a choice was recorded")

    monkeypatch.setattr(variant_choice, "measure", no_measuring)
    assert load(both_variants).backend == label(other)
    assert recorded(measuring) == record


def test_a_damaged_record_is_measured_again(both_variants, measuring):
    measuring.mkdir(parents=True)
    (measuring / RECORD_FILE).write_text("{not json")
    load(both_variants)
    assert len(recorded(measuring)) == 1


def test_the_record_is_per_thread_count(both_variants, measuring):
    load(both_variants, intra_op_threads=1)
    load(both_variants, intra_op_threads=2)
    load(both_variants, intra_op_threads=1)  # recorded already
    keys = list(recorded(measuring))
    assert len(keys) == 2
    assert sum("threads=1 " in k for k in keys) == 1 and sum("threads=2 " in k for k in keys) == 1


class SleepingGenerator:
    """Stands in for a loaded model: each generate_ids call sleeps `seconds` per row."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.vocab_size = seconds, 100
        self.codec = type("Codec", (), {"max_length": 64})()

    def generate_ids(self, ids, mask, **settings):
        time.sleep(self.seconds)
        return ids


def test_the_faster_variant_is_chosen_whichever_it_is_and_by_how_much():
    slow, fast = SleepingGenerator(0.02), SleepingGenerator(0.001)  # far apart: no flakes
    timing = measure({"fused": slow, "fp32": fast}, "machine", rounds=2)
    assert timing.chosen == "fp32"
    assert timing.speedup() > 2.0
    assert all(s >= 0.02 for s in timing.seconds["fused"])
    tie = VariantTiming("fused", (1,), {"fused": [0.1], "fp32": [0.1]}, "m", "now")
    assert tie.speedup() == 1.0
    timing = measure({"fused": fast, "fp32": slow}, "machine", rounds=2)
    assert timing.chosen == "fused"


def test_a_pinned_or_named_variant_is_loaded_without_measuring(both_variants, measuring,
                                                                 monkeypatch):
    monkeypatch.setenv("FERRY_CPU_VARIANT", "fp32")
    assert load(both_variants).backend == "onnxruntime"
    monkeypatch.delenv("FERRY_CPU_VARIANT")
    assert load(both_variants, "onnxruntime:fused").backend == "onnxruntime:fused"
    assert load(both_variants, precision="fp32").backend == "onnxruntime"
    assert not (measuring / RECORD_FILE).exists()
    monkeypatch.setenv("FERRY_CPU_VARIANT", "int8")
    with pytest.raises(FerryError, match="FERRY_CPU_VARIANT='int8': expected one of"):
        load(both_variants)


def test_a_bundle_with_one_fp32_variant_loads_it_without_measuring(tiny_bundle, measuring):
    assert "fused" not in Bundle.open(tiny_bundle).precisions
    assert load(tiny_bundle).backend == "onnxruntime"
    assert not (measuring / RECORD_FILE).exists()


def test_an_unwritable_cache_directory_costs_only_the_record(both_variants, measuring,
                                                             monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FERRY_CACHE_DIR", str(blocker / "cache"))  # under a file: not creatable
    assert load(both_variants).backend in {label(v) for v in CANDIDATES}


def test_an_encoder_only_bundle_is_timed_on_its_single_pass(task_bundles, both_variants,
                                                           tmp_path, measuring):
    checkpoint = task_bundles["classify"].parent / "checkpoint"
    bundle = export_bundle(checkpoint, tmp_path / "classify", precisions=("fp32", "fused"),
                           log=lambda m: None)
    model = load(bundle)
    (entry,) = recorded(measuring).values()
    assert model.backend == label(entry["chosen"])
    load(both_variants)  # other graphs: measured and recorded apart
    assert len(recorded(measuring)) == 2
    assert [result["label"] for result in model.classify(["a short text"])][0] in {"neg", "pos"}


def test_tune_measures_again_prints_the_timings_and_records(both_variants, measuring):
    for _ in range(2):
        result = CliRunner().invoke(main, ["tune", str(both_variants), "--threads", "1"])
        assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "threads=1" in lines[0]
    assert lines[1].split() == ["variant", "batch", "1", "ms", "batch", "8", "ms"]
    assert sorted(line.split()[0] for line in lines[2:4]) == sorted(CANDIDATES)
    (entry,) = recorded(measuring).values()
    assert lines[4].startswith(f"chosen: {entry['chosen']} (")
    assert [float(v) for v in lines[2].split()[1:]] == pytest.approx(
        [1000 * s for s in entry["seconds"][lines[2].split()[0]]], abs=0.01)


def test_tune_refuses_a_bundle_without_both_variants(tiny_bundle, measuring):
    result = CliRunner().invoke(main, ["tune", str(tiny_bundle)])
    assert result.exit_code == 2
    assert "carries no fused graphs" in result.stderr
