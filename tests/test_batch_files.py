"""Files in, files out: `ferry generate/classify/tag/answer --input F --output G` stream a file
through the model in batches, write the output atomically, and resume an interrupted run
without computing its finished lines again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ferry.cli import main
from ferry.errors import FerryError
from ferry.runtime import load
from ferry.runtime.batch_files import infer_file

DATES = [f"{month} {day}, {1990 + day}" for month in ("March", "July", "Oct")
         for day in range(1, 14)]  # 39 lines


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_over_a_file_writes_one_line_per_input_in_order(tiny_bundle, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DATES])
    result = CliRunner().invoke(main, ["generate", str(tiny_bundle), "--input", str(source),
                                       "--output", str(tmp_path / "out.jsonl"),
                                       "--batch-size", "8", "--num-beams", "2"])
    assert result.exit_code == 0, result.output
    expected = load(tiny_bundle).generate(DATES, num_beams=2)
    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"text": t, "output": o} for t, o in zip(DATES, expected)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    assert f"wrote {len(DATES)} lines" in result.output


def test_an_interrupted_run_resumes_without_recomputing_its_finished_lines(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in DATES])
    target = tmp_path / "out.jsonl"
    seen: list[str] = []

    def upper(records):
        seen.extend(r["text"] for r in records)
        if len(seen) > 16:
            raise KeyboardInterrupt  # the third batch never lands
        return [{"output": r["text"].upper()} for r in records]

    with pytest.raises(KeyboardInterrupt):
        infer_file(source, target, upper, fields={"text": str}, settings={"a": 1},
                   batch_size=8)
    assert not target.exists()
    partial = tmp_path / ".out.jsonl.partial"
    with partial.open("ab") as f:
        f.write(b'{"text": "torn')  # a crash in the middle of a write
    seen.clear()
    with pytest.raises(FerryError, match="another input file or other settings"):
        infer_file(source, target, upper, fields={"text": str}, settings={"a": 2})
    def counted_upper(records):
        seen.extend(r["text"] for r in records)
        return [{"output": r["text"].upper()} for r in records]

    run = infer_file(source, target, counted_upper, fields={"text": str}, settings={"a": 1},
                     batch_size=8)
    assert (run.resumed, run.computed) == (16, len(DATES) - 16)
    assert seen == DATES[16:]  # only what was not on disk
    assert read_jsonl(target) == [{"text": t, "output": t.upper()} for t in DATES]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    with pytest.raises(FerryError, match="already exists"):
        infer_file(source, target, upper, fields={"text": str}, settings={"a": 1})


def test_bad_input_files_are_one_error_and_write_nothing(tmp_path):
    def echo(records):
        return [{} for _ in records]

    with pytest.raises(FerryError, match="does not exist"):
        infer_file(tmp_path / "missing.jsonl", tmp_path / "out.jsonl", echo,
                   fields={"text": str}, settings={})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(FerryError, match=r"bad.jsonl:2"):
        infer_file(bad, tmp_path / "out.jsonl", echo, fields={"text": str}, settings={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no partial left
    with pytest.raises(FerryError, match="must not be the --input"):
        infer_file(bad, bad, echo, fields={"text": str}, settings={})


@pytest.mark.parametrize(("arguments", "words"), [
    (["--input", "IN"], "give --output"),
    (["--output", "OUT"], "--output needs --input"),
    (["--input", "IN", "--output", "OUT", "--json"], "--json cannot go with --input"),
    (["--input", "IN", "--output", "OUT", "--stream"], "--stream cannot go with --input"),
    (["March 5, 2021", "--input", "IN", "--output", "OUT"], "no inputs on the command line"),
    ([], "give the inputs on the command line or as a file"),
])
def test_file_options_in_the_wrong_combination_are_refused(tiny_bundle, tmp_path, arguments,
                                                           words):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "March 5, 2021"}])
    arguments = [str(source) if a == "IN" else str(tmp_path / "out.jsonl") if a == "OUT"
                 else a for a in arguments]
    result = CliRunner().invoke(main, ["generate", str(tiny_bundle), *arguments])
    assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_classify_tag_and_answer_run_over_files_too(task_bundles, tmp_path):
    texts = ["Load the bundle and run it.", "Returns the sum.", "Export every graph."]
    cases = {
        "classify": ([{"text": t} for t in texts],
                     lambda model: model.classify(texts)),
        "tag": ([{"text": t} for t in texts], lambda model: model.tag(texts)),
        "answer": ([{"question": "What runs?", "context": t} for t in texts],
                   lambda model: model.answer(["What runs?"] * 3, texts)),
    }
    for command, (records, expected) in cases.items():
        bundle = task_bundles[command]
        source = write_jsonl(tmp_path / f"{command}.jsonl", records)
        target = tmp_path / f"{command}.out.jsonl"
        result = CliRunner().invoke(main, [command, str(bundle), "--input", str(source),
                                           "--output", str(target), "--batch-size", "2"])
        assert result.exit_code == 0, result.output
        want = json.loads(json.dumps(expected(load(bundle))))
        assert read_jsonl(target) == [{**r, **w} for r, w in zip(records, want)], command
