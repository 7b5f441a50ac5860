"""The tokenizer of a Hugging Face model directory, as one `tokenizers.Tokenizer` (what ferry's
`tokenizer.json` holds), and the ids of its special tokens.

Read in this order: `tokenizer.json` as it is; a WordPiece `vocab.txt` (BERT); a byte-level BPE
`vocab.json` + `merges.txt` (GPT-2, RoBERTa, BART); Marian's `source.spm` + `vocab.json`
(SentencePiece, converted by `ferry.train.sentencepiece_tokenizer`). A directory with only another
SentencePiece model, or nothing ferry can read, is refused with what to provide.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ferry.errors import FerryError
from ferry.model.families import Family

# The token strings of each role when the directory does not name them.
DEFAULT_TOKENS = {
    "bert": {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
             "unk_token": "[UNK]", "mask_token": "[MASK]"},
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
             "unk_token": "<|endoftext|>"},
    "marian": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}
FAIRSEQ_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "mask_token": "<mask>"}
PROVIDE = ("provide a tokenizer.json (transformers writes one: "
           "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FerryError(f"{path} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def chat_template(directory: Path) -> dict[str, Any] | None:
    """The tokenizer's chat template, {"template": Jinja source, "special_tokens": the
    `*_token` strings transformers renders it with}: `chat_template.jinja`, else
    `tokenizer_config.json`'s `chat_template` (of several named ones, "default"); None
    without one."""
    config = _json(directory / "tokenizer_config.json")
    path = directory / "chat_template.jinja"
    template = (path.read_text(encoding="utf-8") if path.is_file()
                else config.get("chat_template"))
    if isinstance(template, list):  # [{"name": "default", "template": "…"}, …]
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise FerryError(f"{directory / 'tokenizer_config.json'}: chat_template must be a string "
                         f"or a list of named templates, got {type(template).__name__}")
    if not template:
        return None
    tokens = {}
    for key, value in {**config, **_json(directory / "special_tokens_map.json")}.items():
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return {"template": template, "special_tokens": tokens}


def token_strings(directory: Path, fam: Family) -> dict[str, str]:
    """Tokenizer-config key (`pad_token`, `cls_token`, …) → token string, from
    `special_tokens_map.json` / `tokenizer_config.json`, else the family's defaults."""
    named = {**DEFAULT_TOKENS.get(fam.model_type, FAIRSEQ_TOKENS),
             **_json(directory / "tokenizer_config.json"),
             **_json(directory / "special_tokens_map.json")}
    strings = {}
    for key in fam.special_tokens.values():
        value = named.get(key)
        if isinstance(value, dict):  # {"content": "[PAD]", "lstrip": …}
            value = value.get("content")
        if isinstance(value, str):
            strings[key] = value
    return strings


def load_hf_tokenizer(directory: str | Path, fam: Family) -> Tokenizer:
    """The directory's tokenizer as a `tokenizers.Tokenizer`."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise FerryError(f"{directory / 'tokenizer.json'} is not a readable tokenizer "
                             f"({exc})") from exc
    strings = token_strings(directory, fam)
    config = _json(directory / "tokenizer_config.json")
    if (directory / "vocab.txt").is_file():
        return _wordpiece(directory / "vocab.txt", strings, config)
    if (directory / "source.spm").is_file() and (directory / "vocab.json").is_file():
        from ferry.train.sentencepiece_tokenizer import sentencepiece_tokenizer

        return sentencepiece_tokenizer(directory / "source.spm",
                                       vocab=_json(directory / "vocab.json"),
                                       append_eos=strings.get("eos_token", "</s>"))
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return _byte_level_bpe(directory, fam, strings, config)
    spm = sorted(p.name for p in directory.glob("*.model"))
    if spm:
        raise FerryError(f"{directory} has only the SentencePiece model {spm[0]}; {PROVIDE}")
    raise FerryError(f"{directory} has no tokenizer: expected tokenizer.json, vocab.txt "
                     "(WordPiece), vocab.json + merges.txt (byte-level BPE) or source.spm + "
                     f"vocab.json (Marian); {PROVIDE}")


def _wordpiece(vocab: Path, strings: dict[str, str], config: dict) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt: BERT normalisation and pre-tokenisation, WordPiece,
    `[CLS] A [SEP] B [SEP]`."""
    unk, cls, sep = (strings.get(k, d) for k, d in (("unk_token", "[UNK]"),
                                                     ("cls_token", "[CLS]"),
                                                     ("sep_token", "[SEP]")))
    tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab), unk_token=unk))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    _special(tokenizer, strings)
    tokenizer.post_processor = processors.BertProcessing(
        (sep, _id(tokenizer, sep)), (cls, _id(tokenizer, cls)))
    return tokenizer


def _byte_level_bpe(directory: Path, fam: Family, strings: dict[str, str],
                    config: dict) -> Tokenizer:
    """GPT-2 / RoBERTa / BART's tokenizer from vocab.json + merges.txt (RoBERTa and BART wrap
    texts in `<s> … </s>`; GPT-2 adds nothing)."""
    tokenizer = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"),
                                               str(directory / "merges.txt")))
    prefix_space = bool(config.get("add_prefix_space", False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tokenizer.decoder = decoders.ByteLevel()
    _special(tokenizer, strings)
    if fam.model_type == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos, eos = strings.get("bos_token", "<s>"), strings.get("eos_token", "</s>")
        tokenizer.post_processor = processors.RobertaProcessing(
            (eos, _id(tokenizer, eos)), (bos, _id(tokenizer, bos)),
            add_prefix_space=prefix_space)
    return tokenizer


def _special(tokenizer: Tokenizer, strings: dict[str, str]) -> None:
    """Mark the role tokens special (matched whole, dropped when decoding)."""
    tokenizer.add_special_tokens(sorted(set(strings.values())))


def _id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise FerryError(f"the tokenizer's vocabulary lacks its special token {token!r}")
    return token_id


def special_ids(tokenizer: Tokenizer, fam: Family, hf: dict[str, Any], strings: dict[str, str],
                generation: dict[str, Any]) -> dict[str, int | None]:
    """ferry's special-token roles (pad, bos, eos, unk, mask, decoder_start) as ids: the model
    config's ids where it has them, else the tokenizer's ids of the role tokens.

    A model without a padding token (GPT-2) pads with its end-of-text token, as its users do;
    an encoder-decoder's decoder starts from `decoder_start_token_id`, else `bos`.
    """
    ids: dict[str, int | None] = {}
    for role in ("pad", "bos", "eos", "unk", "mask"):
        configured = hf.get(f"{role}_token_id")
        token = strings.get(fam.special_tokens.get(role, ""))
        ids[role] = (configured if isinstance(configured, int)
                     else tokenizer.token_to_id(token) if token else None)
    if ids["pad"] is None:
        ids["pad"] = ids["eos"]
    start = generation.get("decoder_start_token_id", hf.get("decoder_start_token_id"))
    ids["decoder_start"] = start if isinstance(start, int) else ids["bos"]
    for role in ("pad", "eos"):
        if ids[role] is None:
            raise FerryError(f"the model names no {role} token (config.json {role}_token_id, "
                             f"or {fam.special_tokens[role]} in special_tokens_map.json)")
    if fam.fixed.get("architecture") == "encoder-decoder" and ids["decoder_start"] is None:
        raise FerryError("the model names no decoder start token (config.json "
                         "decoder_start_token_id or bos_token_id)")
    return ids
