"""Generated fine-tuning tasks (nothing downloaded), one per task head, each learnable by a small
model on a CPU in minutes and measured against a trivial baseline:

- `seasons/` (CSV): which season a sentence's date falls in — classification, 4 classes;
- `same_day/` (JSONL): do two dates written differently name the same day — pair classification;
- `entities/` (JSONL): people, places and dates in sentences — BIO token classification;
- `qa/` (JSONL): questions about short biographies — extractive question answering;
- `stories/` (JSONL, `text`): multi-sentence biographies, one per line — a corpus on which
  next-sentence prediction is learnable at small scale (a continuation keeps its person).

Train and eval use disjoint calendar days, so eval measures generalisation, not recall.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import random
from pathlib import Path

from ferry.files import atomic_write_bytes
from ferry.train.datasets.dates import FIRST_DAY, FORMATS, LAST_DAY, write_jsonl

PEOPLE = ["Anna Schmidt", "Ben", "Chen Wei", "Dara", "Elena Rossi", "Farid", "Grace Hopper",
          "Hugo", "Ines Duarte", "Jonas", "Kenji Sato", "Lena", "Marta Nowak", "Nils", "Olga",
          "Pablo Ruiz", "Qiu Ling", "Rosa", "Samir Haddad", "Tove", "Umar", "Vera Ivanova",
          "Wen", "Yusuf Demir", "Zoe"]
PLACES = ["Lisbon", "Oslo", "New York", "Kyoto", "Cairo", "Buenos Aires", "Lagos", "Berlin",
          "Hanoi", "Quito", "San Francisco", "Tunis", "Vienna", "Perth", "Lima", "Rome",
          "Cape Town", "Dublin", "Seoul", "Tallinn"]
SEASONS = {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring",
           6: "summer", 7: "summer", 8: "summer", 9: "autumn", 10: "autumn", 11: "autumn"}
EVENT_TEMPLATES = ["{PER} flew to {LOC} on {DATE} .", "On {DATE} , {PER} opened a shop in {LOC} .",
                   "{PER} met a friend in {LOC} .", "The concert in {LOC} was on {DATE} .",
                   "{PER} left {LOC} on {DATE} and never came back .",
                   "We saw {PER} near the station .", "{LOC} hosted the fair on {DATE} .",
                   "{PER} wrote to {PER} from {LOC} ."]


def _split_days(rng: random.Random, num_train: int, num_eval: int) -> tuple[list, list]:
    span = (LAST_DAY - FIRST_DAY).days + 1
    days = [FIRST_DAY + dt.timedelta(days=o) for o in rng.sample(range(span), num_train + num_eval)]
    return days[:num_train], days[num_train:]


def season_rows(days: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    return [{"text": f"{rng.choice(PEOPLE)} arrives on {rng.choice(FORMATS)(d)}.",
             "label": SEASONS[d.month]} for d in days]


def same_day_rows(days: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for d in days:
        same = rng.random() < 0.5
        # A different day: another year, or the same year and another month.
        other = d if same else (
            FIRST_DAY + dt.timedelta(days=rng.randrange((LAST_DAY - FIRST_DAY).days))
            if rng.random() < 0.5 else d.replace(month=rng.choice(
                [m for m in range(1, 13) if m != d.month]), day=min(d.day, 28)))
        first, second = rng.sample(FORMATS, 2)
        rows.append({"text": first(d), "text_pair": second(other),
                     "label": "same" if same else "different"})
    return rows


def entity_rows(days: list[dt.date], rng: random.Random) -> list[dict[str, list[str]]]:
    rows = []
    for d in days:
        words, tags = [], []
        for piece in rng.choice(EVENT_TEMPLATES).split():
            kind = piece[1:-1] if piece.startswith("{") else None
            value = (piece if kind is None else rng.choice(PEOPLE) if kind == "PER" else
                     rng.choice(PLACES) if kind == "LOC" else rng.choice(FORMATS[:7])(d))
            for i, word in enumerate(value.split()):
                words.append(word)
                tags.append("O" if kind is None else f"{'B' if i == 0 else 'I'}-{kind}")
        rows.append({"tokens": words, "tags": tags})
    return rows


def qa_rows(days: list[dt.date], rng: random.Random) -> list[dict]:
    rows = []
    for d in days:
        people = rng.sample(PEOPLE, 3)
        places = rng.sample(PLACES, 3)
        births = [d] + [d + dt.timedelta(days=rng.randint(-4000, 4000)) for _ in range(2)]
        facts = [(p, c, rng.choice(FORMATS[:7])(b)) for p, c, b in zip(people, places, births)]
        context = " ".join(f"{p} was born in {c} on {b}." for p, c, b in facts)
        person, place, born = rng.choice(facts)
        question, answer = rng.choice([(f"Where was {person} born?", place),
                                       (f"When was {person} born?", born),
                                       (f"Who was born in {place}?", person)])
        start = context.index(answer if answer != person else f"{person} was born")
        rows.append({"question": question, "context": context, "answer": answer,
                     "answer_start": start})
    return rows


STORY_SENTENCES = ["{P} was born in {C} on {D}.", "{P} studied music in {C}.",
                   "As a child, {P} spent every summer in {C}.", "{P} later moved to {C}.",
                   "In {Y}, {P} opened a small bookshop in {C}.", "{P} wrote three novels.",
                   "Friends in {C} remember {P} as generous.", "{P} married in {C} in {Y}.",
                   "{P} retired to {C}.", "{P} died in {C} on {D}."]


def story_rows(days: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for d in days:
        person = rng.choice(PEOPLE)
        sentences = [STORY_SENTENCES[0]] + rng.sample(STORY_SENTENCES[1:-1], rng.randint(2, 5))
        text = " ".join(t.replace("{P}", person).replace("{C}", rng.choice(PLACES))
                        .replace("{D}", rng.choice(FORMATS[:7])(d))
                        .replace("{Y}", str(d.year + rng.randint(10, 60))) for t in sentences)
        rows.append({"text": text})
    return rows


def write_csv(path: str | Path, rows: list[dict[str, str]]) -> Path:
    """Write rows as CSV with a header, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return Path(path)


def write_task_data(out_dir: str | Path, *, num_train: int = 4000, num_eval: int = 400,
                    seed: int = 0) -> dict[str, Path]:
    """Write every generated task under `out_dir/<task>/{train,eval}.{csv,jsonl}`."""
    out = Path(out_dir)
    written = {}
    makers = {"seasons": (season_rows, write_csv, "csv"),
              "same_day": (same_day_rows, write_jsonl, "jsonl"),
              "entities": (entity_rows, write_jsonl, "jsonl"),
              "qa": (qa_rows, write_jsonl, "jsonl"),
              "stories": (story_rows, write_jsonl, "jsonl")}
    for offset, (task, (make, write, suffix)) in enumerate(makers.items()):
        rng = random.Random(seed * 1009 + offset)
        train_days, eval_days = _split_days(rng, num_train, num_eval)
        for split, days in (("train", train_days), ("eval", eval_days)):
            path = out / task / f"{split}.{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            written[f"{task}/{split}"] = write(path, make(days, rng))
    return written
