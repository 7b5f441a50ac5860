"""SentencePiece unigram models (`*.spm`, `*.model`) as Hugging Face `tokenizers.Tokenizer`s.

Some checkpoints ship no `tokenizer.json`: Marian's (opus-mt) ship `source.spm`, `target.spm` and
a `vocab.json` whose ids differ from the spm's. Every part of ferry loads a `tokenizers.Tokenizer`,
so `sentencepiece_tokenizer` rebuilds one from the model proto: the spm's normalizer (its
precompiled charsmap and whitespace rules) as normalizers, its pieces and scores as a Unigram
model (the same Viterbi segmentation), and a Metaspace decoder. `sentencepiece` and `protobuf`
are needed only here, at conversion time; `Tokenizer.save` then writes the `tokenizer.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors

from ferry.errors import FerryError

# SentencePiece's piece types and model types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM = 1
_SPACE = "▁"


def _load_proto(model_file: Path) -> Any:  # a ModelProto; its module is imported lazily
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # protobuf is missing, or sentencepiece itself
        raise FerryError(
            f"reading {model_file} needs SentencePiece ({exc}): `pip install sentencepiece "
            "protobuf`, or provide a tokenizer.json"
        ) from exc
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, OSError
        raise FerryError(f"{model_file} is not a readable SentencePiece model ({exc})") from exc
    types = {p.type for p in proto.pieces}
    if _NORMAL not in types or _UNKNOWN not in types:
        raise FerryError(f"{model_file} is not a readable SentencePiece model (no pieces or unk)")
    return proto


def sentencepiece_tokenizer(model_file: str | Path, *, vocab: dict[str, int] | None = None,
                            append_eos: str | None = None) -> Tokenizer:
    """A `Tokenizer` that segments text as `SentencePieceProcessor(model_file).encode` does.

    Ids are the spm's, or `vocab`'s (Marian's vocab.json: piece -> id, ids 0..n-1), as
    MarianTokenizer maps spm pieces. The spm's unk and control pieces, `<pad>`, `append_eos` and
    Marian language codes (`>>fra<<`) are special tokens, kept whole wherever they appear
    (MarianTokenizer: at the start only); the text around them is encoded on its own.
    `append_eos` (Marian: "</s>") ends every encoding.

    Known differences, all rare (see the tests): spm breaks exact ties (the same pieces in
    another order) by float32 rounding; tokenizers' Precompiled drops a combining mark (or ZWNJ)
    after a character the charsmap rewrites ("E\\u0301" under nfkc_cf). With `vocab`, a spm piece
    missing from it (MarianTokenizer: unk) can't be chosen, a Unigram id naming one piece, so
    such text is segmented otherwise; and a run of several characters the spm lacks (one unk
    for MarianTokenizer) comes out as the pieces `vocab` knows of it.
    """
    model_file = Path(model_file)
    proto = _load_proto(model_file)
    kind = proto.trainer_spec.model_type
    if kind != _UNIGRAM:
        raise FerryError(
            f"{model_file} is a SentencePiece {proto.trainer_spec.ModelType.Name(kind)} model; "
            "only unigram models are converted: provide a tokenizer.json (e.g. transformers' "
            "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`)"
        )
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise FerryError(f"{model_file} treats whitespace as a suffix; provide a tokenizer.json")

    normal = [p.score for p in proto.pieces if p.type == _NORMAL]
    scores = {p.piece: p.score for p in proto.pieces if p.type == _NORMAL}
    # spm's own rule for user-defined pieces: always preferred to their characters.
    scores.update((p.piece, len(p.piece) * max(normal) - 0.1)
                  for p in proto.pieces if p.type == _USER_DEFINED)
    # Every other piece (control, byte, unused, vocab-only) must never win the Viterbi search:
    # per character it costs more than spm's dearest choice, an unk (min - 10).
    never = 2 * (min(normal) - 10.0)
    unk = next(p.piece for p in proto.pieces if p.type == _UNKNOWN)
    specials = [p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)]
    if vocab is None:
        vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    elif sorted(vocab.values()) != list(range(len(vocab))):
        raise FerryError(f"the vocabulary for {model_file} must have the ids 0..{len(vocab) - 1}")
    for token in (unk, append_eos):
        if token is not None and token not in vocab:
            raise FerryError(f"the vocabulary for {model_file} lacks the token {token!r}")
    codes = [t for t in vocab if t.startswith(">>") and t.endswith("<<")]  # MarianTokenizer's

    pieces = sorted(vocab, key=vocab.__getitem__)  # a Unigram vocabulary is indexed by id
    unigram = [(p, scores.get(p, never * len(p))) for p in pieces]
    tokenizer = Tokenizer(models.Unigram(unigram, vocab[unk], proto.trainer_spec.byte_fallback))

    spec = proto.normalizer_spec
    space = _SPACE if spec.escape_whitespaces else " "
    steps = []
    if spec.precompiled_charsmap:  # empty for the identity rule
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spm strips and collapses " " after its charsmap
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),  # onig's ^ $ match at lines
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # spm's decode drops every leading whitespace piece when it adds a dummy prefix.
    leading = [decoders.Replace(Regex(rf"\A{space}+"), "")] if spec.add_dummy_prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), *leading,
                                           decoders.Metaspace(_SPACE, prepend_scheme="never")])
    # Special tokens split the text first and each remaining part is normalized on its own
    # (dummy prefix included), as MarianTokenizer spm-encodes the text after a language code.
    wanted = [*specials, "<pad>", *([append_eos] if append_eos else []), *codes]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in dict.fromkeys(wanted) if t in vocab])
    if append_eos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A {append_eos}", pair=f"$A $B {append_eos}",
            special_tokens=[(append_eos, vocab[append_eos])])
    return tokenizer
