"""Offline inference on files of any size: a JSON Lines / CSV / TSV file streamed through a model
in batches, one JSON line out per record in, written into a hidden partial file that becomes the
output by one rename when every line is done. An interrupted run resumes from the partial file
(lines already written are not computed again) provided the input and the settings are those it
started with."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError
from ferry.records import iter_records

# (records of one batch, each {field: value}) → one result object per record
BatchInference = Callable[[list[dict]], list[dict]]


# the fields a record of each command carries: (required, optional)
COMMAND_FIELDS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "generate": ({"text": str}, {}),
    "classify": ({"text": str}, {"text_pair": str}),
    "tag": ({"text": str}, {}),
    "answer": ({"question": str, "context": str}, {}),
}


def batch_inference(model, command: str, **arguments) -> BatchInference:
    """`command` of a loaded model (`ferry.runtime.load`) on records of its `COMMAND_FIELDS`:
    one result object per record — {"output"} for generate, what `classify` / `tag` /
    `answer` return otherwise. `arguments` go to the model's method."""
    if command == "generate":
        return lambda records: [{"output": output} for output in model.generate(
            [r["text"] for r in records], **arguments)]
    if command == "classify":
        def classified(records: list[dict]) -> list[dict]:
            paired = ["text_pair" in r for r in records]
            if any(paired) and not all(paired):
                raise FerryError("give a text_pair on every line or on none")
            return model.classify([r["text"] for r in records],
                                  [r["text_pair"] for r in records] if all(paired) else None,
                                  **arguments)
        return classified
    if command == "tag":
        return lambda records: model.tag([r["text"] for r in records], **arguments)
    if command == "answer":
        return lambda records: model.answer([r["question"] for r in records],
                                            [r["context"] for r in records], **arguments)
    raise FerryError(f"unknown command {command!r}; one of {sorted(COMMAND_FIELDS)}")


@dataclass(frozen=True)
class FileRun:
    """What `infer_file` did: lines written by this run, lines found done from an earlier one."""

    output: Path
    computed: int
    resumed: int


def infer_file(source: str | Path, target: str | Path, infer: BatchInference, *,
               fields: dict[str, type], optional: dict[str, type] | None = None,
               settings: dict, batch_size: int = 32,
               progress: Callable[[int, int], None] | None = None) -> FileRun:
    """Write `infer`'s result for every record of `source` to `target` (JSON Lines, in input
    order: each line the record's fields and its result). An interruption (a signal, a crash)
    leaves a partial file the same call resumes; a FerryError (a bad line, an input the model
    refuses) removes it, as a corrected input or other settings could not resume it.

    Args:
        fields, optional: the fields every record must have / may have (`iter_records`).
        settings: what the results depend on besides the input (model, backend, options): a
            partial file written under other settings is not resumed.
        progress: called after each batch with (lines done, lines in all).
    """
    source, target = Path(source), Path(target)
    if batch_size < 1:
        raise FerryError(f"--batch-size must be ≥ 1, got {batch_size}")
    if source.resolve() == target.resolve():
        raise FerryError("--output must not be the --input file")
    if target.exists():
        raise FerryError(f"{target} already exists; give another --output or remove it")
    total = _record_count(source)
    partial, state_path = _partial_paths(target)
    state = {"input": str(source.resolve()), "input_bytes": source.stat().st_size,
             "input_mtime_ns": source.stat().st_mtime_ns, "settings": settings}
    done = _resumable_lines(partial, state_path, state)
    if done == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state))
        partial.write_bytes(b"")
    records = iter_records(source, fields, optional)
    for _ in range(done):
        next(records, None)
    written = 0
    if progress:
        progress(done, total)
    try:
        with partial.open("ab") as out:
            for batch in _batches(records, batch_size):
                results = infer(batch)
                out.write(b"".join(json.dumps({**record, **result}, ensure_ascii=False)
                                   .encode() + b"\n"
                                   for record, result in zip(batch, results)))
                out.flush()
                os.fsync(out.fileno())  # a line on disk is a line not computed again
                written += len(batch)
                if progress:
                    progress(done + written, total)
    except FerryError:
        # bad data or settings: the fixed file or the new settings could not resume this
        partial.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    state_path.unlink(missing_ok=True)
    return FileRun(target, written, done)


def _partial_paths(target: Path) -> tuple[Path, Path]:
    return (target.with_name(f".{target.name}.partial"),
            target.with_name(f".{target.name}.partial.json"))


def _record_count(source: Path) -> int:
    if not source.is_file():
        raise FerryError(f"input file {source} does not exist")
    with source.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return max(0, lines - 1) if source.suffix in (".csv", ".tsv") else lines


def _resumable_lines(partial: Path, state_path: Path, state: dict) -> int:
    """Complete lines of an earlier run's partial file (a torn last line is cut off), or 0
    when there is none; a partial file of another input or other settings is an error."""
    if not partial.exists():
        return 0
    try:
        earlier = json.loads(state_path.read_text())
    except (OSError, ValueError):
        earlier = None
    if earlier != state:
        raise FerryError(f"{partial} was written for another input file or other settings; "
                         f"remove it (and {state_path.name}) to start over")
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with partial.open("r+b") as f:
            f.truncate(len(complete))
    return complete.count(b"\n")


def _batches(records: Iterator[tuple[int, dict]], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for _, record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ProgressLine:
    """`done/total lines, rate` on one stderr line, redrawn at most every half second."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream, self.started, self.drawn = stream, time.monotonic(), 0.0
        self.first: int | None = None  # lines already done when the run began

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.started = done, now
        if now - self.drawn < 0.5 and done < total:
            return
        self.drawn = now
        rate = (done - self.first) / max(now - self.started, 1e-9)
        self.stream.write(f"\r{done:,}/{total:,} lines ({rate:,.1f}/s)")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
