"""Task metrics reported on the eval split: accuracy, macro-F1, entity-level F1 over BIO tags,
SQuAD exact match / token F1, BLEU and chrF (sacrebleu). BIO tags are read into entity spans by
`ferry.runtime.text_tasks.bio_entities`, which the runtime's tagger also uses."""

from __future__ import annotations

import re
import string
from collections import Counter

import sacrebleu

from ferry.runtime.text_tasks import bio_entities


def accuracy(expected: list, predicted: list) -> float:
    return sum(e == p for e, p in zip(expected, predicted)) / max(len(expected), 1)


def macro_f1(expected: list[int], predicted: list[int], num_labels: int) -> float:
    """Unweighted mean of the per-class F1 over classes that occur in either list."""
    scores = []
    for label in range(num_labels):
        hits = sum(e == p == label for e, p in zip(expected, predicted))
        gold, found = expected.count(label), predicted.count(label)
        if gold or found:
            scores.append(2 * hits / (gold + found))
    return sum(scores) / max(len(scores), 1)


def entity_f1(expected: list[list[str]], predicted: list[list[str]]) -> float:
    """Entity-level micro F1 over sentences of BIO tags (an entity counts when type and span
    both match)."""
    gold = {(i, *e) for i, tags in enumerate(expected) for e in bio_entities(tags)}
    found = {(i, *e) for i, tags in enumerate(predicted) for e in bio_entities(tags)}
    hits = len(gold & found)
    if not hits:
        return 0.0
    precision, recall = hits / len(found), hits / len(gold)
    return 2 * precision * recall / (precision + recall)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, articles or extra spaces."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(expected: str, predicted: str) -> float:
    """SQuAD token-overlap F1 of one answer."""
    gold, found = normalize_answer(expected).split(), normalize_answer(predicted).split()
    common = sum((Counter(gold) & Counter(found)).values())
    if not common:
        return float(gold == found)
    precision, recall = common / len(found), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def answer_scores(expected: list[str], predicted: list[str]) -> dict[str, float]:
    """Exact match and mean token F1 of answers, after SQuAD normalisation."""
    n = max(len(expected), 1)
    return {"exact_match": sum(normalize_answer(e) == normalize_answer(p)
                               for e, p in zip(expected, predicted)) / n,
            "f1": sum(answer_f1(e, p) for e, p in zip(expected, predicted)) / n}


def translation_scores(references: list[str], hypotheses: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu's defaults), on a 0–100 scale."""
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}
