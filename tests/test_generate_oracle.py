"""The contract of ferry's generation arguments: `transformers`' `generate()` is the oracle.

An encoder-decoder (BART) and a decoder-only model (GPT-2) with random weights — made peaked
enough that beams differ and sequences end at different lengths — are imported, exported, and
run in every mode and combination below on padded batches; ferry's ids (and beam scores) must
equal `generate()`'s on the torch backend and on ONNX Runtime (its default fused graphs).
Sampling draws from a different random generator than torch's, so the sampling warpers are held
to `transformers`' own warper classes on the same scores instead, as are the processors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_families import BUILDERS
from transformers.generation import logits_process as hf

from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.runtime import load
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.logits_processing import Step, apply_processors, apply_warpers
from ferry.train.hf_import import import_hf

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return a new list of items",
         "hello", "Parse the command line, then print what it found."]
NEW_TOKENS = 12


def _peaked(family: str, directory: Path) -> Path:
    """Sharper distributions (embeddings × 2–3) and an EOS that competes: some sequences end
    after a few tokens, others run to the limit (found by scanning a grid)."""
    built = BUILDERS[family](directory)
    cls = (transformers.BartForConditionalGeneration if family == "bart"
           else transformers.GPT2LMHeadModel)
    model = cls.from_pretrained(built)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        eos = model.config.eos_token_id
        if family == "bart":
            embeddings.mul_(2.0)
            model.final_logits_bias[0, eos] += 9.5
        else:
            embeddings.mul_(3.0)
            embeddings[eos] *= 2.4
    model.save_pretrained(built)
    return built


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family → (transformers model, tokenizer, ferry bundle)."""
    made = {}
    for family in ("bart", "gpt2"):
        root = tmp_path_factory.mktemp(family)
        hf_dir = _peaked(family, root / "hf")
        bundle = export_bundle(import_hf(hf_dir, root / "ferry", log=lambda m: None),
                               root / "bundle", precisions=("fp32", "fused"), log=lambda m: None)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir) if family == "bart" \
            else transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left" if family == "gpt2" else "right"
        made[family] = model.eval(), tokenizer, bundle
    return made


CASES = {
    "greedy": {},
    "beam": {"num_beams": 4},
    "beam, length_penalty -1": {"num_beams": 4, "length_penalty": -1.0},
    "beam, length_penalty 0": {"num_beams": 3, "length_penalty": 0.0},
    "beam, length_penalty 2": {"num_beams": 4, "length_penalty": 2.0},
    "beam, early_stopping": {"num_beams": 4, "early_stopping": True},
    "beam, early_stopping never": {"num_beams": 4, "early_stopping": "never",
                                   "length_penalty": 2.0},
    "beam, never, length_penalty 0.5": {"num_beams": 3, "early_stopping": "never",
                                        "length_penalty": 0.5},
    "beam, 3 returned": {"num_beams": 4, "num_return_sequences": 3},
    "min_new_tokens": {"min_new_tokens": 5},
    "beam, min_new_tokens": {"num_beams": 3, "min_new_tokens": 5},
    "min_length": {"min_length": 6},
    "beam, max_length": {"num_beams": 3, "max_length": 9, "max_new_tokens": None},
    "repetition_penalty": {"repetition_penalty": 1.6},
    "beam, repetition_penalty": {"num_beams": 4, "repetition_penalty": 1.6},
    "beam, repetition_penalty < 1": {"num_beams": 3, "repetition_penalty": 0.7},
    "no_repeat_ngram_size": {"no_repeat_ngram_size": 2},
    "beam, no_repeat_ngram_size": {"num_beams": 4, "no_repeat_ngram_size": 3},
    "beam, suppress_tokens": {"num_beams": 3, "suppress_tokens": "top3"},
    "begin_suppress_tokens": {"begin_suppress_tokens": "top3"},
    "beam, bad_words_ids": {"num_beams": 3, "bad_words_ids": "pairs"},
    "bad_words_ids": {"bad_words_ids": "pairs"},
    "forced_bos_token_id": {"forced_bos_token_id": 7},
    "beam, forced_eos_token_id": {"num_beams": 3, "forced_eos_token_id": "eos"},
    "exponential_decay_length_penalty": {"exponential_decay_length_penalty": (2, 1.8)},
    "beam, exponential_decay_length_penalty": {"num_beams": 3,
                                               "exponential_decay_length_penalty": (3, 1.5)},
    "beam, renormalize_logits with penalties": {"num_beams": 4, "renormalize_logits": True,
                                                "min_new_tokens": 3, "repetition_penalty": 1.4},
    "beam, two eos ids": {"num_beams": 3, "eos_token_id": "eos+7"},
    "stop_strings": {"stop_strings": ["an", "e."]},
    "beam, stop_strings": {"num_beams": 3, "stop_strings": ["ing"]},
    "beam, everything": {"num_beams": 4, "early_stopping": "never", "length_penalty": 1.5,
                         "no_repeat_ngram_size": 2, "repetition_penalty": 1.2,
                         "min_new_tokens": 2, "num_return_sequences": 2},
}


def _resolve(kwargs: dict, model, plain: np.ndarray) -> dict:
    """Fill the placeholders with ids that matter for this model: tokens the unconstrained
    greedy run generates (so banning them changes the output), its EOS."""
    eos = model.generation_config.eos_token_id
    common = [t for t, _ in sorted(zip(*np.unique(plain[plain != eos], return_counts=True)),
                                   key=lambda pair: -pair[1])]
    resolved = {}
    for key, value in kwargs.items():
        if value == "top3":
            value = [int(t) for t in common[:3]]
        elif value == "pairs":  # a token, and a pair the longest greedy output contains
            longest = max((row[row != eos] for row in plain), key=len)
            value = [[int(common[0])], [int(longest[1]), int(longest[2])]]
        elif value == "eos":
            value = eos
        elif value == "eos+7":
            value = [eos, 7]
        resolved[key] = value
    return resolved


def _trimmed(row: np.ndarray, pad: int) -> list[int]:
    row = list(map(int, row))
    while row and row[-1] == pad:
        row.pop()
    return row


@pytest.mark.parametrize("family", ["bart", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_generation_equals_transformers_generate(models, family, case):
    model, tokenizer, bundle = models[family]
    inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
    start = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, start:]
    kwargs = _resolve(CASES[case], model, plain.numpy())
    if "max_length" in kwargs and not model.config.is_encoder_decoder:
        kwargs["max_length"] += start  # the same new-token budget after the padded prompt
    given = {"max_new_tokens": NEW_TOKENS, "num_beams": 1, **kwargs}
    given = {k: v for k, v in given.items() if v is not None}
    with torch.no_grad():
        expected = model.generate(**inputs, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, tokenizer=tokenizer, **given)
    pad = model.generation_config.pad_token_id
    want = [_trimmed(row, pad) for row in expected.sequences[:, start:].numpy()]
    for backend in ("onnxruntime", "torch"):
        ferry_model = load(bundle, backend)
        generator = ferry_model.as_generator() if family == "gpt2" else ferry_model
        ids, mask = (inputs["input_ids"].numpy(), inputs["attention_mask"].numpy())
        if family == "gpt2":  # ferry takes right-padded prompts and left-pads them itself
            ids, mask = generator.codec.encode(TEXTS)
        output = generator.generate_output(ids, mask, **given)
        got = [_trimmed(row, generator.special.pad) for row in output.sequences]
        assert got == want, (backend, case)
        if given["num_beams"] > 1:
            assert np.allclose(output.sequence_scores, expected.sequences_scores.numpy(),
                               atol=1e-4), (backend, case)


def test_the_peaked_models_end_at_different_lengths(models):
    """The premise of the table above: beams differ and finish at different lengths."""
    for model, tokenizer, _ in models.values():
        inputs = tokenizer(TEXTS, padding=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=4,
                             num_return_sequences=4, do_sample=False)
        eos = model.generation_config.eos_token_id
        start = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
        lengths = {int(np.argmax(row == eos)) if (row == eos).any() else NEW_TOKENS
                   for row in out[:, start:].numpy()}
        assert len(lengths) >= 3, lengths


# ---------------------------------------------------------------- processors and warpers


def _scores(seed: int, rows: int = 6, vocab: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)


PROCESSORS = [
    ({"repetition_penalty": 1.7}, lambda s: hf.RepetitionPenaltyLogitsProcessor(
        1.7, prompt_ignore_length=torch.tensor(s["ignored"]))),
    ({"no_repeat_ngram_size": 2}, lambda s: hf.NoRepeatNGramLogitsProcessor(2)),
    ({"no_repeat_ngram_size": 1}, lambda s: hf.NoRepeatNGramLogitsProcessor(1)),
    ({"bad_words_ids": ((3,), (5, 9), (1,))},
     lambda s: hf.NoBadWordsLogitsProcessor([[3], [5, 9], [1]], eos_token_id=1)),
    ({"min_length": 9}, lambda s: hf.MinLengthLogitsProcessor(9, 1)),
    ({"min_new_tokens": 3}, lambda s: hf.MinNewTokensLengthLogitsProcessor(s["prompt"], 3, 1)),
    ({"exponential_decay_length_penalty": (1, 1.7)},
     lambda s: hf.ExponentialDecayLengthPenalty((1, 1.7), 1, s["prompt"])),
    ({"suppress_tokens": (2, 4)}, lambda s: hf.SuppressTokensLogitsProcessor([2, 4])),
    ({"begin_suppress_tokens": (2, 4)},
     lambda s: hf.SuppressTokensAtBeginLogitsProcessor([2, 4], s["prompt"])),
    ({"forced_eos_token_id": 1}, lambda s: hf.ForcedEOSTokenLogitsProcessor(s["length"] + 1, 1)),
]


@pytest.mark.parametrize("arguments, processor", PROCESSORS)
def test_processors_equal_transformers_processors(arguments, processor):
    rng = np.random.default_rng(3)
    for seed, length in enumerate((1, 2, 4, 7)):
        sequences = rng.integers(0, 12, (6, length)).astype(np.int64)  # frequent repeats
        ignored = np.minimum(rng.integers(0, 3, 6), length - 1)
        prompt = max(1, length - 2)
        at = Step(length=length, prompt_length=prompt, max_length=length + 1, eos=(1,),
                  ignored=ignored)
        config = GenerationConfig(**arguments)
        ours = apply_processors(_scores(seed), sequences, at=at, config=config)
        theirs = processor({"ignored": ignored, "prompt": prompt, "length": length})(
            torch.from_numpy(sequences), torch.from_numpy(_scores(seed))).numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(theirs)), (arguments, length)
        assert np.allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], atol=1e-6)


WARPERS = [
    ({"temperature": 0.7}, lambda: hf.TemperatureLogitsWarper(0.7)),
    ({"top_k": 5}, lambda: hf.TopKLogitsWarper(5)),
    ({"top_p": 0.8}, lambda: hf.TopPLogitsWarper(0.8)),
    ({"min_p": 0.1}, lambda: hf.MinPLogitsWarper(0.1)),
    ({"typical_p": 0.7}, lambda: hf.TypicalLogitsWarper(0.7)),
    ({"epsilon_cutoff": 0.02}, lambda: hf.EpsilonLogitsWarper(0.02)),
    ({"eta_cutoff": 0.05}, lambda: hf.EtaLogitsWarper(0.05)),
]


@pytest.mark.parametrize("arguments, warper", WARPERS)
def test_sampling_warpers_equal_transformers_warpers(arguments, warper):
    config = GenerationConfig(**{"do_sample": True, "top_k": 0, **arguments})
    for seed in range(4):
        ours = apply_warpers(_scores(seed), config)
        theirs = warper()(torch.zeros(6, 1, dtype=torch.long),
                          torch.from_numpy(_scores(seed))).numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(theirs)), arguments
        assert np.allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], atol=1e-5)


def test_sampling_defaults_are_transformers_defaults():
    """A port's `generate(do_sample=True)` samples from the 50 most likely tokens, as there."""
    defaults = transformers.GenerationConfig._get_default_generation_params()  # generate()'s
    ours = GenerationConfig()
    for name in ("top_k", "top_p", "temperature", "typical_p", "epsilon_cutoff", "eta_cutoff",
                 "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "num_beams",
                 "early_stopping", "do_sample", "min_length"):
        assert getattr(ours, name) == defaults[name], name


@pytest.mark.parametrize("name", ["num_beam_groups", "diversity_penalty", "penalty_alpha",
                                  "return_dict_in_generate", "guidance_scale"])
def test_unsupported_generate_arguments_are_refused_by_name(models, name):
    with pytest.raises(FerryError, match=f"generation argument {name} is not supported"):
        load(models["bart"][2]).generate("hello", **{name: 2})
