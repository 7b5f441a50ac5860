"""Malformed task files: one clear line naming the file and line, exit status 2, nothing
written over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ferry.cli import main
from ferry.errors import FerryError
from ferry.records import read_examples, read_records
from ferry.train.datasets.task_data import write_task_data


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("task-files")
    write_task_data(directory, num_train=300, num_eval=40, seed=5)
    return directory


def finetune(tmp_path: Path, objective: str, train: Path, eval_: Path) -> tuple:
    config = {"objective": objective, "out_dir": str(tmp_path / "run"),
              "model": {"preset": "tiny", "overrides": {"architecture": "encoder-only"}},
              "tokenizer": {"vocab_size": 300, "num_sentinels": 2},
              "data": {"train": str(train), "eval": str(eval_), "max_source_len": 256},
              "optim": {"max_steps": 2, "batch_size": 8}, "eval": {"every": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["train", "finetune", "--config", str(path)])
    return result.exit_code, result.output


def broken_copy(source: Path, tmp_path: Path, line: int, replacement: bytes) -> Path:
    """`source` with its 1-based `line` replaced by raw bytes."""
    lines = source.read_bytes().split(b"\n")
    lines[line - 1] = replacement
    target = tmp_path / f"broken{source.suffix}"
    target.write_bytes(b"\n".join(lines))
    return target


CASES = {
    "csv missing column": ("classification", "seasons", "csv", 4, b"only one column",
                           "1 columns, the header has 2"),
    "csv unknown label": ("classification", "seasons", "csv", 3,
                          b"Ben arrives on 1 May 1990.,monsoon", "unknown label 'monsoon'"),
    "csv empty line": ("classification", "seasons", "csv", 5, b"", "empty line"),
    "csv wrong encoding": ("classification", "seasons", "csv", 6,
                           "Ben arrives on 1 Mai 1990 à Zürich,spring".encode("latin-1"),
                           "not UTF-8"),
    "jsonl missing field": ("token_classification", "entities", "jsonl", 2,
                            b'{"tokens": ["Ben", "."]}', "field 'tags' is missing"),
    "jsonl tag count": ("token_classification", "entities", "jsonl", 7,
                        b'{"tokens": ["Ben", "ran"], "tags": ["B-PER"]}', "2 words but 1 tags"),
    "jsonl unknown tag": ("token_classification", "entities", "jsonl", 3,
                          b'{"tokens": ["Ben"], "tags": ["B-ORG"]}', "unknown label 'B-ORG'"),
    "jsonl empty line": ("token_classification", "entities", "jsonl", 9, b"", "empty line"),
    "qa answer not at offset": ("question_answering", "qa", "jsonl", 4,
                                b'{"question": "q?", "context": "Ben was here.", "answer": '
                                b'"Oslo", "answer_start": 0}', "is not in the context"),
    "qa offset not an integer": ("question_answering", "qa", "jsonl", 2,
                                 b'{"question": "q?", "context": "Ben", "answer": "Ben", '
                                 b'"answer_start": "zero"}', "not an integer"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_eval_file_names_file_and_line_and_exits_2(tasks, tmp_path, case):
    objective, task, suffix, line, replacement, message = CASES[case]
    eval_file = broken_copy(tasks / task / f"eval.{suffix}", tmp_path, line, replacement)
    code, output = finetune(tmp_path, objective, tasks / task / f"train.{suffix}", eval_file)
    assert code == 2, output
    error = [x for x in output.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and f"{eval_file}:{line}:" in error[0] and message in error[0]
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_tsv_and_csv_read_alike(tmp_path):
    csv_file, tsv_file = tmp_path / "a.csv", tmp_path / "a.tsv"
    csv_file.write_text('text,label\n"hello, world",greeting\nbye,farewell\n')
    tsv_file.write_text("text\tlabel\nhello, world\tgreeting\nbye\tfarewell\n")
    fields = {"text": str, "label": str}
    assert read_records(csv_file, fields) == read_records(tsv_file, fields) == [
        (2, {"text": "hello, world", "label": "greeting"}),
        (3, {"text": "bye", "label": "farewell"})]


def test_list_fields_in_csv_are_space_separated(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("tokens,tags\nBen ran,B-PER O\n")
    assert read_records(path, {"tokens": list, "tags": list}) == [
        (2, {"tokens": ["Ben", "ran"], "tags": ["B-PER", "O"]})]


def test_few_shot_examples_file_with_optional_pairs(tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "text_pair": "c", "label": "y"}\n')
    assert read_examples(path) == [("a", None, "x"), ("b", "c", "y")]
    path.write_text('{"text": "a"}\n')
    with pytest.raises(FerryError, match=r"shots.jsonl:1: field 'label'"):
        read_examples(path)
