"""What a checkpoint family is: a table, read the same way for every family.

A `Family` maps a Hugging Face `config.json` (by its `model_type`) to ferry's `TransformerConfig`,
the family's tensor names to ferry's (with the few transposes and splits it needs), and its model
classes (`BertForSequenceClassification`, …) to ferry's heads. `ferry.model.hf_checkpoint` walks
any family's table in both directions; a new family is a new table and a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import FerryError

# Hugging Face `hidden_act` / `activation_function` names → ferry's `activation`.
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu", "silu": "silu"}

TensorEntry = tuple[str, ...]  # (ferry module or tensor, HF name, HF aliases …)


@dataclass(frozen=True)
class Head:
    """One model class of a family: what it adds to the body, as ferry sees it.

    Args:
        task_kind: the ferry task the head serves (`manifest["task"]["kind"]`).
        lm: whether the class carries the vocabulary head (generation, masked-LM logits).
        config: ferry config fields it implies, e.g. `{"task_head": "question_answering"}`.
        tensors: its tensors outside the body, as (ferry, HF name, HF aliases …).
        labels: fixed class names (next-sentence prediction); otherwise `id2label`'s.
    """

    task_kind: str
    lm: bool
    config: dict[str, Any] = field(default_factory=dict)
    tensors: tuple[TensorEntry, ...] = ()
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Family:
    """A checkpoint family: its config fields, tensor names, heads and special tokens.

    Tensor names are written without the body prefix (`bert.`, `model.`, …): checkpoints of a
    family's base class (`BertModel`) have none, its task classes prefix the body. `{i}` stands
    for a layer index.

    Args:
        model_type: `config.json`'s `model_type`.
        hf_defaults: the HF config class's defaults for fields a `config.json` may omit.
        body_prefix: the task classes' prefix of the body's tensors.
        base_class: the class without a head (its tensors carry no prefix).
        config_fields: ferry field ← HF field, copied as they are.
        fixed: ferry fields every model of the family has.
        requires: HF field → the values ferry can express; anything else is refused by name.
        derived: HF config → further ferry fields (computed ones, and checks).
        hf_config: ferry config → HF fields besides the copied ones (the reverse of `derived`).
        tensors: the body's tensors, (ferry module or tensor, HF name, HF aliases …).
        config_tensors: ferry config → further body tensors whose names depend on it (T5's
            feed-forward: `wi`, or `wi_0` / `wi_1` when gated).
        heads: HF class name → `Head`.
        transposed: HF modules whose weights are stored (in, out) (GPT-2's Conv1D).
        fused: HF module → the ferry modules it concatenates along its outputs (GPT-2's c_attn).
        optional: HF tensors that may be present without being loaded: causal-mask buffers,
            sinusoid tables recomputed from the config, a pooler no head uses, tied copies.
        zero_when_absent: ferry tensors that start at zero when a checkpoint lacks them
            (`BartModel` has no `final_logits_bias`).
        unsqueezed: HF tensors stored with a leading dimension of 1 (`final_logits_bias`).
        head_split: HF modules whose projection is a bare (d_model, heads, head_dim) tensor
            (XLNet's `rel_attn.q`): read as (d_model, heads·head_dim), then transposed if
            `transposed` lists them too.
        zeros_for_hf: ferry config → HF tensors (name → shape) written as zeros because the
            family's classes always hold them and the ferry model lacks them (BERT's segment
            table for a model without segments: one zero row adds nothing).
        special_tokens: ferry role (pad, bos, eos, unk, mask) → the tokenizer-config key that
            names its token (BERT's bos is `cls_token`).
    """

    model_type: str
    body_prefix: str
    base_class: str
    config_fields: dict[str, str]
    fixed: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    heads: dict[str, Head]
    requires: dict[str, tuple] = field(default_factory=dict)
    hf_defaults: dict[str, Any] = field(default_factory=dict)
    derived: Callable[[dict], dict] = lambda hf: {}
    hf_config: Callable[[dict], dict] = lambda ferry: {}
    config_tensors: Callable[[dict], tuple[TensorEntry, ...]] = lambda ferry: ()
    transposed: tuple[str, ...] = ()
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    optional: tuple[str, ...] = ()
    zero_when_absent: tuple[str, ...] = ()
    unsqueezed: tuple[str, ...] = ()
    head_split: tuple[str, ...] = ()
    zeros_for_hf: Callable[[dict], dict[str, tuple[int, ...]]] = lambda ferry: {}
    special_tokens: dict[str, str] = field(default_factory=lambda: {
        "pad": "pad_token", "bos": "bos_token", "eos": "eos_token", "unk": "unk_token",
        "mask": "mask_token"})

    def head(self, hf_class: str) -> Head:
        """The head of an HF model class; an unknown class lists the supported ones."""
        if hf_class not in self.heads:
            raise FerryError(f"{self.model_type} model class {hf_class} is not supported; "
                             f"ferry imports {sorted(self.heads)}")
        return self.heads[hf_class]


def hf_activation(name: Any, field_name: str) -> str:
    """ferry's activation for an HF activation name; others are refused by name."""
    if name not in HF_ACTIVATIONS:
        raise FerryError(f"{field_name}={name!r} cannot be expressed in ferry; supported: "
                         f"{sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make `family` importable by its `model_type`."""
    FAMILIES[family.model_type] = family
    return family
