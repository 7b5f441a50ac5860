"""Streamed pretraining corpora: files, directories and JSONL tokenized once into a memory-mapped
token file, cut into blocks on demand, never held in memory whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferry.errors import FerryError
from ferry.train.data import encode_all, global_batch_indices
from ferry.train.datasets.corpus import TokenBlocks, corpus_files, iter_documents, packed_blocks
from ferry.train.tokenizer import save_tokenizer, train_tokenizer

LINES = [f"Document number {i} talks about {w} and more {w}." for i, w in
         enumerate(["rivers", "mountains", "cities", "forests", "deserts"] * 40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(LINES, vocab_size=300, num_sentinels=2)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("\n".join(LINES[:80]) + "\n\n")
    (tmp_path / "b" / "c.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(LINES[80:150])))
    (tmp_path / "b" / "d.md").write_text("\n".join(LINES[150:]))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    return tmp_path


def test_a_directory_streams_its_files_in_sorted_order(corpus_dir):
    assert [p.name for p in corpus_files(corpus_dir)] == ["a.txt", "c.jsonl", "d.md"]
    assert list(iter_documents(corpus_dir, "text")) == LINES  # blank lines skipped


def test_blocks_are_the_joined_documents_cut_to_length(corpus_dir, tokenizer, tmp_path):
    blocks = packed_blocks(corpus_dir, tokenizer, text_field="text", length=33, overlap=1,
                           cache_dir=tmp_path / "cache", log=lambda m: None)
    stream = [t for ids in encode_all(tokenizer, LINES) for t in ids]
    assert isinstance(blocks.tokens, np.memmap)
    assert len(blocks) == (len(stream) - 33) // 32 + 1
    for i in (0, 1, len(blocks) - 1):
        assert blocks[i].tolist() == stream[i * 32 : i * 32 + 33]
        assert blocks[i].dtype == np.int64
    assert blocks[-1].tolist() == blocks[len(blocks) - 1].tolist()
    assert [b.tolist() for b in blocks[2:4]] == [blocks[2].tolist(), blocks[3].tolist()]
    with pytest.raises(IndexError):
        blocks[len(blocks)]


def test_every_document_ends_with_the_separator_once(corpus_dir, tokenizer, tmp_path):
    """ferry's tokenizers end each text with </s> themselves; a GPT-2-style one adds nothing, so
    the end-of-text separator is appended (never doubled)."""
    from tokenizers import Tokenizer

    eos = tokenizer.token_to_id("</s>")
    bare = Tokenizer.from_str(tokenizer.to_str())
    bare.post_processor = None
    streams = {}
    for name, tok in (("ferry", tokenizer), ("bare", bare)):
        blocks = packed_blocks(corpus_dir, tok, text_field="text", length=8,
                               cache_dir=tmp_path / name, separator=eos, log=lambda m: None)
        streams[name] = blocks.tokens.tolist()
    assert streams["bare"] == streams["ferry"]
    assert streams["ferry"].count(eos) == len(LINES)


def test_the_token_file_is_reused_until_the_corpus_or_tokenizer_changes(corpus_dir, tokenizer,
                                                                       tmp_path):
    messages: list[str] = []

    def load():
        return packed_blocks(corpus_dir, tokenizer, text_field="text", length=16,
                             cache_dir=tmp_path / "cache", log=messages.append)

    first = load()
    second = load()
    assert len([m for m in messages if m.startswith("tokenized")]) == 1
    assert first.tokens.filename == second.tokens.filename
    with (corpus_dir / "a.txt").open("a") as f:
        f.write("One more document.\n")
    third = load()
    assert len([m for m in messages if m.startswith("tokenized")]) == 2
    assert len(third.tokens) > len(first.tokens)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]


def test_shuffling_is_a_pure_function_of_seed_and_step():
    orders = [[global_batch_indices(step, num_examples=1000, batch_size=32, seed=seed)
               for step in range(1, 40)] for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    epoch = [i for step in orders[0][:31] for i in step]  # 31 full batches per epoch
    assert len(set(epoch)) == len(epoch)


def test_malformed_corpus_lines_are_named(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(FerryError, match=r"bad.jsonl:2: field 'text'"):
        list(iter_documents(bad, "text"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(FerryError, match=r"latin.txt:2: not UTF-8"):
        list(iter_documents(latin, "text"))
    with pytest.raises(FerryError, match="does not exist"):
        corpus_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FerryError, match="holds no"):
        corpus_files(tmp_path / "empty")
    with pytest.raises(FerryError, match="fewer than one block"):
        TokenBlocks(np.zeros(10, dtype=np.uint16), 16, source="tiny")


PEAK_MEMORY = """
import resource, sys
from tokenizers import Tokenizer
from ferry.train.datasets.corpus import token_file
tokenizer = Tokenizer.from_file(sys.argv[1])
if sys.argv[2] != "-":
    tokens = token_file(sys.argv[2], tokenizer, text_field="text", cache_dir=sys.argv[3],
                        log=lambda m: None)
    assert len(tokens) > 0
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)  # MiB
"""


def test_a_corpus_larger_than_the_memory_it_may_use_streams(tokenizer, tmp_path):
    """Tokenizing a 24 MiB corpus raises peak memory by a bounded amount (~35 MiB measured);
    reading it whole and tokenizing it into Python lists takes over 1.5 GiB."""
    corpus = tmp_path / "big.txt"
    line = (" ".join(LINES[:5]) + "\n").encode()
    with corpus.open("wb") as f:
        for _ in range(24 * 2**20 // len(line)):
            f.write(line)
    path = save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    env = {**os.environ, "RAYON_NUM_THREADS": "2"}

    def peak(*args: str) -> int:
        out = subprocess.run([sys.executable, "-c", PEAK_MEMORY, str(path), *args],
                             capture_output=True, text=True, check=True, env=env)
        return int(out.stdout.split()[-1])

    baseline = peak("-")
    used = peak(str(corpus), str(tmp_path / "cache"))
    assert used - baseline < 128, (baseline, used)
