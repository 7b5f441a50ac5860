"""`ferry export hf`: a ferry checkpoint → a Hugging Face model directory that `transformers`
loads (`AutoModelFor….from_pretrained`) and that computes the same logits.

    hf/
      config.json              the family's config, special token ids, labels
      model.safetensors        the weights under the family's names and layouts
      generation_config.json   generation defaults (generative models)
      tokenizer.json, tokenizer_config.json, special_tokens_map.json

The family is the one the checkpoint was imported from, else the first whose table expresses the
model's options exactly (a model trained from a family preset); a model no family expresses is
refused with what each family would need. The directory is staged and moved into place whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes, staged_directory
from ferry.model import load_checkpoint
from ferry.model.config import TransformerConfig
from ferry.model.families import FAMILIES, Family, Head
from ferry.model.hf_checkpoint import hf_config, hf_tensors

NSP_KINDS = ("next_sentence", "masked_lm_nsp", "masked_lm_sop")  # heads with fixed labels
FAMILY_OPTIONS = ("embedding_size", "layer_groups")  # ALBERT's: set, only its family fits


def _mismatch(fam: Family, config: dict[str, Any]) -> str | None:
    """The first of the family's fixed options this config does not have, or None."""
    for name, value in fam.fixed.items():
        if config.get(name) != value:
            return f"{name}={value!r} (the model has {config.get(name)!r})"
    for name in FAMILY_OPTIONS:  # options only some families' configs carry
        if config.get(name) and name not in fam.config_fields:
            return f"no {name} (the model has {name}={config.get(name)!r})"
    try:
        fam.hf_config(config)  # options the family expresses only in some combinations
    except FerryError as exc:
        return str(exc)
    return None


def choose_family(config: TransformerConfig, source: dict) -> Family:
    """The family to write: the one imported from, else the first that fits exactly."""
    ours = config.to_dict()
    if source.get("family") in FAMILIES:
        fam = FAMILIES[source["family"]]
        problem = _mismatch(fam, ours)
        if problem:
            raise FerryError(f"the model no longer fits its {fam.model_type} family: it needs "
                             f"{problem}")
        return fam
    reasons = []
    for fam in FAMILIES.values():
        problem = _mismatch(fam, ours)
        if problem is None:
            return fam
        reasons.append(f"{fam.model_type} needs {problem}")
    raise FerryError("no Hugging Face family expresses this model exactly: "
                     + "; ".join(reasons) + " (train from a family preset, or import a "
                     "checkpoint, to publish it)")


def choose_class(fam: Family, config: TransformerConfig, task: dict, source: dict) -> str:
    """The model class that holds the model's heads: the imported one when it still fits."""
    ours = config.to_dict()
    nsp = task.get("kind") in NSP_KINDS

    def fits(head: Head) -> bool:
        return (all(ours.get(k) == v for k, v in head.config.items())
                and head.config.get("task_head", "none") == config.task_head
                and (head.lm or not task.get("lm", False))
                and (head.labels != ()) == nsp)

    imported = source.get("model_class")
    if imported in fam.heads and fits(fam.heads[imported]):
        return imported
    for name, head in fam.heads.items():
        if fits(head):
            return name
    raise FerryError(f"no {fam.model_type} model class holds this model's head "
                     f"(task_head={config.task_head}, task {task.get('kind')!r}, lm "
                     f"{task.get('lm')}); {fam.model_type} has {sorted(fam.heads)}")


def export_hf(checkpoint: str | Path, out: str | Path, *,
              log: Callable[[str], None] = print) -> Path:
    """Write the ferry checkpoint at `checkpoint` as a Hugging Face model directory `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (
            out / "config.json").is_file():
        raise FerryError(f"--out {out} exists and is not a model directory; choose a new one")
    model, meta = load_checkpoint(checkpoint)
    tokenizer_path = checkpoint / "tokenizer.json"
    if not tokenizer_path.is_file() or "special_ids" not in meta:
        raise FerryError(f"{checkpoint} lacks tokenizer.json or special ids; export a checkpoint "
                         "written by `ferry train` or `ferry import hf`")
    config, task, source = model.config, meta.get("task") or {}, meta.get("source") or {}
    fam = choose_family(config, source)
    hf_class = choose_class(fam, config, task, source)
    head = fam.heads[hf_class]
    ids = meta["special_ids"]
    data: dict[str, Any] = {f"{role}_token_id": ids.get(role) for role in ("pad", "bos", "eos")}
    if config.architecture == "encoder-decoder":
        data.update(decoder_start_token_id=ids.get("decoder_start"), is_encoder_decoder=True)
    data.update(hf_config(config, fam, hf_class))  # a family's own ids win (RoBERTa's pad)
    labels = list(task.get("labels") or [])
    if config.num_labels and not head.labels:
        data["id2label"] = {str(i): label for i, label in enumerate(labels)}
        data["label2id"] = {label: i for i, label in enumerate(labels)}
    strings = _token_strings(tokenizer_path, fam, ids)
    with staged_directory(out) as staging:
        atomic_write_bytes(staging / "config.json", json.dumps(data, indent=2).encode())
        atomic_write_bytes(staging / "model.safetensors",
                           save(hf_tensors(model, fam, hf_class), metadata={"format": "pt"}))
        shutil.copyfile(tokenizer_path, staging / "tokenizer.json")
        atomic_write_bytes(staging / "special_tokens_map.json",
                           json.dumps(strings, indent=2).encode())
        inputs = ["input_ids", *(["token_type_ids"] if config.segment_inputs else []),
                  "attention_mask"]
        atomic_write_bytes(staging / "tokenizer_config.json", json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": inputs,
            "model_max_length": config.max_positions, **strings}, indent=2).encode())
        if head.lm and config.architecture != "encoder-only":
            generation = {**(meta.get("generation") or {}),
                          **{k: data[k] for k in ("pad_token_id", "bos_token_id",
                                                  "eos_token_id", "decoder_start_token_id")
                             if data.get(k) is not None}}
            atomic_write_bytes(staging / "generation_config.json",
                               json.dumps(generation, indent=2).encode())
    log(f"wrote {hf_class} ({fam.model_type}) to {out}")
    return out


def _token_strings(tokenizer_path: Path, fam: Family, ids: dict) -> dict[str, str]:
    """The tokenizer-config entries (`pad_token`, `cls_token`, …) of the special ids."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    strings = {}
    for role, key in fam.special_tokens.items():
        token_id = ids.get(role)
        token = tokenizer.id_to_token(token_id) if isinstance(token_id, int) else None
        if token is not None:
            strings[key] = token
    return strings
