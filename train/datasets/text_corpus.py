"""A real English corpus that every Python installation carries: the standard library's
docstrings, split into paragraphs. Small (~1 MB), offline, and prose enough for tests and
examples of the self-supervised objectives."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path

from ferry.train.datasets.dates import write_jsonl

MODULES = ("argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
           "decimal", "email", "enum", "fractions", "functools", "heapq", "http.client",
           "inspect", "io", "itertools", "json", "logging", "os", "pathlib", "pickle", "random",
           "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
           "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.parse",
           "uuid", "zipfile")


def docstring_paragraphs(min_words: int = 8) -> list[str]:
    """Prose paragraphs of the standard library's module, class and function docstrings."""
    return [p for document in docstring_documents(min_words) for p in document]


def docstring_documents(min_words: int = 8) -> list[list[str]]:
    """The prose paragraphs of each module, class or function docstring (one document each)."""
    documents: list[list[str]] = []
    seen: set[str] = set()
    with warnings.catch_warnings():  # some members are deprecated aliases (typing.io, …)
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in MODULES:
            module = importlib.import_module(name)
            objects = [module] + [obj for _, obj in inspect.getmembers(module)
                                  if inspect.isclass(obj) or inspect.isfunction(obj)]
            for obj in objects:
                paragraphs = []
                for block in (inspect.getdoc(obj) or "").split("\n\n"):
                    text = re.sub(r"\s+", " ", block).strip()
                    if (len(text.split()) >= min_words and text not in seen
                            and not text.startswith((">>>", "-", "*", "|"))):
                        seen.add(text)
                        paragraphs.append(text)
                if paragraphs:
                    documents.append(paragraphs)
    return documents


def write_text_corpus(out_dir: str | Path, *, eval_share: float = 0.05) -> dict[str, Path]:
    """`train.jsonl` / `eval.jsonl`: one paragraph a line (`text` field), every
    1/eval_share-th held out; `documents/train.jsonl` / `documents/eval.jsonl`: one whole
    docstring a line, for next-sentence prediction (pairs within and across documents)."""
    documents = docstring_documents()
    paragraphs = [p for document in documents for p in document]
    every = max(2, round(1 / eval_share))
    out_dir = Path(out_dir)
    (out_dir / "documents").mkdir(parents=True, exist_ok=True)

    def split(items: list[str], held_out: bool) -> list[dict[str, str]]:
        return [{"text": t} for i, t in enumerate(items) if (i % every == 0) == held_out]

    whole = [" ".join(document) for document in documents]
    return {
        "train": write_jsonl(out_dir / "train.jsonl", split(paragraphs, False)),
        "eval": write_jsonl(out_dir / "eval.jsonl", split(paragraphs, True)),
        "documents/train": write_jsonl(out_dir / "documents" / "train.jsonl", split(whole, False)),
        "documents/eval": write_jsonl(out_dir / "documents" / "eval.jsonl", split(whole, True)),
    }
