"""Pretraining corpora, streamed: plain-text files (one document a line), JSON Lines (a text field)
or a directory of them, tokenized once into a token file and read back as fixed-length blocks.

The corpus is never held in memory: documents stream through the tokenizer in batches and their
ids (each document ending with `</s>`) are appended to `<cache>/<key>.tokens`, a flat uint16 /
uint32 array that training memory-maps (as nanoGPT's `train.bin`). The key hashes the files'
names, sizes and modification times, the tokenizer and the text field, so a changed corpus or
tokenizer is re-tokenized and an unchanged one is not. Blocks are cut from the token file on
demand; shuffling is a seeded permutation of block indices (`global_batch_indices`), so the
data order is a pure function of seed and step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ferry.errors import FerryError
from ferry.records import iter_records

TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_SUFFIXES = (".jsonl", ".csv", ".tsv")
ENCODE_BATCH = 2048  # documents tokenized per call


def corpus_files(path: str | Path) -> list[Path]:
    """The corpus files at `path`: the file itself, or every text / JSONL file under a
    directory (recursively, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise FerryError(f"corpus directory {path} holds no {TEXT_SUFFIXES + RECORD_SUFFIXES}"
                             " files")
        return files
    raise FerryError(f"data file {path} does not exist")


def iter_documents(path: str | Path, text_field: str) -> Iterator[str]:
    """Every document of the corpus at `path`, streamed: non-empty lines of text files, the
    `text_field` of JSONL/CSV rows (checked line by line)."""
    for file in corpus_files(path):
        if file.suffix in RECORD_SUFFIXES:
            for _, row in iter_records(file, {text_field: str}):
                yield row[text_field]
            continue
        with file.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise FerryError(f"{file}:{number}: not UTF-8 text ({exc.reason})") from exc
                if line:
                    yield line


def _cache_key(files: list[Path], tokenizer: Tokenizer, text_field: str,
               separator: int | None) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps([stats, tokenizer.to_str(), text_field, separator]).encode()
    return hashlib.sha256(payload).hexdigest()[:20]


def token_file(path: str | Path, tokenizer: Tokenizer, *, text_field: str,
               cache_dir: str | Path, separator: int | None = None,
               log: Callable[[str], None] = print) -> np.ndarray:
    """The corpus's token ids as a read-only memory map, tokenizing it first (streamed, written
    atomically) unless an up-to-date token file is cached.

    `separator` (the end-of-text id) ends every document whose encoding does not already end
    with it: ferry's tokenizers append `</s>` themselves, GPT-2's adds nothing."""
    files = corpus_files(path)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    cache_dir = Path(cache_dir)
    key = _cache_key(files, tokenizer, text_field, separator)
    target = cache_dir / f"{key}.{np.dtype(dtype).name}"
    if not target.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        documents = tokens = 0
        with partial.open("wb") as out:
            batch: list[str] = []
            for text in iter_documents(path, text_field):
                batch.append(text)
                if len(batch) == ENCODE_BATCH:
                    tokens += _write_ids(out, tokenizer, batch, dtype, separator)
                    documents += len(batch)
                    batch = []
                    if documents % (50 * ENCODE_BATCH) == 0:
                        log(f"tokenizing {path}: {documents:,} documents, {tokens:,} tokens")
            tokens += _write_ids(out, tokenizer, batch, dtype, separator)
            documents += len(batch)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)  # whole or absent: a concurrent writer wrote the same bytes
        log(f"tokenized {path}: {documents:,} documents, {tokens:,} tokens → {target}")
    if target.stat().st_size == 0:
        raise FerryError(f"{path} holds no text")
    return np.memmap(target, dtype=dtype, mode="r")


def _write_ids(out, tokenizer: Tokenizer, texts: list[str], dtype, separator: int | None
               ) -> int:
    if not texts:
        return 0
    rows = [e.ids if separator is None or e.ids[-1:] == [separator] else [*e.ids, separator]
            for e in tokenizer.encode_batch(texts)]
    ids = np.fromiter((t for row in rows for t in row), dtype=dtype)
    ids.tofile(out)
    return len(ids)


class TokenBlocks(Sequence):
    """Fixed-length blocks over a token array: block i is `tokens[i·step : i·step + length]`
    with step = length − overlap (causal LM blocks share one token: inputs and shifted labels).
    Indexing returns int64 arrays; nothing is copied until a block is read."""

    def __init__(self, tokens: np.ndarray, length: int, *, overlap: int = 0, source: str = ""):
        if len(tokens) < length:
            raise FerryError(f"{source} has {len(tokens)} tokens, fewer than one block of "
                             f"{length}; lower data.block_size or add text")
        self.tokens, self.length, self.step = tokens, length, length - overlap
        self.count = (len(tokens) - length) // self.step + 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        start = (index % self.count) * self.step
        return np.asarray(self.tokens[start : start + self.length], dtype=np.int64)


def packed_blocks(path: str | Path, tokenizer: Tokenizer, *, text_field: str, length: int,
                  cache_dir: str | Path, overlap: int = 0, separator: int | None = None,
                  log: Callable[[str], None] = print) -> TokenBlocks:
    """The corpus at `path` as `length`-token blocks (documents joined, each ending with the
    end-of-text token `separator`)."""
    tokens = token_file(path, tokenizer, text_field=text_field, cache_dir=cache_dir,
                        separator=separator, log=log)
    return TokenBlocks(tokens, length, overlap=overlap, source=str(path))
