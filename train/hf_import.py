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
from ferry.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_weights, save_checkpoint
from ferry.model.families import family
from ferry.model.hf_checkpoint import HFModel, read_hf_config, read_hf_model
from ferry.model.transformer import Transformer
from ferry.runtime.generation_config import GenerationConfig
from ferry.train.hf_tokenizer import (
    chat_template,
    load_hf_tokenizer,
    special_ids,
    token_strings,
)
from ferry.train.tokenizer import save_tokenizer

TOKENIZER_FILE = "tokenizer.json"
# generate() arguments ferry reads from generation_config.json (or config.json) as defaults:
# every one it implements with transformers' meaning
GENERATION_FIELDS = ("max_new_tokens", "max_length", "min_new_tokens", "min_length",
                     "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p",
                     "epsilon_cutoff", "eta_cutoff", "num_beams", "length_penalty",
                     "early_stopping", "num_return_sequences", "repetition_penalty",
                     "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                     "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                     "exponential_decay_length_penalty", "renormalize_logits", "stop_strings")


def generation_defaults(directory: Path, hf: dict[str, Any], *, vocab_size: int,
                        max_positions: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the raw generation settings, ferry's `GenerationConfig` defaults from them): the
    fields ferry implements, with the same meaning (a list of EOS ids too)."""
    path = directory / "generation_config.json"
    raw = hf
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FerryError(f"{path} is not valid JSON ({exc})") from exc
    defaults = {k: raw[k] for k in GENERATION_FIELDS if raw.get(k) is not None}
    if isinstance(raw.get("eos_token_id"), list) and len(raw["eos_token_id"]) > 1:
        defaults["eos_token_id"] = raw["eos_token_id"]  # several ends (Llama 3's two)
    forced = defaults.get("forced_eos_token_id")
    if isinstance(forced, list) and len(forced) == 1:
        defaults["forced_eos_token_id"] = forced[0]
    try:
        GenerationConfig.from_kwargs(**defaults).validate(vocab_size=vocab_size,
                                                          max_positions=max_positions)
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
        "next_sentence", "masked_lm_nsp", "masked_lm_sop"), "lm": model.head.lm}


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
    raw_generation, generation = generation_defaults(
        directory, model.hf_config, vocab_size=config.vocab_size,
        max_positions=config.max_positions)
    ids = special_ids(tokenizer, fam, model.hf_config, token_strings(directory, fam),
                      raw_generation)
    metadata = {
        "special_ids": ids,
        "task": task_metadata(model),
        "generation": generation,
        **({"chat_template": template} if (template := chat_template(directory)) else {}),
        "source": {"format": "huggingface", "family": fam.model_type,
                   "model_class": model.hf_class, "dtype": model.source_dtype,
                   "path": str(directory.resolve())},
    }
    transformer = Transformer(config)
    load_weights(transformer, model.state, directory)
    with staged_directory(out) as staging:
        save_checkpoint(transformer, staging, metadata)
        save_tokenizer(tokenizer, staging / TOKENIZER_FILE)
    log(f"ferry checkpoint written to {out} ({WEIGHTS_FILE}, {CONFIG_FILE}, {TOKENIZER_FILE}; "
        f"task {metadata['task']['kind']})")
    return out
