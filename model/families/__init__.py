"""Checkpoint families ferry imports from (and exports to) Hugging Face layout, one table each
(see `family.py`): BERT, RoBERTa, ALBERT, GPT-2, BART, mBART, Marian, T5 / Flan-T5, Llama,
Mistral, Qwen2, Qwen3, XLNet."""

from ferry.errors import FerryError
from ferry.model.families import (  # noqa: F401  (register their families)
    albert,
    bart,
    bert,
    gpt2,
    llama,
    t5,
    xlnet,
)
from ferry.model.families.family import FAMILIES, Family, Head


def family(model_type: object) -> Family:
    """The family of a `config.json`'s `model_type`; an unknown one lists the supported."""
    if model_type not in FAMILIES:
        raise FerryError(f"model_type {model_type!r} is not supported; ferry imports "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "Family", "Head", "family"]
