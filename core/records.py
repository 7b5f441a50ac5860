"""Reading task files: JSON Lines, or CSV/TSV with a header row, with errors that name the file
and line. Used by training (task data, corpora) and the CLI (`ferry classify --examples`
few-shot demonstrations); stdlib only, so it lives in the torch-free package root."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from ferry.errors import FerryError

Field = type  # str, int or list (a list of strings; whitespace-separated in CSV/TSV)


def read_records(path: str | Path, fields: dict[str, Field],
                 optional: dict[str, Field] | None = None) -> list[tuple[int, dict]]:
    """(line number, {field: value}) for every row of a task file, each holding `fields` (and
    `optional` fields where present); an empty file is an error. See `iter_records`."""
    records = list(iter_records(path, fields, optional))
    if not records:
        raise FerryError(f"data file {path} is empty")
    return records


def iter_records(path: str | Path, fields: dict[str, Field],
                 optional: dict[str, Field] | None = None) -> Iterator[tuple[int, dict]]:
    """Stream the rows of a task file as (line number, {field: value}).

    JSON Lines (`.jsonl`) or a table with a header row (`.csv`, `.tsv`), read line by line (a
    file of any size). Errors name the file and the line: a missing file, bad encoding, an
    empty or malformed line, a missing field or one of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FerryError(f"data file {path} does not exist")
    optional = optional or {}
    with path.open("rb") as f:
        lines = _decoded_lines(path, f)
        if path.suffix in (".csv", ".tsv"):
            rows = _table_rows(path, lines, "\t" if path.suffix == ".tsv" else ",")
        else:
            rows = _json_rows(path, lines)
        for number, row in rows:
            wanted = {**fields, **{k: v for k, v in optional.items()
                                   if row.get(k) not in (None, "")}}
            yield number, _fields(path, number, row, wanted)


def _decoded_lines(path: Path, f) -> Iterator[str]:
    for number, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FerryError(f"{path}:{number}: not UTF-8 text ({exc.reason}); save the file "
                             "as UTF-8") from exc


def _json_rows(path: Path, lines: Iterator[str]) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise FerryError(f"{path}:{number}: empty line; expected one JSON object per line")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FerryError(f"{path}:{number}: invalid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise FerryError(f"{path}:{number}: expected a JSON object, got {line[:40]}")
        yield number, row


def _table_rows(path: Path, lines: Iterator[str], delimiter: str
                ) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(lines, delimiter=delimiter)
    header = next(reader, None)
    if not header:
        raise FerryError(f"{path}:1: expected a header row naming the columns")
    line = reader.line_num
    for values in reader:
        number, line = line + 1, reader.line_num
        if not values:
            raise FerryError(f"{path}:{number}: empty line; expected {len(header)} columns")
        if len(values) != len(header):
            raise FerryError(f"{path}:{number}: {len(values)} columns, the header has "
                             f"{len(header)} ({', '.join(header)})")
        yield number, dict(zip(header, values))


def _fields(path: Path, number: int, row: dict, fields: dict[str, Field]) -> dict:
    """The wanted fields of one row, converted and checked."""
    values = {}
    for name, kind in fields.items():
        value = row.get(name)
        if kind is list and isinstance(value, str):
            value = value.split()
        if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        ok = (isinstance(value, str) if kind is str else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, list) and all(isinstance(v, str) for v in value))
        if not ok:
            expected = {str: "a string", int: "an integer", list: "a list of strings"}[kind]
            raise FerryError(f"{path}:{number}: field {name!r} is missing or not {expected} "
                             f"(the line has {sorted(row)})")
        values[name] = value
    return values


def read_examples(path: str | Path, *, text_field: str = "text", pair_field: str = "text_pair",
                  label_field: str = "label") -> list[tuple[str, str | None, str]]:
    """Few-shot demonstrations (text, pair or None, label) from a task file; the pair field is
    optional."""
    records = read_records(path, {text_field: str, label_field: str}, {pair_field: str})
    return [(row[text_field], row.get(pair_field), row[label_field]) for _, row in records]
