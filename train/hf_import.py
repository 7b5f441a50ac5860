"""`ferry import hf`: a local Hugging Face model directory → an ordinary ferry checkpoint.

    checkpoint/
      config.json        ferry's model config, special ids, task (head, labels), generation
                         defaults, and where it came from (family, model class, source dtype)
      model.safetensors  fp32 weights under ferry's names
      tokenizer.json     the model's tokenizer (converted when the directory has only a
                         vocab.txt, vocab.json + merges.txt, or Marian's SentencePiece files)

Fine-tuning (`model.init_from`), export, `compare` and the runtime take it as they take a
checkpoint ferry trained. Nothing is downloaded. The checkpoint is written beside its destination
and moved into place only when complete, so a failed import leaves nothing half-written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.files import staged_directory
from ferry.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_checkpoint
from ferry.model.families import family
from ferry.model.hf_checkpoint import HFModel, read_hf_config, read_hf_model
from ferry.model.transformer import Transformer
from ferry.runtime.generation_config import GenerationConfig
from ferry.train.hf_tokenizer import load_hf_tokenizer, special_ids, token_strings
from ferry.train.tokenizer import save_tokenizer

TOKENIZER_FILE = "tokenizer.json"
# generate() arguments ferry reads from generation_config.json (or config.json) as defaults
GENERATION_FIELDS = ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size",
                     "repetition_penalty", "forced_bos_token_id", "forced_eos_token_id",
                     "suppress_tokens", "do_sample", "temperature", "top_k", "top_p",
                     "max_new_tokens", "min_new_tokens")


def generation_defaults(directory: Path, hf: dict[str, Any], architecture: str
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the raw generation settings, ferry's `GenerationConfig` defaults from them).

    `max_length` / `min_length` count the decoder start token of an encoder-decoder, so they
    become `max_new_tokens` / `min_new_tokens` one lower; a decoder-only model's count the
    prompt, which only a request knows, so they are left to the request.
    """
    path = directory / "generation_config.json"
    raw = hf
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FerryError(f"{path} is not valid JSON ({exc})") from exc
    defaults = {k: raw[k] for k in GENERATION_FIELDS if raw.get(k) is not None}
    if not isinstance(defaults.get("early_stopping", False), bool):
        del defaults["early_stopping"]  # "never" has no ferry equivalent yet
    if architecture == "encoder-decoder":
        for ours, theirs in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            if ours not in defaults and isinstance(raw.get(theirs), int) and raw[theirs] > 1:
                defaults[ours] = raw[theirs] - 1
    try:
        GenerationConfig.from_kwargs(**defaults)
    except (FerryError, TypeError) as exc:
        raise FerryError(f"{path if path.is_file() else directory / 'config.json'}: generation "
                         f"settings ferry cannot use ({exc})") from exc
    return raw, defaults


def task_metadata(model: HFModel) -> dict[str, Any]:
    """The checkpoint's `task` (as ferry's training writes it): kind, labels, whether the
    vocabulary logits are served."""
    labels = list(model.head.labels)
    if not labels and model.config.num_labels:
        id2label = model.hf_config.get("id2label") or {}
        labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}")))
                  for i in range(model.config.num_labels)]
    return {"kind": model.head.task_kind, "labels": labels, "pairs": model.head.task_kind in (
        "next_sentence", "masked_lm_nsp"), "lm": model.head.lm}


def import_hf(directory: str | Path, out: str | Path, *,
              log: Callable[[str], None] = print) -> Path:
    """Import the Hugging Face model in `directory` as a ferry checkpoint at `out`."""
    directory, out = Path(directory), Path(out)
    if not directory.is_dir():
        raise FerryError(f"{directory} is not a directory; pass a local Hugging Face model "
                         "directory (config.json, weights, tokenizer files)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (
            out / CONFIG_FILE).is_file():
        raise FerryError(f"--out {out} exists and is not a ferry checkpoint; choose a new "
                         "directory")
    # the tokenizer first: a directory without one fails before the weights are read
    tokenizer = load_hf_tokenizer(directory, family(read_hf_config(directory).get("model_type")))
    model = read_hf_model(directory)
    fam, config = model.family, model.config
    log(f"read {model.hf_class} ({fam.model_type}, {model.source_dtype}): "
        f"{config.architecture}, d_model {config.d_model}, "
        f"{config.num_encoder_layers}+{config.num_decoder_layers} layers, "
        f"vocabulary {config.vocab_size}")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise FerryError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                         f"only {config.vocab_size} embeddings; is it the model's tokenizer?")
    raw_generation, generation = generation_defaults(directory, model.hf_config,
                                                     config.architecture)
    ids = special_ids(tokenizer, fam, model.hf_config, token_strings(directory, fam),
                      raw_generation)
    metadata = {
        "special_ids": ids,
        "task": task_metadata(model),
        "generation": generation,
        "source": {"format": "huggingface", "family": fam.model_type,
                   "model_class": model.hf_class, "dtype": model.source_dtype,
                   "path": str(directory.resolve())},
    }
    transformer = Transformer(config)
    transformer.load_state_dict(model.state)
    with staged_directory(out) as staging:
        save_checkpoint(transformer, staging, metadata)
        save_tokenizer(tokenizer, staging / TOKENIZER_FILE)
    log(f"ferry checkpoint written to {out} ({WEIGHTS_FILE}, {CONFIG_FILE}, {TOKENIZER_FILE}; "
        f"task {metadata['task']['kind']})")
    return out
