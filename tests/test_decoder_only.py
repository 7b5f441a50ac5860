"""Decoder-only language models through the runtime: prompt prefill then cached steps, on every
backend, with left-padded batches that decode exactly like single prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.model.checkpoint import load_checkpoint
from ferry.runtime import TaskModel, load
from ferry.runtime.parity import compare_backends, load_golden
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.task_data import write_task_data

PROMPTS = ["Ben was born in", "Grace Hopper studied music in Rome. Grace Hopper",
           "In 1990,", "Zoe"]


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory):
    data = tmp_path_factory.mktemp("stories")
    write_task_data(data, num_train=800, num_eval=40, seed=4)
    out = tmp_path_factory.mktemp("lm")
    config = {"objective": "causal_lm", "out_dir": str(out / "run"), "seed": 0,
              "model": {"preset": "tiny", "overrides": {"architecture": "decoder-only"}},
              "tokenizer": {"vocab_size": 400, "num_sentinels": 2},
              "data": {"train": str(data / "stories" / "train.jsonl"),
                       "eval": str(data / "stories" / "eval.jsonl"), "block_size": 48},
              "optim": {"lr": 0.003, "warmup_steps": 10, "max_steps": 60, "batch_size": 32},
              "eval": {"every": 60, "batch_size": 32}}
    result = train(train_config_from_dict(config), progress=False, log=lambda m: None)
    return export_bundle(result.checkpoint, out / "bundle", precisions=("fp32", "fused"),
                         log=lambda m: None)


def test_the_bundle_has_cached_generation_graphs_and_agrees_with_torch(lm_bundle):
    model = load(lm_bundle)
    assert isinstance(model, TaskModel) and set(model.graphs) == {"decoder_init", "decoder_step"}
    assert model.graphs["decoder_step"].spec.input_names[:2] == ["input_ids", "attention_mask"]
    models = {b: load(lm_bundle, backend=b) for b in ("torch", "onnxruntime")}
    (report,) = compare_backends({b: m.graphs for b, m in models.items()},
                                 golden=load_golden(model.bundle.file("golden")),
                                 special=model.special, vocab_size=model.model_config["vocab_size"])
    assert report.passed and report.sequences > 0, report.to_dict()
    assert all(d.max_abs <= 1e-4 for d in report.diffs)
    checks = check_bundle_for_tensorrt(model.bundle)  # TensorRT could build both graphs
    assert [c.graph for c in checks] == ["decoder_init", "decoder_step"]
    assert all(c.passed for c in checks), [c.problems for c in checks]


@pytest.mark.parametrize("settings", [
    {}, {"num_beams": 3}, {"do_sample": True, "top_k": 20, "seed": 3},
    {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}])
def test_every_mode_gives_the_same_continuations_on_every_backend(lm_bundle, settings):
    reference = load(lm_bundle, backend="torch").generate(PROMPTS, max_new_tokens=12, **settings)
    for backend, options in [("onnxruntime", {}), ("onnxruntime:fused", {}),
                             ("onnxruntime", {"io_binding": True}),
                             ("torch", {"static_cache": True})]:
        ours = load(lm_bundle, backend=backend, **options).generate(PROMPTS, max_new_tokens=12,
                                                                    **settings)
        assert ours == reference, (backend, options)


def test_a_padded_batch_continues_each_prompt_as_it_would_alone(lm_bundle):
    model = load(lm_bundle)
    batched = model.generate_ids(*model.generator.codec.encode(PROMPTS), max_new_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate_ids(*model.generator.codec.encode([prompt]), max_new_tokens=10)
        width = alone.shape[1]
        assert batched[i, :width].tolist() == alone[0].tolist()


def test_the_cached_continuation_matches_recomputing_the_whole_sequence(lm_bundle):
    model = load(lm_bundle)
    ids, mask = model.generator.codec.encode([PROMPTS[1]])
    continuation = model.generate_ids(ids, mask, max_new_tokens=8, min_new_tokens=8)[0]
    torch_model, _ = load_checkpoint(lm_bundle.parent / "run" / "checkpoint")
    sequence = torch.tensor(ids[0].tolist())
    for token in continuation:  # greedy without the cache: argmax of the full forward pass
        logits = torch_model(sequence[None])[0, -1]
        assert int(logits.argmax()) == int(token)
        sequence = torch.cat([sequence, torch.tensor([int(token)])])


def test_prompts_are_not_ended_and_limits_are_checked(lm_bundle):
    model = load(lm_bundle)
    ids, _ = model.generator.codec.encode(["Ben was born in"])
    eos = model.special.eos
    assert ids[0, -1] != eos  # a trailing </s> would end the text being continued
    with pytest.raises(FerryError, match="max_new_tokens"):
        model.generate(["Ben"], max_new_tokens=model.max_length)
    beams = model.generate(PROMPTS, max_new_tokens=5, num_beams=2, num_return_sequences=2)
    assert [len(b) for b in beams] == [2] * len(PROMPTS)
    stream = "".join(model.stream(PROMPTS[0], max_new_tokens=10))
    assert stream == model.generate([PROMPTS[0]], max_new_tokens=10)[0]


def test_cli_generate_verify_and_prompt_scoring(lm_bundle):
    from click.testing import CliRunner

    from ferry.cli import main

    out = CliRunner().invoke(main, ["generate", str(lm_bundle), "Ben was born in",
                                    "--max-new-tokens", "6"])
    assert out.exit_code == 0 and out.output.strip() == load(lm_bundle).generate(
        ["Ben was born in"], max_new_tokens=6)[0].strip()
    out = CliRunner().invoke(main, ["verify", str(lm_bundle)])
    assert out.exit_code == 0 and "greedy tokens identical" in out.output
    scores = load(lm_bundle).classify(["Ben was born in Oslo."], prompt="{text} It is {label}",
                                      labels="a,b")
    assert np.isclose(sum(scores[0]["scores"].values()), 1.0)
