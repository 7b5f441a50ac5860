"""`ferry explain` / `ferry.runtime.explain`: every layer's attention probabilities, equal on torch
and ONNX Runtime, for the three architectures."""

from __future__ import annotations

import json

import hf_families
import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from ferry.cli import main
from ferry.model import Transformer
from ferry.model.hf_checkpoint import read_hf_model
from ferry.runtime import Bundle, load
from ferry.runtime.explain import attention_maps

TEXT = "Returns the sum of 5, 2021."


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def both_backends(bundle, text: str, tmp_path):
    opened = Bundle.open(bundle)
    return [attention_maps(opened, text, workdir=tmp_path / name, backend=name,
                           max_new_tokens=6) for name in ("torch", "onnxruntime")]


def assert_probabilities(maps) -> None:
    """Every map is a distribution over keys per query; causal self-attention sees no future."""
    for name, values in maps.maps.items():
        heads, queries, keys = values.shape
        assert (len(maps.axes(name)[0]), len(maps.axes(name)[1])) == (queries, keys), name
        assert np.allclose(values.sum(-1), 1.0, atol=1e-5) and (values >= 0).all(), name
        if name.startswith("decoder.") and name.endswith("self_attention"):
            assert np.abs(np.triu(values, k=1)).max() < 1e-6, name  # (heads, T, T)


@pytest.mark.parametrize("which", ["tiny", "t5", "llama", "classify"])
def test_attention_maps_agree_across_backends(which, tiny_bundle, modern_bundle, task_bundles,
                                              tmp_path):
    bundle = {"tiny": lambda: tiny_bundle, "classify": lambda: task_bundles["classify"]}.get(
        which, lambda: modern_bundle(which))()
    reference, onnx = both_backends(bundle, TEXT, tmp_path)
    assert reference.source == onnx.source and reference.target == onnx.target
    assert set(reference.maps) == set(onnx.maps) and reference.maps
    for name in reference.maps:
        assert np.abs(reference.maps[name] - onnx.maps[name]).max() < 1e-5, name
    assert_probabilities(onnx)
    kinds = {"tiny": ["encoder.attention", "decoder.self_attention", "decoder.cross_attention"],
             "t5": ["encoder.attention", "decoder.self_attention", "decoder.cross_attention"],
             "llama": ["decoder.self_attention"], "classify": ["encoder.attention"]}[which]
    assert onnx.kinds == kinds
    if which == "llama":  # the prompt and its continuation, one sequence
        prompt = load(bundle).as_generator().encode([TEXT])[1].sum()
        assert prompt < len(onnx.source) <= prompt + 6 and not onnx.target


def test_explain_writes_heatmaps_and_numbers(tiny_bundle, tmp_path):
    out = tmp_path / "maps"
    result = invoke("explain", tiny_bundle, "March 5, 2021", "--out", out, "--layer", "1",
                    "--head", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["head"] == 0 and data["layer"] == 1
    assert set(data["maps"]) == {"encoder.layer_1.attention", "decoder.layer_1.self_attention",
                                 "decoder.layer_1.cross_attention"}
    cross = data["maps"]["decoder.layer_1.cross_attention"]
    assert np.asarray(cross["probabilities"]).shape == (len(data["target"]),
                                                        len(data["source"]))
    assert cross["queries"] == data["target"] and cross["keys"] == data["source"]
    assert json.loads((out / "attention.json").read_text()) == data
    for name in ("encoder_attention", "decoder_self_attention", "decoder_cross_attention"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5_000


def test_explain_refuses_bad_requests_in_one_line(tiny_bundle, tmp_path):
    layer = invoke("explain", tiny_bundle, "x", "--out", tmp_path / "a", "--layer", "9")
    assert layer.exit_code == 2 and "--layer 9 is out of range" in layer.output
    assert not (tmp_path / "a").exists()
    head = invoke("explain", tiny_bundle, "x", "--out", tmp_path / "b", "--head", "-1")
    assert head.exit_code == 2 and "--head -1 is out of range" in head.output
    fused = invoke("explain", tiny_bundle, "x", "--backend", "onnxruntime:int8")
    assert fused.exit_code == 2 and "portable fp32 graphs" in fused.output


@pytest.mark.parametrize("family", ["bert", "bart", "llama", "t5"])
def test_torch_attention_probabilities_match_transformers(family, tmp_path):
    """`Transformer.attention_probabilities` of an imported checkpoint is what `transformers`
    returns with `output_attentions=True` (eager attention), layer by layer, padding included."""
    make, hf_class = {
        "bert": (hf_families.bert, "BertForMaskedLM"),
        "bart": (hf_families.bart, "BartForConditionalGeneration"),
        "llama": (lambda d: hf_families.llama_like(d, "llama", "LlamaForCausalLM"),
                  "LlamaForCausalLM"),
        "t5": (hf_families.t5, "T5ForConditionalGeneration")}[family]
    directory = make(tmp_path / family) if family != "bert" else make(tmp_path / family,
                                                                        hf_class)
    theirs = getattr(transformers, hf_class).from_pretrained(
        directory, attn_implementation="eager").eval()
    imported = read_hf_model(directory)
    ours = Transformer(imported.config).eval()
    ours.load_state_dict(imported.state)
    ids = torch.randint(5, imported.config.vocab_size, (2, 7), generator=torch.Generator()
                        .manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    if family == "llama":  # left padding, as a decoder-only batch is fed
        mask = mask.flip(1)
    target = ids[:, :4] if imported.config.architecture == "encoder-decoder" else None
    with torch.no_grad():
        got = ours.attention_probabilities(ids, mask, target)
        out = theirs(input_ids=ids, attention_mask=mask, output_attentions=True,
                     **({"decoder_input_ids": target} if target is not None else {}))
    expected = {}
    if target is None:
        stack = "encoder" if family == "bert" else "decoder"
        kind = "attention" if family == "bert" else "self_attention"
        expected = {f"{stack}.layer_{i}.{kind}": a for i, a in enumerate(out.attentions)}
    else:
        for i, (enc, dec, cross) in enumerate(zip(out.encoder_attentions,
                                                  out.decoder_attentions,
                                                  out.cross_attentions)):
            expected.update({f"encoder.layer_{i}.attention": enc,
                             f"decoder.layer_{i}.self_attention": dec,
                             f"decoder.layer_{i}.cross_attention": cross})
    assert set(got) == set(expected)
    # (B, nh, T, S): a single-stack model's padded query rows are nobody's business
    rows = mask.bool()[:, None, :, None] if target is None else torch.ones(1, dtype=torch.bool)
    for name, theirs_map in expected.items():
        difference = (got[name] - theirs_map).abs()
        assert difference.masked_select(rows.expand_as(difference)).max() < 1e-5, name
