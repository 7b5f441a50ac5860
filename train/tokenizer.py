"""Subword tokenizer training (Hugging Face `tokenizers`): byte-level BPE with reserved tokens.

Byte-level BPE starts from all 256 bytes, so any text encodes without an unknown token (the byte
fallback). Digits are split one per token, which makes numbers and dates learnable from little
data. The saved `tokenizer.json` is the one file training, export and the runtime all use; it
appends `</s>` to every encoded text (the source convention of encoder-decoder models and the
document separator of causal LMs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes

PAD, BOS, EOS, UNK, MASK = "<pad>", "<s>", "</s>", "<unk>", "<mask>"


def sentinel(i: int) -> str:
    """The i-th sentinel token, for span corruption (T5's `<extra_id_i>`)."""
    return f"<extra_id_{i}>"


def reserved_tokens(num_sentinels: int) -> list[str]:
    """Special tokens in id order: pad=0, bos=1, eos=2, unk=3, mask=4, then the sentinels."""
    return [PAD, BOS, EOS, UNK, MASK] + [sentinel(i) for i in range(num_sentinels)]


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids every other part of ferry needs: pad, bos, eos, unk, mask, and decoder_start
    (the decoder of ferry's encoder-decoders starts from `<s>`)."""
    ids = {name: tokenizer.token_to_id(tok) for name, tok in
           (("pad", PAD), ("bos", BOS), ("eos", EOS), ("unk", UNK), ("mask", MASK))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise FerryError(
            f"tokenizer lacks the reserved token(s) {missing}; "
            "train it with `ferry train tokenizer`"
        )
    return {**ids, "decoder_start": ids["bos"]}


def iter_text_files(paths: Iterable[str | Path]) -> Iterator[str]:
    """Lines of the given text files (UTF-8), streamed."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FerryError(f"tokenizer training file {path} does not exist")
        try:
            with path.open(encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f)
        except UnicodeDecodeError as exc:
            raise FerryError(f"{path} is not UTF-8 text ({exc})") from exc


def train_tokenizer(
    texts: Iterable[str], *, vocab_size: int, num_sentinels: int = 64, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` with the reserved tokens at ids 0…."""
    special = reserved_tokens(num_sentinels)
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_id = tokenizer.token_to_id(EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1", special_tokens=[(EOS, eos_id)]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write tokenizer.json atomically."""
    path = Path(path)
    atomic_write_bytes(path, tokenizer.to_str(pretty=True).encode())
    return path
