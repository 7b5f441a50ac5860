"""The model cut into the graphs that are exported and served (see `ferry.graph_spec`).

Each wrapper's `forward(*inputs)` takes its inputs positionally in the spec's input order and
returns a tuple in the spec's output order, so the exporter and the torch runtime backend both
drive it from the spec alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ferry.graph_spec import (
    GraphSpec,
    MemoryShape,
    decoder_only_specs,
    encoder_decoder_specs,
    single_pass_specs,
)
from ferry.model.config import TransformerConfig
from ferry.model.kv_cache import StaticKeyValue
from ferry.model.recurrent_encoder import Memory
from ferry.model.transformer import Transformer


def graph_specs(config: TransformerConfig, *, lm: bool | None = None) -> dict[str, GraphSpec]:
    """The graph specs of a model with this config.

    Args:
        lm: encoder-only / decoder-only models: also serve the vocabulary logits (`lm` graph).
            Default: only when the model has no task head.
    """
    if config.architecture != "encoder-decoder":
        lm = config.task_head == "none" if lm is None else lm
        generative = lm and config.architecture == "decoder-only"
        specs = single_pass_specs(
            vocab_size=config.vocab_size, max_positions=config.max_positions,
            segments=config.segment_inputs, task_head=config.task_head,
            num_labels=config.num_labels, lm=lm and not generative,
            memory=MemoryShape(config.num_encoder_layers, config.d_model, config.memory_length)
            if config.memory_length else None,
        )
        if generative:  # a decoder-only LM scores and generates with its cached graphs
            specs.update(decoder_only_specs(
                num_layers=config.num_decoder_layers, num_heads=config.kv_heads,
                head_dim=config.head_dim, vocab_size=config.vocab_size,
                max_positions=config.max_positions))
        return specs
    return encoder_decoder_specs(
        num_decoder_layers=config.num_decoder_layers, num_heads=config.kv_heads,
        head_dim=config.head_dim, d_model=config.d_model, vocab_size=config.vocab_size,
        max_positions=config.max_positions,
    )


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k0, v0, k1, v1, …) → [(k0, v0), (k1, v1), …]."""
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flat(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return tuple(t for pair in pairs for t in pair)


class EncoderGraph(nn.Module):
    """input_ids, attention_mask → encoder_hidden_states, cross_key_0, cross_value_0, …"""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        input_ids, attention_mask = inputs
        memory = self.model.encode(input_ids, attention_mask)  # (B, S, D)
        return (memory, *_flat(self.model.cross_key_values(memory)))


class DecoderInitGraph(nn.Module):
    """input_ids, encoder_attention_mask, cross_* → logits, present_key_0, present_value_0, …

    Decoder-only: input_ids (a left-padded prompt), attention_mask → logits, present_*.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        if self.model.config.architecture == "decoder-only":
            input_ids, attention_mask = inputs
            logits, presents = self.model.decode(input_ids, attention_mask=attention_mask)
            return (logits, *_flat(presents))
        input_ids, encoder_attention_mask, *cross = inputs
        logits, presents = self.model.decode(
            input_ids, cross_key_values=_pairs(cross),
            encoder_attention_mask=encoder_attention_mask,
        )
        return (logits, *_flat(presents))


class DecoderStepGraph(nn.Module):
    """input_ids (B, 1), attention_mask (B, P+1), encoder_attention_mask, cross_*, past_* →
    logits, present_* (bundles exported before the step took the decoder's attention_mask:
    without it).

    Decoder-only: input_ids (B, T) (one new token, or a chunk of a long prompt), attention_mask
    (B, P+T) over the cached and the new positions, past_* → the last position's logits
    (B, 1, V), present_*.
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.num_kv = 2 * model.config.num_decoder_layers

    def forward(self, *inputs: torch.Tensor):
        return self._step(inputs, _pairs)

    def _step(self, inputs: tuple[torch.Tensor, ...], cache: Callable) -> tuple[torch.Tensor, ...]:
        """Unpack the step's inputs, decode; `cache` turns the flat past tensors into the
        per-layer cache the decoder takes."""
        if self.model.config.architecture == "decoder-only":
            input_ids, mask, *past = inputs
            states, presents = self.model.decode_states(input_ids, past=cache(past),
                                                        attention_mask=mask)  # (B, T, D)
            return (self.model.logits(states[:, -1:]), *_flat(presents))  # (B, 1, V)
        masked = len(inputs) == 3 + 2 * self.num_kv
        input_ids, *inputs = inputs
        mask = inputs.pop(0) if masked else None
        encoder_attention_mask, *kv = inputs
        cross, past = kv[: self.num_kv], kv[self.num_kv :]
        logits, presents = self.model.decode(
            input_ids, past=cache(past), cross_key_values=_pairs(cross),
            encoder_attention_mask=encoder_attention_mask, attention_mask=mask,
        )
        return (logits, *_flat(presents))


class StaticCacheStepGraph(DecoderStepGraph):
    """`DecoderStepGraph` over a static cache (`ferry.graph_spec.static_cache_step_spec`): the
    past inputs are (B, nh, capacity, hs) buffers that the step writes in place at `position` (a
    (1,) int64 tensor, the last input), so every step has the same shapes; returns the logits
    and the buffers as present_*. Run by the torch backend, and exported for the fused variant.

    The attention mask spans the capacity, the new tokens' slots included.
    """

    def forward(self, *inputs: torch.Tensor):
        *inputs, position = inputs

        def static(buffers: list[torch.Tensor]) -> list[StaticKeyValue]:
            return [StaticKeyValue(k, v, position) for k, v in _pairs(tuple(buffers))]

        return self._step(tuple(inputs), static)


class SinglePassGraph(nn.Module):
    """input_ids, attention_mask[, token_type_ids][, memory, memory_mask] → what `outputs` makes
    of the (B, S, D) final states [, next_memory, next_memory_mask]: one segment of a
    segment-recurrent (XLNet) model when the memory is given."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def outputs(self, states: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, *inputs: torch.Tensor):
        if not self.model.config.memory_length:
            states = self.model.hidden_states(*inputs)  # (B, S, D)
            return self.outputs(states, inputs[1])
        input_ids, attention_mask, token_type_ids, memory, memory_mask = inputs
        encoded = self.model.encode_segment(input_ids, attention_mask, token_type_ids,
                                            memory=Memory(memory, memory_mask))
        return (*self.outputs(encoded.states, attention_mask), encoded.memory.states,
                encoded.memory.mask)


class LanguageModelGraph(SinglePassGraph):
    """… → logits (B, S, V) of an encoder-only (masked LM) or decoder-only (next token) model
    (inputs as `SinglePassGraph`)."""

    def outputs(self, states: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        return (self.model.logits(states),)


class HeadGraph(SinglePassGraph):
    """… → the task head's outputs (question answering: start_logits and end_logits, (B, S)
    each; inputs as `SinglePassGraph`)."""

    def outputs(self, states: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        logits = self.model.head(states, attention_mask)
        if self.model.config.task_head == "question_answering":
            return logits[..., 0], logits[..., 1]  # (B, S) each
        return (logits,)


GRAPH_MODULES: dict[str, type[nn.Module]] = {
    "encoder": EncoderGraph,
    "decoder_init": DecoderInitGraph,
    "decoder_step": DecoderStepGraph,
    "lm": LanguageModelGraph,
    "head": HeadGraph,
}
