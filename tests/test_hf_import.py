"""Hugging Face checkpoints in and out: every family and head imported exactly (against
`transformers` itself, on padded batches), exported to ONNX bundles whose every fp32 variant
agrees, generating what `generate()` generates, written back so `transformers` loads the same
model, and every malformed input refused by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from click.testing import CliRunner
from hf_families import BUILDERS, POSITIONS
from safetensors.torch import load_file, save_file

from ferry.cli import main
from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.export.hf_export import export_hf
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.model import load_checkpoint
from ferry.runtime import Bundle, decoding_state, load
from ferry.runtime.recurrence import empty_memory, has_memory
from ferry.train.hf_import import import_hf

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return a new list of items",
         "hello", "Parse the command line, then print what it found."]
PAIRS = ["It was quick.", "a list", "hi there", "It prints nothing."]
RELATIVE = 1e-5  # logits agree within this share of their largest magnitude

# (family, model class): every head ferry imports
CLASSES = [
    ("bert", "BertForPreTraining"), ("bert", "BertForMaskedLM"),
    ("bert", "BertForNextSentencePrediction"), ("bert", "BertForSequenceClassification"),
    ("bert", "BertForTokenClassification"), ("bert", "BertForQuestionAnswering"),
    ("bert", "BertModel"),
    ("albert", "AlbertForPreTraining"), ("albert", "AlbertForMaskedLM"),
    ("albert", "AlbertForSequenceClassification"), ("albert", "AlbertForTokenClassification"),
    ("albert", "AlbertForQuestionAnswering"),
    ("xlnet", "XLNetLMHeadModel"), ("xlnet", "XLNetForSequenceClassification"),
    ("xlnet", "XLNetForTokenClassification"), ("xlnet", "XLNetForQuestionAnsweringSimple"),
    ("xlnet", "XLNetModel"),
    ("roberta", "RobertaForMaskedLM"), ("roberta", "RobertaForSequenceClassification"),
    ("roberta", "RobertaForTokenClassification"), ("roberta", "RobertaForQuestionAnswering"),
    ("gpt2", "GPT2LMHeadModel"), ("gpt2", "GPT2ForSequenceClassification"),
    ("bart", "BartForConditionalGeneration"), ("mbart", "MBartForConditionalGeneration"),
    ("marian", "MarianMTModel"),
    ("t5", "T5ForConditionalGeneration"), ("flan-t5", "T5ForConditionalGeneration"),
    ("llama", "LlamaForCausalLM"), ("llama", "LlamaForSequenceClassification"),
    ("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
]
SEQ2SEQ = ("bart", "mbart", "marian", "t5", "flan-t5")
DECODER_ONLY = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
PAIRED = ("bert", "albert", "xlnet")  # read sentence pairs in segments


def build(family: str, model_class: str, directory: Path) -> Path:
    kwargs = {} if family in SEQ2SEQ else {"model_class": model_class}
    return BUILDERS[family](directory, **kwargs)


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(family, class) → (HF directory, ferry checkpoint), made on first use."""
    root = tmp_path_factory.mktemp("hf")
    made: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(family: str, model_class: str) -> tuple[Path, Path]:
        if (family, model_class) not in made:
            hf_dir = build(family, model_class, root / f"{family}-{model_class}")
            made[family, model_class] = hf_dir, import_hf(hf_dir,
                                                          root / f"{family}-{model_class}-ferry",
                                                          log=quiet)
        return made[family, model_class]

    return get


def hf_inputs(hf_dir: Path, *, pairs: bool = False, left: bool = False) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if left:  # else the tokenizer's own side (XLNet's: left, where its classifier reads)
        tokenizer.padding_side = "left"
    return dict(tokenizer(TEXTS, PAIRS if pairs else None, padding=True, return_tensors="pt"))


def hf_outputs(model, inputs: dict, family: str) -> dict[str, torch.Tensor]:
    """The HF model's outputs under ferry's graph output names."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            decoder = torch.randint(3, 200, (len(TEXTS), 6),
                                    generator=torch.Generator().manual_seed(0))
            out = model(**inputs, decoder_input_ids=decoder)
            return {"decoder_input_ids": decoder, "logits": out.logits}
        if family in DECODER_ONLY and "attention_mask" in inputs:  # as generate() numbers them
            positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            out = model(**inputs, position_ids=positions)
        else:
            out = model(**inputs)
    names = {"prediction_logits": "lm", "seq_relationship_logits": "head", "sop_logits": "head",
             "logits": "logits",
             "start_logits": "start_logits", "end_logits": "end_logits",
             "last_hidden_state": "hidden"}
    return {names[k]: v for k, v in out.items() if k in names}


def assert_close(ours: np.ndarray | torch.Tensor, reference: torch.Tensor, mask=None) -> float:
    """Within RELATIVE × max|reference| on the real (unpadded) positions; returns max |Δ|."""
    ours, reference = torch.as_tensor(np.asarray(ours)), reference.float()
    if mask is not None and reference.dim() >= 2 and reference.shape[:2] == mask.shape:
        keep = mask.bool()
        ours, reference = ours[keep], reference[keep]
    difference = float((ours - reference).abs().max())
    assert difference <= RELATIVE * float(reference.abs().max()), difference
    return difference


@pytest.mark.parametrize("family, model_class", CLASSES)
def test_imported_model_computes_what_transformers_computes(imported, family, model_class):
    hf_dir, checkpoint = imported(family, model_class)
    reference = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    model, meta = load_checkpoint(checkpoint)
    pairs = "NextSentence" in model_class or "PreTraining" in model_class
    inputs = hf_inputs(hf_dir, pairs=pairs)
    expected = hf_outputs(reference, inputs, family)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs.get("token_type_ids")
    with torch.no_grad():
        if "decoder_input_ids" in expected:
            assert_close(model(ids, mask, expected["decoder_input_ids"]), expected["logits"])
        elif "hidden" in expected:
            assert_close(model.hidden_states(ids, mask, types), expected["hidden"], mask)
        else:
            lm = expected.get("lm", expected.get("logits") if model.head is None else None)
            if lm is not None:
                assert_close(model(ids, mask, token_type_ids=types), lm, mask)
            if model.head is not None:
                head = model.head_logits(ids, mask, types)
                if "start_logits" in expected:
                    assert_close(head[..., 0], expected["start_logits"], mask)
                    assert_close(head[..., 1], expected["end_logits"], mask)
                else:
                    assert_close(head, expected.get("head", expected.get("logits")), mask)
    # the labels come along; the tokenizer encodes as the model's own does
    if meta["task"]["kind"] in ("next_sentence", "masked_lm_nsp"):
        assert meta["task"]["labels"] == ["is_next", "random"]  # seq_relationship's 0 and 1
    elif meta["task"]["kind"] == "masked_lm_sop":
        assert meta["task"]["labels"] == ["in_order", "swapped"]  # sop_classifier's 0 and 1
    elif model.config.num_labels:
        assert meta["task"]["labels"] == [reference.config.id2label[i]
                                          for i in range(model.config.num_labels)]
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for text in TEXTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"]


# one bundle per family, with every fp32 variant: the portable graphs and the fused ones
BUNDLED = [("bert", "BertForPreTraining"), ("roberta", "RobertaForSequenceClassification"),
           ("albert", "AlbertForPreTraining"), ("xlnet", "XLNetForSequenceClassification"),
           ("gpt2", "GPT2LMHeadModel"), ("bart", "BartForConditionalGeneration"),
           ("mbart", "MBartForConditionalGeneration"), ("marian", "MarianMTModel"),
           ("t5", "T5ForConditionalGeneration"), ("flan-t5", "T5ForConditionalGeneration"),
           ("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
           ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM")]


@pytest.fixture(scope="module")
def bundles(imported, tmp_path_factory):
    """(family, class) → bundle with the fused variant. (int8 and 16-bit variants have their own
    tolerances, met by trained models: random weights tie too often for their token gates.)"""
    made = {}

    def get(family: str, model_class: str) -> Path:
        if (family, model_class) not in made:
            made[family, model_class] = export_bundle(
                imported(family, model_class)[1], tmp_path_factory.mktemp(family) / "bundle",
                precisions=("fp32", "fused"), log=quiet)
        return made[family, model_class]

    return get


@pytest.mark.parametrize("family, model_class", BUNDLED)
def test_every_onnxruntime_variant_computes_what_transformers_computes(imported, bundles,
                                                                       family, model_class):
    hf_dir, _ = imported(family, model_class)
    bundle = Bundle.open(bundles(family, model_class))
    reference = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    generative = family in SEQ2SEQ + DECODER_ONLY
    inputs = hf_inputs(hf_dir, pairs=family in PAIRED, left=family in DECODER_ONLY)
    expected = hf_outputs(reference, inputs, family)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    for precision in ("fp32", "fused"):
        graphs = load(bundle, f"onnxruntime:{precision}").graphs
        if family in SEQ2SEQ:
            encoded = graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
            cross = {k: v for k, v in encoded.items() if k.startswith("cross_")}
            logits = graphs["decoder_init"].infer({
                "input_ids": expected["decoder_input_ids"].numpy(),
                "encoder_attention_mask": mask, **cross})["logits"]
            assert_close(logits, expected["logits"])
        elif generative:
            logits = graphs["decoder_init"].infer({"input_ids": ids,
                                                   "attention_mask": mask})["logits"]
            assert_close(logits, expected["logits"], inputs["attention_mask"])
        else:
            feed = {"input_ids": ids, "attention_mask": mask,
                    "token_type_ids": inputs.get("token_type_ids",
                                                 torch.zeros_like(inputs["input_ids"])).numpy()}
            for graph, output in (("lm", "lm"), ("head", "head")):
                if graph in graphs:
                    spec = graphs[graph].spec
                    memory = empty_memory(spec, len(ids)) if has_memory(spec) else {}
                    got = graphs[graph].infer({**{k: feed[k] for k in spec.input_names
                                                  if k in feed}, **memory})["logits"]
                    assert_close(got, expected.get(output, expected.get("logits")),
                                 inputs["attention_mask"])
    # the portable graphs pass TensorRT's static check
    assert all(check.passed for check in check_bundle_for_tensorrt(bundle, "fp32"))


@pytest.mark.parametrize("family, model_class", [c for c in BUNDLED if c[0] not in (
    "bert", "roberta", "albert", "xlnet")])
def test_generation_is_token_identical_to_generate(imported, bundles, family, model_class):
    """Greedy and beam search on a padded batch, with the model's generation_config.json
    defaults on both sides (mBART forces its target-language code first, BART/Marian force
    EOS at the limit), on the default (fused) graphs, the portable ones and torch."""
    hf_dir, _ = imported(family, model_class)
    reference = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    inputs = hf_inputs(hf_dir, left=family in DECODER_ONLY)
    settings = [{}, {"num_beams": 3}, {"num_beams": 3, "length_penalty": 0.5,
                                        "early_stopping": True, "num_return_sequences": 2}]
    start = 1 if reference.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    pad = reference.generation_config.pad_token_id
    with torch.no_grad():  # generate()'s answers, once: every backend is held to the same
        expected = [reference.generate(**inputs, max_new_tokens=12, do_sample=False,
                                       **{"num_beams": 1, **kwargs})[:, start:].numpy()
                    for kwargs in settings]
    for backend in ("onnxruntime", "onnxruntime:fp32", "torch"):
        model = load(bundles(family, model_class), backend)
        model = model.as_generator() if family in DECODER_ONLY else model
        for kwargs, wanted in zip(settings, expected):
            ours = model.generate_ids(*model.codec.encode(TEXTS), max_new_tokens=12, **kwargs)
            for got, want in zip(ours, wanted):
                assert got[got != model.special.pad].tolist() == want[want != pad].tolist(), \
                    (backend, kwargs)


@pytest.mark.parametrize("family, model_class", [("llama", "LlamaForCausalLM"),
                                                 ("qwen3", "Qwen3ForCausalLM")])
def test_a_prompt_prefilled_in_chunks_generates_what_generate_does(imported, bundles, family,
                                                                   model_class, monkeypatch):
    """Prompts longer than the prefill chunk (2 positions here): `decoder_init` takes the first
    chunk, `decoder_step` each following one, left padding spanning several chunks; greedy and
    beam search stay token-identical to generate() on fused, portable and torch graphs."""
    monkeypatch.setattr(decoding_state, "PREFILL_CHUNK", 2)
    hf_dir, _ = imported(family, model_class)
    reference = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    inputs = hf_inputs(hf_dir, left=True)
    width = inputs["input_ids"].shape[1]
    assert width > 4 and (inputs["attention_mask"] == 0).sum(dim=1).max() > 2  # several chunks
    settings = [{}, {"num_beams": 3}]
    pad = reference.generation_config.pad_token_id
    with torch.no_grad():  # generate()'s answers, once: every backend is held to the same
        expected = [reference.generate(**inputs, max_new_tokens=8, do_sample=False,
                                       **{"num_beams": 1, **kwargs})[:, width:].numpy()
                    for kwargs in settings]
    for backend in ("onnxruntime", "onnxruntime:fp32", "torch"):
        model = load(bundles(family, model_class), backend).as_generator()
        widths = record_step_widths(model.graphs["decoder_step"])
        for kwargs, wanted in zip(settings, expected):
            ours = model.generate_ids(*model.codec.encode(TEXTS), max_new_tokens=8, **kwargs)
            for got, want in zip(ours, wanted):
                assert got[got != model.special.pad].tolist() == want[want != pad].tolist(), \
                    (backend, kwargs)
        assert 2 in widths and widths.count(1) >= 7, widths  # chunks, then one token a step


@pytest.mark.parametrize("family, model_class", [("qwen2", "Qwen2ForCausalLM"),
                                                 ("gpt2", "GPT2LMHeadModel")])
def test_unpadded_prompts_prefill_through_the_static_cache_step(imported, bundles, family,
                                                               model_class):
    """Prompts of one length (no padding) on the fused graphs skip `decoder_init`: the static
    cache step takes the whole prompt over empty buffers (`StaticCacheStep.prefill`), rows one
    by one; greedy and beam search stay token-identical to generate(). Padded prompts still go
    through `decoder_init` (the kernel would number a padded prompt's positions wrongly)."""
    hf_dir, _ = imported(family, model_class)
    reference = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tokenizer(TEXTS[0])["input_ids"][:6]] * 2)
    ids[1, 2:] = ids[1, 2:].flip(0)  # two different prompts of one length
    model = load(bundles(family, model_class), "onnxruntime").as_generator()
    init_calls = record_step_widths(model.graphs["decoder_init"])
    widths = record_step_widths(model.graphs["decoder_step"])
    for kwargs in ({}, {"num_beams": 3}):
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids),
                                          max_new_tokens=8, min_new_tokens=8,
                                          do_sample=False,
                                          pad_token_id=reference.generation_config.eos_token_id,
                                          **{"num_beams": 1, **kwargs})[:, 6:].numpy()
        ours = model.generate_ids(ids.numpy(), np.ones(ids.shape, np.int64), max_new_tokens=8,
                                  min_new_tokens=8, **kwargs)
        assert ours.tolist() == expected.tolist(), kwargs
    assert init_calls == [] and widths.count(1) >= 7, (init_calls, widths)
    padded = np.ones(ids.shape, np.int64)
    padded[0, 0] = 0
    model.generate_ids(ids.numpy(), padded, max_new_tokens=2)
    assert init_calls == [6], init_calls


# short: the test models have 64 positions, and markup costs a token a character here
CONVERSATION = [{"role": "user", "content": "Sum?"},
                {"role": "assistant", "content": " Add. "},
                {"role": "user", "content": "Ok?"}]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_chat_prompts_are_what_apply_chat_template_makes(imported, bundles, family):
    """The tokenizer's chat template travels into the bundle; ferry renders a conversation to
    the text and tokens `apply_chat_template(add_generation_prompt=True)` makes, and answers
    with what `generate()` continues them with — in Python and through `ferry serve`'s
    OpenAI-style `/v1/chat/completions`."""
    from fastapi.testclient import TestClient

    from ferry.runtime.serve import create_app

    hf_dir, _ = imported(family, f"{family.capitalize()}ForCausalLM"
                         if family != "qwen2" else "Qwen2ForCausalLM")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = load(bundles(family, {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                  "qwen2": "Qwen2ForCausalLM"}[family]))
    generator = model.as_generator()
    prompt = generator.chat_prompt(CONVERSATION)
    assert prompt == tokenizer.apply_chat_template(CONVERSATION, tokenize=False,
                                                   add_generation_prompt=True)
    expected_ids = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True,
                                                 return_dict=True)["input_ids"]
    ids, _ = generator.codec.encode([prompt], add_special_tokens=False)
    assert ids[0].tolist() == list(expected_ids)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        continuation = reference.generate(torch.tensor([expected_ids]), max_new_tokens=2,
                                          do_sample=False)[0, len(expected_ids):]
    answer = tokenizer.decode(continuation, skip_special_tokens=True)
    assert model.chat(CONVERSATION, max_new_tokens=2) == answer
    client = TestClient(create_app(model, warm_up=False))
    with client:
        body = client.post("/v1/chat/completions", json={
            "messages": CONVERSATION, "temperature": 0, "max_tokens": 2}).json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": answer}
        streamed = client.post("/v1/chat/completions", json={
            "messages": CONVERSATION, "temperature": 0, "max_tokens": 2, "stream": True})
        pieces = [json.loads(line[6:]) for line in streamed.text.splitlines()
                  if line.startswith("data: {")]
        assert "".join(p["choices"][0]["delta"]["content"] for p in pieces) == answer
        assert "chat" in client.get("/v1/models").json()["data"][0]["capabilities"]
    if family == "mistral":  # the template's own check, as one error
        with pytest.raises(FerryError, match="roles must alternate"):
            generator.chat_prompt(CONVERSATION[1:])


def record_step_widths(step) -> list[int]:
    """The new-token counts of every call of `step` from now on."""
    widths: list[int] = []
    infer = step.infer
    step.infer = lambda feed: (widths.append(feed["input_ids"].shape[1]), infer(feed))[1]
    return widths


EXPORTED = [("bert", "BertForPreTraining"), ("bert", "BertForSequenceClassification"),
            ("bert", "BertForQuestionAnswering"), ("roberta", "RobertaForMaskedLM"),
            ("roberta", "RobertaForTokenClassification"), ("albert", "AlbertForPreTraining"),
            ("albert", "AlbertForQuestionAnswering"), ("xlnet", "XLNetLMHeadModel"),
            ("xlnet", "XLNetForSequenceClassification"),
            ("xlnet", "XLNetForQuestionAnsweringSimple"),
            ("gpt2", "GPT2ForSequenceClassification"), ("gpt2", "GPT2LMHeadModel"),
            ("bart", "BartForConditionalGeneration"), ("mbart", "MBartForConditionalGeneration"),
            ("marian", "MarianMTModel"),
            ("t5", "T5ForConditionalGeneration"), ("flan-t5", "T5ForConditionalGeneration"),
            ("llama", "LlamaForCausalLM"), ("llama", "LlamaForSequenceClassification"),
            ("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"),
            ("mistral", "MistralForCausalLM")]


@pytest.mark.parametrize("family, model_class", EXPORTED)
def test_export_hf_writes_what_transformers_loads_back(imported, tmp_path, family,
                                                       model_class):
    hf_dir, checkpoint = imported(family, model_class)
    out = export_hf(checkpoint, tmp_path / "hf", log=quiet)
    original = getattr(transformers, model_class).from_pretrained(hf_dir).eval()
    reloaded = getattr(transformers, model_class).from_pretrained(out).eval()
    assert json.loads((out / "config.json").read_text())["architectures"] == [model_class]
    inputs = hf_inputs(hf_dir, pairs=family in PAIRED)
    before, after = hf_outputs(original, inputs, family), hf_outputs(reloaded, inputs, family)
    for name, tensor in before.items():
        if name != "decoder_input_ids":
            assert_close(after[name], tensor, inputs["attention_mask"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXTS[1])["input_ids"] == \
        transformers.AutoTokenizer.from_pretrained(hf_dir)(TEXTS[1])["input_ids"]
    # and it comes back into ferry unchanged
    again = import_hf(out, tmp_path / "again", log=quiet)
    first, second = load_checkpoint(checkpoint)[0], load_checkpoint(again)[0]
    assert first.config == second.config
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())


def test_a_model_trained_from_a_family_preset_exports_and_one_no_family_expresses_is_refused(
        tmp_path):
    from hf_families import corpus

    from ferry.model import Transformer, preset
    from ferry.model.checkpoint import save_checkpoint
    from ferry.train.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

    tokenizer = train_tokenizer(corpus(), vocab_size=300, num_sentinels=4)
    ids = special_token_ids(tokenizer)
    for name, expected, options in (
            ("bart_base", "BartForConditionalGeneration", {}), ("small", None, {}),
            ("t5_small", "T5ForConditionalGeneration", {"head_size": 8}),
            ("llama_small", "LlamaForCausalLM", {"num_kv_heads": 2}),
            # factorised embeddings and 3 layers sharing one set of weights: only ALBERT fits
            ("albert_base", "AlbertForMaskedLM", {"embedding_size": 16, "num_encoder_layers": 3,
                                                  "num_decoder_layers": 0}),
            # relative attention with memory: only XLNet
            ("xlnet_base", "XLNetLMHeadModel", {"memory_length": 16, "num_decoder_layers": 0})):
        config = preset(name, **{
            "vocab_size": tokenizer.get_vocab_size(), "d_model": 32, "num_heads": 4,
            "d_ff": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "dropout": 0.0,
            "max_positions": 64, **options})
        if config.architecture == "decoder-only":
            config = preset(name, **{**config.to_dict(), "num_encoder_layers": 0})
        torch.manual_seed(0)
        kind = {"encoder-decoder": "seq2seq", "decoder-only": "causal_lm"}.get(
            config.architecture, "masked_lm")
        checkpoint = save_checkpoint(Transformer(config), tmp_path / name,
                                     {"special_ids": ids, "task": {"kind": kind, "lm": True}})
        save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
        if expected is None:
            with pytest.raises(FerryError, match="no Hugging Face family expresses"):
                export_hf(checkpoint, tmp_path / f"{name}-hf", log=quiet)
            assert not (tmp_path / f"{name}-hf").exists()
            continue
        out = export_hf(checkpoint, tmp_path / f"{name}-hf", log=quiet)
        reloaded = getattr(transformers, expected).from_pretrained(out).eval()
        model = load_checkpoint(checkpoint)[0]
        source = torch.tensor([tokenizer.encode(t).ids[:12] for t in TEXTS[:2]])
        if config.architecture != "encoder-decoder":
            with torch.no_grad():
                assert_close(model(source), reloaded(input_ids=source).logits)
            continue
        target = torch.tensor([[ids["bos"], 7, 9, 11]] * 2)
        with torch.no_grad():
            assert_close(model(source, torch.ones_like(source), target),
                         reloaded(input_ids=source, decoder_input_ids=target).logits)


# ---------------------------------------------------------------- weight and tokenizer files


def test_sharded_safetensors_and_pytorch_bin_checkpoints_import_alike(imported, tmp_path):
    hf_dir, checkpoint = imported("bart", "BartForConditionalGeneration")
    model = transformers.BartForConditionalGeneration.from_pretrained(hf_dir)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    torch_bin = tmp_path / "bin"
    model.save_pretrained(torch_bin)
    state = load_file(str(torch_bin / "model.safetensors"))
    (torch_bin / "model.safetensors").unlink()
    torch.save({k: v.half() for k, v in state.items()}, torch_bin / "pytorch_model.bin")
    for directory in (sharded, torch_bin):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).write_bytes((hf_dir / name).read_bytes())
    reference = load_checkpoint(checkpoint)[0].state_dict()
    from_shards = load_checkpoint(import_hf(sharded, tmp_path / "a", log=quiet))[0]
    assert all(torch.equal(v, reference[k]) for k, v in from_shards.state_dict().items())
    messages: list[str] = []
    from_bin = load_checkpoint(import_hf(torch_bin, tmp_path / "b", log=messages.append))[0]
    assert "float16" in messages[0]  # the source precision is said; ferry keeps fp32
    assert all(v.dtype == torch.float32 and torch.equal(v, reference[k].half().float())
               for k, v in from_bin.state_dict().items())


def test_tokenizer_files_without_a_tokenizer_json_are_converted(imported, tmp_path):
    """BERT's vocab.txt and GPT-2's / RoBERTa's vocab.json + merges.txt become tokenizer.json
    encoding exactly as the model's own tokenizer (Marian's SentencePiece: every Marian test)."""
    for family, model_class in (("bert", "BertForMaskedLM"), ("gpt2", "GPT2LMHeadModel"),
                                ("roberta", "RobertaForMaskedLM")):
        hf_dir, _ = imported(family, model_class)
        bare = tmp_path / family
        bare.mkdir()
        for name in ("config.json", "model.safetensors", "tokenizer_config.json", "vocab.txt"):
            if (hf_dir / name).exists():
                (bare / name).write_bytes((hf_dir / name).read_bytes())
        if family != "bert":
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(hf_dir / "tokenizer.json")).model.save(str(bare))
        checkpoint = import_hf(bare, tmp_path / f"{family}-ferry", log=quiet)
        from tokenizers import Tokenizer

        converted = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        original = transformers.AutoTokenizer.from_pretrained(hf_dir)
        for text, pair in zip(TEXTS, PAIRS):
            assert converted.encode(text).ids == original(text)["input_ids"], family
            if family != "gpt2":
                assert converted.encode(text, pair).ids == original(text, pair)["input_ids"]
            assert converted.decode(converted.encode(text).ids) == \
                original.decode(original(text)["input_ids"], skip_special_tokens=True)


# ---------------------------------------------------------------- bad input


def _copy(hf_dir: Path, to: Path) -> Path:
    to.mkdir()
    for file in hf_dir.iterdir():
        (to / file.name).write_bytes(file.read_bytes())
    return to


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata={"format": "pt"})


BAD = {
    "unknown model_type": (lambda d: _edit_config(d, model_type="gemma"),
                           "model_type 'gemma' is not supported; ferry imports"),
    "relative positions": (lambda d: _edit_config(d, position_embedding_type="relative_key"),
                           "position_embedding_type='relative_key' cannot be expressed"),
    "unknown activation": (lambda d: _edit_config(d, hidden_act="quick_gelu"),
                           "hidden_act='quick_gelu' cannot be expressed"),
    "unsupported class": (lambda d: _edit_config(d, architectures=["BertForMultipleChoice"]),
                          "BertForMultipleChoice is not supported"),
    "missing tensor": (lambda d: _edit_weights(
        d, lambda s: s.pop("bert.encoder.layer.1.output.dense.weight")),
        "lacks the tensor encoder.layer.1.output.dense.weight"),
    "extra tensor": (lambda d: _edit_weights(d, lambda s: s.update(
        {"bert.encoder.layer.1.extra.weight": torch.zeros(2)})),
        r"has tensors a BertForSequenceClassification does not: \['encoder.layer.1.extra"),
    "mis-shaped tensor": (lambda d: _edit_weights(d, lambda s: s.update(
        {"classifier.weight": torch.zeros(5, 32)})),
        r"classifier.weight has shape \[5, 32\] but config.json implies \[3, 32\]"),
    "missing shard": (lambda d: (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"bert.pooler.dense.weight": "model-00002-of-00002.safetensors"}})),
        r"lists shard\(s\) \['model-00002-of-00002.safetensors'\] that are missing"),
    "shard outside the directory": (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"bert.pooler.dense.weight": "../model.safetensors"}})),
        r"names the shard '../model.safetensors'; shards must be plain file names"),
    "config values of the wrong type": (lambda d: _edit_config(d, hidden_size="32"),
                                        "d_model must be int"),
    "no tokenizer": (lambda d: [(d / n).unlink() for n in ("tokenizer.json", "vocab.txt")],
                     "has no tokenizer: expected tokenizer.json, vocab.txt"),
    "broken config": (lambda d: (d / "config.json").write_text("{nope"),
                      "config.json is not valid JSON"),
    "pickled weights": (lambda d: ((d / "model.safetensors").unlink(), torch.save(
        {"w": torch.zeros(1), "evil": object()}, d / "pytorch_model.bin")),
        "is not a readable weights-only PyTorch file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_one_line_naming_the_problem_and_write_nothing(imported, tmp_path,
                                                                           case):
    hf_dir, _ = imported("bert", "BertForSequenceClassification")
    bad = _copy(hf_dir, tmp_path / "bad")
    damage, message = BAD[case]
    damage(bad)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import", "hf", str(bad), "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(message, errors[0]), result.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# what a modern decoder may carry that ferry cannot express: (family, config change, message)
MODERN_BAD = {
    "sliding window": ("mistral", {"sliding_window": 16},
                       "sliding_window=16 is shorter than the context"),
    "qwen sliding layers": ("qwen2", {"layer_types": ["full_attention", "sliding_attention"],
                                      "sliding_window": 8},
                            "sliding-window attention cannot be expressed"),
    "yarn scaling": ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                   "rope_theta": 10000.0}},
                     "rope_type='yarn' cannot be expressed"),
    "partial rotary": ("qwen3", {"partial_rotary_factor": 0.5},
                       "partial_rotary_factor"),
    "t5 feed-forward": ("t5", {"feed_forward_proj": "gated-swish"},
                        "feed_forward_proj='gated-swish' cannot be expressed"),
    "xlnet causal": ("xlnet", {"attn_type": "uni"}, "attn_type='uni' cannot be expressed"),
    "xlnet bi_data": ("xlnet", {"bi_data": True}, "bi_data=True cannot be expressed"),
}


@pytest.mark.parametrize("case", sorted(MODERN_BAD))
def test_modern_options_ferry_cannot_express_are_refused_by_name(imported, tmp_path, case):
    family, change, message = MODERN_BAD[case]
    model_class = "T5ForConditionalGeneration" if family == "t5" else next(
        c for f, c in CLASSES if f == family)
    bad = _copy(imported(family, model_class)[0], tmp_path / "bad")
    _edit_config(bad, **change)
    result = CliRunner().invoke(main, ["import", "hf", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "o").exists()


def test_a_sentencepiece_model_alone_is_refused_with_what_to_provide(imported, tmp_path):
    hf_dir, _ = imported("marian", "MarianMTModel")
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "vocab.json").unlink()
    (bad / "source.spm").rename(bad / "sentencepiece.bpe.model")
    with pytest.raises(FerryError, match="only the SentencePiece model sentencepiece.bpe.model; "
                                         "provide a tokenizer.json"):
        import_hf(bad, tmp_path / "out", log=quiet)


# ---------------------------------------------------------------- CLI


def test_cli_imports_exports_onnx_straight_from_a_hf_directory_and_back(imported, tmp_path):
    hf_dir, _ = imported("marian", "MarianMTModel")
    runner = CliRunner()
    result = runner.invoke(main, ["import", "hf", str(hf_dir), "--out", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ck" / "tokenizer.json").is_file()
    result = runner.invoke(main, ["export", "onnx", str(hf_dir), "--out", str(tmp_path / "b"),
                                  "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source_checkpoint"]["imported_from"]["family"] == "marian"
    assert manifest["generation"] == {"forced_eos_token_id": 0}
    for command in (["verify", str(tmp_path / "b")],
                    ["compare", str(tmp_path / "b"), "--backends", "torch,onnxruntime"]):
        result = runner.invoke(main, command)
        assert result.exit_code == 0 and "PASS" in result.output, result.output
    result = runner.invoke(main, ["inspect", str(tmp_path / "b")])
    assert "imported from: Hugging Face marian (MarianMTModel, float32)" in result.output
    assert "generation defaults: forced_eos_token_id=0" in result.output
    assert "positional sinusoidal_concat" in result.output and "activation silu" in result.output
    result = runner.invoke(main, ["generate", str(tmp_path / "b"), TEXTS[0], "--json",
                                  "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)[0]["input"] == TEXTS[0]
    result = runner.invoke(main, ["export", "hf", str(tmp_path / "ck"), "--out",
                                  str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    assert POSITIONS == json.loads((tmp_path / "hf" / "config.json").read_text())[
        "max_position_embeddings"]


def test_a_chat_template_is_read_from_tokenizer_config_too(tmp_path):
    from ferry.train.hf_tokenizer import chat_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "{{ bos_token }}D"}],
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
        "model_max_length": 512}))
    assert chat_template(tmp_path) == {"template": "{{ bos_token }}D",
                                       "special_tokens": {"bos_token": "<s>",
                                                          "eos_token": "</s>"}}
    (tmp_path / "chat_template.jinja").write_text("J")  # the separate file wins
    assert chat_template(tmp_path)["template"] == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(FerryError, match="chat_template must be a string"):
        chat_template(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert chat_template(tmp_path) is None


def test_albert_layers_sharing_weights_export_one_initializer_each(bundles):
    """4 layers of 2 weight sets: each set's tensors are one initializer read by 2 layers, in
    the portable and the fused graphs (q, k, v packed into one there: one packed matrix per
    set too), and no graph holds a tensor twice."""
    from collections import Counter

    from onnx import numpy_helper

    bundle = bundles("albert", "AlbertForPreTraining")
    for file in ("head.onnx", "head.fused.onnx", "lm.onnx"):
        graph = onnx.load(str(bundle / file)).graph
        contents = [numpy_helper.to_array(t).tobytes() + bytes(str(t.dims), "ascii")
                    for t in graph.initializer]
        assert len(set(contents)) == len(contents), file
        uses = Counter(name for node in graph.node for name in node.input)
        matrices = [t.name for t in graph.initializer if len(t.dims) == 2 and 48 in t.dims
                    and 32 not in t.dims and uses[t.name] == 2]
        # q, k, v, out, FFN up, down per set; the fused graph packs q, k, v into one matrix
        per_set = 4 if file.endswith(".fused.onnx") else 6
        assert len(matrices) >= 2 * per_set, (file, matrices)


@pytest.mark.parametrize("family, model_class", [("qwen2", "Qwen2ForCausalLM"),
                                                 ("bert", "BertForMaskedLM")])
def test_fused_graphs_keep_no_weight_that_no_node_reads(bundles, family, model_class):
    """Packing q/k/v (Qwen2's biased ones into GroupQueryAttention's packed input, BERT's split
    after) leaves no orphaned weight or bias behind: ONNX Runtime would warn about each one at
    every load, and the bundle would carry its bytes."""
    bundle = bundles(family, model_class)
    packed = 0
    for file in Bundle.open(bundle).manifest.variants["fused"].graphs.values():
        graph = onnx.load(str(bundle / file), load_external_data=False).graph
        read = {name for node in graph.node for name in node.input}
        assert not [t.name for t in graph.initializer if t.name not in read], file
        packed += sum(".packed." in t.name for t in graph.initializer)
    assert packed > 0
