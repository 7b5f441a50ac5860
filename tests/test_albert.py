"""ALBERT's two ideas as options of the one config — factorised embeddings and layers sharing
their weights — trained by ferry: a classifier learns, exports with its weights once, classifies
through the runtime as torch does, and publishes as an ALBERT that `transformers` computes the
same."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
import transformers

from ferry.export import export_bundle
from ferry.export.hf_export import export_hf
from ferry.model import Transformer, load_checkpoint, preset
from ferry.runtime import Bundle, load
from ferry.runtime.bisect import bisect
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.datasets.task_data import write_task_data

ALBERT = {"embedding_size": 32, "layer_groups": 1, "num_encoder_layers": 3,
          "activation": "gelu_tanh", "embedding_norm": "layernorm", "positional": "learned",
          "embedding_scale": "none"}  # no segments: published with one zero row
TEXTS = ["We met on 3 July 1999.", "Snow fell on 2 January 2004.", "Leaves on October 9th"]


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A seasons classifier with ALBERT's options, trained from scratch (120 steps)."""
    root = tmp_path_factory.mktemp("albert")
    write_task_data(root / "tasks", num_train=600, num_eval=60, seed=3)
    tasks = root / "tasks" / "seasons"
    config = {"seed": 0, "out_dir": str(root / "run"), "objective": "classification",
              "model": {"preset": "tiny", "overrides": {
                  "architecture": "encoder-only", "num_decoder_layers": 0, "dropout": 0.0,
                  **ALBERT}},
              "tokenizer": {"vocab_size": 400, "num_sentinels": 4},
              "data": {"train": str(tasks / "train.csv"), "eval": str(tasks / "eval.csv"),
                       "max_source_len": 48},
              "optim": {"max_steps": 120, "lr": 2e-3, "warmup_steps": 10, "batch_size": 16},
              "eval": {"every": 120, "batch_size": 32}, "log": {"every": 10}}
    return train(train_config_from_dict(config), progress=False, log=quiet)


def test_shared_layers_are_one_module_and_embeddings_are_factorised():
    config = preset("tiny", architecture="encoder-only", num_decoder_layers=0, vocab_size=100,
                    **ALBERT)
    model = Transformer(config)
    assert len(model.encoder.layers) == 1 and model.encoder.depth == 3
    assert model.embedding.tokens.weight.shape == (100, 32)
    assert model.encoder.embed.project.weight.shape == (config.d_model, 32)
    unshared = Transformer(preset("tiny", **{**config.to_dict(), "layer_groups": 0}))
    layer = sum(p.numel() for p in model.encoder.layers[0].parameters())
    assert (sum(p.numel() for p in unshared.parameters())
            - sum(p.numel() for p in model.parameters())) == 2 * layer


def test_an_albert_classifier_learns_exports_and_publishes(classifier, tmp_path):
    history = [r["train_loss"] for r in classifier.history if "train_loss" in r]
    assert np.mean(history[-3:]) < np.mean(history[:3]) - 0.2, history
    assert classifier.final_metrics["accuracy"] > 0.4  # 4 seasons: chance is 0.25
    bundle = export_bundle(classifier.checkpoint, tmp_path / "bundle",
                           precisions=("fp32", "fused", "int8"), log=quiet)
    for file in ("head.onnx", "head.fused.onnx", "head.int8.onnx"):
        head = onnx.load(str(bundle / file)).graph
        uses = Counter(name for node in head.node for name in node.input)
        matrices = [t.name for t in head.initializer if len(t.dims) == 2]
        # one layer's q, k, v, out, FFN up and down, each one initializer read by all 3 layers
        # (the fused graph, and int8 made from it, packs q, k and v into one matrix)
        per_layer = 6 if file == "head.onnx" else 4
        assert sum(uses[name] == 3 for name in matrices) == per_layer, (file, matrices)
        assert all(uses[name] in (1, 3) for name in matrices), file
    # every application of the shared layer is probed on its own (layer_0 … layer_2)
    bisection = bisect(Bundle.open(bundle), "torch", "onnxruntime:fp32",
                       workdir=tmp_path / "bisect")
    assert bisection.passed, bisection.format_table()
    assert {f"probe.encoder.layer_{i}.ffn" for i in range(3)} <= {d.name for d in
                                                                  bisection.diffs}
    results = [load(bundle, backend).classify(TEXTS)
               for backend in ("onnxruntime", "onnxruntime:int8", "torch")]
    assert [r["label"] for r in results[0]] == [r["label"] for r in results[2]]
    assert np.allclose([r["score"] for r in results[0]], [r["score"] for r in results[2]],
                       atol=1e-5)
    assert [r["label"] for r in results[1]] == [r["label"] for r in results[2]]
    # published as ALBERT: transformers computes ferry's logits
    out = export_hf(classifier.checkpoint, tmp_path / "hf", log=quiet)
    reloaded = transformers.AlbertForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_groups == 1 and reloaded.config.embedding_size == 32
    model = load_checkpoint(classifier.checkpoint)[0]
    encoded = transformers.AutoTokenizer.from_pretrained(out)(TEXTS, padding=True,
                                                             return_tensors="pt")
    with torch.no_grad():
        expected = reloaded(input_ids=encoded["input_ids"],
                            attention_mask=encoded["attention_mask"]).logits
        ours = model.head_logits(encoded["input_ids"], encoded["attention_mask"])
    assert torch.allclose(ours, expected, atol=1e-5)
