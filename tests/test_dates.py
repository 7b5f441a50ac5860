"""ferry.train.datasets.dates: the demo task's formats, splits, files and training config."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import re
from pathlib import Path

import pytest

from ferry.train.config import load_train_config, train_config_from_dict
from ferry.train.datasets.dates import (
    FIRST_DAY,
    FORMATS,
    LAST_DAY,
    date_pairs,
    demo_train_config,
    make_date_task,
    write_date_task,
)

REPO = Path(__file__).resolve().parents[1]

ORDINAL = re.compile(r"\b(\d{1,2})(st|nd|rd|th)\b")


def expected_suffix(day: int) -> str:
    if day in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def strip_ordinal(text: str) -> str:
    """'5th of March' → '5 of March', checking the suffix is the right English one."""
    match = ORDINAL.search(text)
    assert match, f"no ordinal day in {text!r}"
    assert match.group(2) == expected_suffix(int(match.group(1))), text
    return ORDINAL.sub(r"\1", text)


def check_weekday(text: str, day: dt.date) -> str:
    weekday, rest = text.split(", ", 1)
    assert weekday == day.strftime("%A"), text
    return rest


# One independent parser per FORMATS entry (strptime reads %d/%m without zero padding and
# month names in any case): each must recover the date from the string alone.
PARSERS = [
    lambda s, d: dt.datetime.strptime(s, "%B %d, %Y"),
    lambda s, d: dt.datetime.strptime(s, "%d %B %Y"),
    lambda s, d: dt.datetime.strptime(s, "%b %d, %Y"),
    lambda s, d: dt.datetime.strptime(s, "%d %b %Y"),
    lambda s, d: dt.datetime.strptime(check_weekday(s, d), "%B %d, %Y"),
    lambda s, d: dt.datetime.strptime(strip_ordinal(s), "%d of %B, %Y"),
    lambda s, d: dt.datetime.strptime(strip_ordinal(s), "%B %d %Y"),
    lambda s, d: dt.datetime.strptime(s, "%m/%d/%Y"),
    lambda s, d: dt.datetime.strptime(s, "%m/%d/%Y"),
    lambda s, d: dt.datetime.strptime(s, "%d.%m.%Y"),
    lambda s, d: dt.datetime.strptime(s, "%Y.%m.%d"),
    lambda s, d: dt.datetime.strptime(s, "%B %d %Y"),
]

SAMPLE_DAYS = [
    FIRST_DAY, LAST_DAY, dt.date(2000, 2, 29), dt.date(1999, 12, 31), dt.date(2021, 3, 5),
    dt.date(1987, 7, 4),
] + [dt.date(1950 + day, 1 + day % 12, day) for day in (1, 2, 3, 11, 12, 13, 21, 22, 23, 28)] + [
    dt.date(2024, 1, 31), dt.date(1903, 5, 30), dt.date(2010, 10, 10),
]


def test_every_format_has_a_parser():
    assert len(PARSERS) == len(FORMATS)


@pytest.mark.parametrize("index", range(len(FORMATS)))
def test_every_format_keeps_the_date_recoverable(index):
    rng = random.Random(index)
    days = SAMPLE_DAYS + [FIRST_DAY + dt.timedelta(days=rng.randrange(73000)) for _ in range(200)]
    for day in days:
        text = FORMATS[index](day)
        assert PARSERS[index](text, day).date() == day, (index, text, day)


def test_slash_is_month_first_and_dot_is_day_first():
    day = dt.date(2021, 3, 5)
    texts = {fmt(day) for fmt in FORMATS}
    assert "03/05/2021" in texts and "3/5/2021" in texts
    assert "5.3.2021" in texts and "2021.03.05" in texts
    assert "5th of March, 2021" in texts


def test_date_pairs_targets_are_iso():
    days = SAMPLE_DAYS
    pairs = date_pairs(days, random.Random(0))
    assert [p["target"] for p in pairs] == [d.isoformat() for d in days]
    assert all(set(p) == {"source", "target"} for p in pairs)


def test_make_date_task_is_deterministic_per_seed():
    a = make_date_task(num_train=300, num_eval=50, seed=7)
    b = make_date_task(num_train=300, num_eval=50, seed=7)
    c = make_date_task(num_train=300, num_eval=50, seed=8)
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]
    assert len(a[0]) == 300 and len(a[1]) == 50


def test_make_date_task_uses_many_formats_and_the_whole_range():
    train_rows, _ = make_date_task(num_train=2000, num_eval=10, seed=0)
    years = {int(row["target"][:4]) for row in train_rows}
    assert min(years) < 1920 and max(years) > 2080
    assert all(FIRST_DAY.isoformat() <= row["target"] <= LAST_DAY.isoformat()
               for row in train_rows)
    # every format shows up (a source is produced by exactly one of them for its own day)
    used = set()
    for row in train_rows:
        day = dt.date.fromisoformat(row["target"])
        used |= {i for i, fmt in enumerate(FORMATS) if fmt(day) == row["source"]}
    assert used == set(range(len(FORMATS)))


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_train_and_eval_share_no_calendar_day(seed):
    train_rows, eval_rows = make_date_task(num_train=5000, num_eval=500, seed=seed)
    train_days = [row["target"] for row in train_rows]
    eval_days = [row["target"] for row in eval_rows]
    assert not set(train_days) & set(eval_days)
    assert len(set(train_days)) == len(train_days)
    assert len(set(eval_days)) == len(eval_days)
    for row in train_rows[:50] + eval_rows[:50]:
        assert dt.date.fromisoformat(row["target"]).isoformat() == row["target"]


def test_write_date_task_writes_jsonl(tmp_path):
    paths = write_date_task(tmp_path / "data", num_train=120, num_eval=30, seed=4)
    assert paths == {"train": tmp_path / "data" / "train.jsonl",
                     "eval": tmp_path / "data" / "eval.jsonl"}
    expected_train, expected_eval = make_date_task(num_train=120, num_eval=30, seed=4)
    for name, expected in (("train", expected_train), ("eval", expected_eval)):
        text = paths[name].read_text(encoding="utf-8")
        assert text.endswith("\n")
        lines = text.split("\n")[:-1]
        assert len(lines) == len(expected)
        rows = [json.loads(line) for line in lines]
        assert all(set(row) == {"source", "target"} for row in rows)
        assert all(isinstance(row["source"], str) and row["source"] for row in rows)
        assert rows == expected


def test_demo_train_config_mirrors_examples_dates_yaml(tmp_path):
    demo = train_config_from_dict(demo_train_config(tmp_path / "data", tmp_path / "run"))
    assert demo.out_dir == str(tmp_path / "run")
    assert demo.data.train == str(tmp_path / "data" / "train.jsonl")
    assert demo.data.eval == str(tmp_path / "data" / "eval.jsonl")

    example = load_train_config(REPO / "examples" / "dates.yaml")
    aligned = dataclasses.replace(
        demo, out_dir=example.out_dir,
        data=dataclasses.replace(demo.data, train=example.data.train, eval=example.data.eval),
    )
    assert aligned == example
    assert aligned.to_dict() == example.to_dict()
