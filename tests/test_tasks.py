"""Fine-tuning tasks end to end: each head trains above its trivial baseline, exports, and runs
through `ferry.runtime` on ONNX Runtime with the same answers as torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ferry.export import export_bundle
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.runtime import Bundle, TaskModel, load
from ferry.runtime.parity import compare_backends, load_golden
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.task_data import write_task_data


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tasks")
    write_task_data(directory, num_train=1500, num_eval=150, seed=3)
    return directory


def task_config(data: Path, out: Path, objective: str, task: str, *, steps: int,
                arch: str = "encoder-only", **data_section) -> dict:
    suffix = "csv" if task == "seasons" else "jsonl"
    return {
        "objective": objective, "out_dir": str(out), "seed": 0,
        "model": {"preset": "tiny", "overrides": {"architecture": arch}},
        "tokenizer": {"vocab_size": 500, "num_sentinels": 4},
        "data": {"train": str(data / task / f"train.{suffix}"),
                 "eval": str(data / task / f"eval.{suffix}"), "max_source_len": 96,
                 **data_section},
        "optim": {"lr": 0.003, "warmup_steps": 20, "max_steps": steps, "batch_size": 32},
        "eval": {"every": steps, "batch_size": 150},
        "log": {"every": 10},
    }


TASKS = {
    "seasons": dict(objective="classification", task="seasons", steps=150),
    # learns only with more steps than a test affords (examples/pair_classification.yaml):
    # here it proves the pair path (segment ids) trains, exports and agrees across backends
    "same_day": dict(objective="classification", task="same_day", steps=40,
                     pair_field="text_pair"),
    "seasons_decoder": dict(objective="classification", task="seasons", steps=150,
                            arch="decoder-only"),
    "entities": dict(objective="token_classification", task="entities", steps=120),
    "qa": dict(objective="question_answering", task="qa", steps=300),
}


@pytest.fixture(scope="module")
def runs(task_data, tmp_path_factory):
    """name → (TrainResult, bundle path) for every task head (about a minute in all)."""
    results = {}
    for name, spec in TASKS.items():
        out = tmp_path_factory.mktemp(name)
        config = train_config_from_dict(task_config(task_data, out / "run", **spec))
        result = train(config, progress=False, log=lambda message: None)
        # the seasons heads (encoder-only, decoder-only) also with the fused graphs, which
        # `load` then runs by default: the tests below that compare onnxruntime with torch
        # check those too
        precisions = ("fp32", "fused") if name.startswith("seasons") else ("fp32",)
        bundle = export_bundle(result.best_checkpoint, out / "bundle", precisions=precisions,
                               log=lambda m: None)
        results[name] = (result, bundle)
    return results


@pytest.mark.parametrize("name", [name for name in TASKS if name != "same_day"])
def test_each_task_learns_beyond_its_trivial_baseline(runs, name):
    result, _ = runs[name]
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    metric = {"classification": "accuracy", "token_classification": "entity_f1",
              "question_answering": "exact_match"}[TASKS[name]["objective"]]
    assert result.best_metrics[metric] > result.baseline[metric] + 0.1


@pytest.mark.parametrize("name", list(TASKS))
def test_each_head_exports_and_onnxruntime_agrees_with_torch_on_padded_batches(runs, name):
    _, bundle = runs[name]
    # the portable graphs, and the fused ones where the bundle has them
    backends = ["torch", "onnxruntime:fp32"]
    if "fused" in Bundle.open(bundle).precisions:
        backends.append("onnxruntime:fused")
        assert load(bundle).backend == "onnxruntime:fused"  # the default on a CPU
    models = {b: load(bundle, backend=b) for b in backends}
    first = models["torch"]
    reports = compare_backends({b: m.graphs for b, m in models.items()},
                               golden=load_golden(first.bundle.file("golden")),
                               special=first.special,
                               vocab_size=first.model_config["vocab_size"])
    assert len(reports) == len(backends) - 1
    for report in reports:
        assert report.passed, report.to_dict()
        assert all(d.max_abs <= 1e-4 for d in report.diffs)
        assert report.identical_sequences == report.sequences > 0
    checks = check_bundle_for_tensorrt(first.bundle)  # TensorRT could build every graph
    assert checks and all(c.passed for c in checks), [c.problems for c in checks]


def test_classify_gives_the_same_labels_and_scores_on_both_backends(runs):
    texts = ["Ben arrives on 3 July 1999.", "Zoe arrives on 12/24/2001.", "Olga arrives on "
             "15th of April, 1950.", "Hugo arrives on oct 9 1921."]  # different lengths: padding
    for name in ("seasons", "seasons_decoder"):
        bundle = runs[name][1]
        torch_results = load(bundle, backend="torch").classify(texts)
        ort_results = load(bundle, backend="onnxruntime").classify(texts)
        assert [r["label"] for r in torch_results] == [r["label"] for r in ort_results]
        for a, b in zip(torch_results, ort_results):
            assert np.allclose(list(a["scores"].values()), list(b["scores"].values()), atol=1e-5)
            assert set(a["scores"]) == {"autumn", "spring", "summer", "winter"}
    summer = load(runs["seasons"][1]).classify(["Ben arrives on 3 July 1999."])[0]
    assert summer["label"] == "summer"


def test_pair_classification_reads_segment_ids(runs):
    bundle = runs["same_day"][1]
    model = load(bundle)
    assert "token_type_ids" in model.graphs["head"].spec.input_names
    assert model.task["pairs"] is True
    with pytest.raises(Exception, match="pair"):
        model.classify(["March 5, 2021"])
    results = model.classify(["March 5, 2021", "1.2.1990"], ["5.3.2021", "March 9, 1870"])
    assert {r["label"] for r in results} <= {"same", "different"}


def test_tag_and_answer_match_torch_and_return_spans(runs):
    tag_bundle, qa_bundle = runs["entities"][1], runs["qa"][1]
    sentences = ["Grace Hopper flew to Oslo on May 2, 1950 .", "We saw Ben near the station ."]
    tagged = load(tag_bundle).tag(sentences)
    assert tagged == load(tag_bundle, backend="torch").tag(sentences)
    assert {"type": "PER", "text": "Grace Hopper", "start": 0, "end": 2} in tagged[0]["entities"]
    assert len(tagged[1]["tags"]) == len(tagged[1]["words"]) == 7

    context = "Ben was born in Oslo on 1 May 1990. Zoe was born in Rome on 2 May 1991."
    questions = ["Where was Zoe born?", "When was Ben born?"]
    answers = load(qa_bundle).answer(questions, [context] * 2)
    reference = load(qa_bundle, backend="torch").answer(questions, [context] * 2)
    assert [a["answer"] for a in answers] == [a["answer"] for a in reference]
    for a in answers:
        assert context[a["start"] : a["end"]] == a["answer"]


def test_a_context_longer_than_the_model_is_read_in_overlapping_windows(runs):
    """QA beyond the model's positions: the answer in a late window is found, with offsets into
    the whole context, as in the short context."""
    model = load(runs["qa"][1])
    fact = "Zoe was born in Rome on 2 May 1991."
    filler = " ".join(["x"] * 300)  # nothing a QA model could take for an answer
    context = f"{filler} {fact}"
    assert len(model.tokenizer.encode(context).ids) > 2 * model.max_length
    short = model.answer("Where was Zoe born?", fact)[0]
    (long,) = model.answer(["Where was Zoe born?"], [context], stride=16)
    assert long["answer"] == short["answer"]
    assert context[long["start"] : long["end"]] == long["answer"]
    assert long["start"] > len(filler)


def test_prompt_classification_fine_tunes_the_lm_and_serves_the_stored_prompt(task_data,
                                                                            tmp_path):
    config = task_config(task_data, tmp_path / "run", "prompt_classification", "seasons",
                         steps=150)
    config["prompt"] = {"template": "{text} It is {label}.",
                        "labels": ["winter", "spring", "summer", "autumn"]}
    result = train(train_config_from_dict(config), progress=False, log=lambda m: None)
    assert result.best_metrics["accuracy"] > result.baseline["accuracy"] + 0.1
    bundle = export_bundle(result.best_checkpoint, tmp_path / "bundle", log=lambda m: None)
    model = load(bundle)
    assert isinstance(model, TaskModel) and list(model.graphs) == ["lm"]
    texts = ["Ben arrives on 3 July 1999.", "Zoe arrives on 12/24/2001."]
    ours, reference = model.classify(texts), load(bundle, backend="torch").classify(texts)
    assert [r["label"] for r in ours] == [r["label"] for r in reference]
    # another verbalizer over the same LM: labels named apart from the words they score
    other = model.classify(texts, prompt="{text} It is {label}.",
                           labels="cold=winter,warm=summer")
    assert {r["label"] for r in other} <= {"cold", "warm"}


def test_cli_classify_tag_answer(runs, tmp_path):
    from click.testing import CliRunner

    from ferry.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["classify", str(runs["seasons"][1]), "Ben arrives on 3 July 1999.",
                               "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["label"] in {"autumn", "spring", "summer", "winter"}
    out = runner.invoke(main, ["tag", str(runs["entities"][1]), "Ben flew to Oslo ."])
    assert out.exit_code == 0 and "Ben/B-PER" in out.output
    out = runner.invoke(main, ["answer", str(runs["qa"][1]), "--question", "Where was Ben born?",
                               "--context", "Ben was born in Oslo on 1 May 1990."])
    assert out.exit_code == 0 and out.output.strip()
    out = runner.invoke(main, ["answer", str(runs["qa"][1]), "--question", "a?"])
    assert out.exit_code == 2
    out = runner.invoke(main, ["tag", str(runs["seasons"][1]), "Ben flew to Oslo ."])
    assert out.exit_code == 2 and "token_classification" in out.output


def test_a_causal_lm_bundle_classifies_zero_and_few_shot_alike_on_both_backends(task_data,
                                                                                tmp_path):
    from ferry.errors import FerryError

    config = task_config(task_data, tmp_path / "run", "causal_lm", "stories", steps=30,
                         arch="decoder-only", block_size=48)
    result = train(train_config_from_dict(config), progress=False, log=lambda m: None)
    bundle = export_bundle(result.checkpoint, tmp_path / "bundle", log=lambda m: None)
    model, reference = load(bundle), load(bundle, backend="torch")
    assert set(model.graphs) == {"decoder_init", "decoder_step"}  # scores and generates
    texts = ["Ben was born in Oslo on 3 July 1999.", "Zoe studied music in Rome."]
    shots = [("Hugo wrote three novels.", None, "books"), ("Rosa studied music.", None, "music")]
    for kwargs in ({}, {"examples": shots}):
        ours = model.classify(texts, prompt="{text} Topic: {label}", labels="books,music",
                              **kwargs)
        theirs = reference.classify(texts, prompt="{text} Topic: {label}", labels="books,music",
                                    **kwargs)
        assert [r["label"] for r in ours] == [r["label"] for r in theirs]
        for a, b in zip(ours, theirs):
            assert abs(a["scores"]["books"] - b["scores"]["books"]) < 1e-5
    with pytest.raises(FerryError, match="no 'head' graph"):
        model.tag(["Ben ran ."])
    with pytest.raises(FerryError, match="template and labels"):
        model.classify(texts)


def test_fine_tuning_a_pretrained_encoder_reuses_it_and_replaces_a_head(task_data, tmp_path):
    from ferry.model.checkpoint import read_checkpoint_config

    pretrain = task_config(task_data, tmp_path / "pre", "masked_lm", "stories", steps=20,
                           block_size=32)
    pretrained = train(train_config_from_dict(pretrain), progress=False, log=lambda m: None)
    messages: list[str] = []
    config = task_config(task_data, tmp_path / "ft", "classification", "seasons", steps=20)
    config["model"] = {"init_from": str(pretrained.checkpoint)}
    tuned = train(train_config_from_dict(config), progress=False, log=messages.append)
    assert any("initialised from" in m and "new" in m for m in messages)
    assert (tuned.run_dir / "tokenizer.json").read_text() == \
        (pretrained.checkpoint / "tokenizer.json").read_text()
    saved = read_checkpoint_config(tuned.checkpoint)
    assert saved["model"]["task_head"] == "sequence_classification"
    assert saved["model"]["num_labels"] == 4 and len(saved["task"]["labels"]) == 4

    # the classifier again, for five labels: its head is replaced, the encoder kept
    messages.clear()
    config = task_config(task_data, tmp_path / "ft5", "classification", "seasons", steps=5,
                         labels=["autumn", "monsoon", "spring", "summer", "winter"])
    config["model"] = {"init_from": str(tuned.checkpoint)}
    train(train_config_from_dict(config), progress=False, log=messages.append)
    assert any("the task head is new" in m for m in messages)
