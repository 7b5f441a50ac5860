"""Encoder stack, decoder stack and the Transformer that joins them (Vaswani et al. §3).

One class builds all three architectures from `TransformerConfig.architecture`:
encoder-decoder (translation, text-to-text), encoder-only (BERT-style) and decoder-only (GPT-style).
"""

from __future__ import annotations

import torch
from torch import nn

from ferry.graph_spec import ATTENTION_PREFIX, is_attention_map
from ferry.model.attention import KeyValue
from ferry.model.config import TransformerConfig
from ferry.model.embedding import StackEmbedding, TokenEmbedding
from ferry.model.heads import make_head
from ferry.model.kv_cache import StaticKeyValue
from ferry.model.layers import DecoderLayer, EncoderLayer, applied_layers
from ferry.model.lm_head import LanguageModelHead
from ferry.model.masks import causal_allowed, padding_allowed, to_bias
from ferry.model.norms import make_norm
from ferry.model.probes import recording
from ferry.model.recurrent_encoder import EncoderPass, Memory, RecurrentEncoder
from ferry.model.relative_position import RelativePositionBias
from ferry.model.rotary import RotaryEmbedding, Rotation


class StackPositions(nn.Module):
    """What a stack's attention layers take from positions, by `config.positional`: rotary
    angles (`rotation`), or a relative position bias added to the mask bias (`biased`); the
    absolute encodings are added to the embeddings instead (`StackEmbedding`)."""

    def __init__(self, config: TransformerConfig, *, bidirectional: bool) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(config) if config.positional == "rotary" else None
        self.relative = (RelativePositionBias(config, bidirectional=bidirectional)
                         if config.positional == "relative_bias" else None)

    def rotation(self, positions: torch.Tensor) -> Rotation | None:
        """(T,) or (B, T) positions → rotary (cos, sin), or None without rotary positions."""
        return self.rotary(positions) if self.rotary is not None else None

    def biased(self, bias: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
        """(B|1, 1, T, S) mask bias + the (1, nh, T, S) relative bias of queries at (T,)
        positions over keys 0 … S-1; the mask bias alone without relative positions."""
        if self.relative is None:
            return bias
        return bias + self.relative(query_positions, bias.shape[-1])


class Encoder(nn.Module):
    """Position encoding, N encoder layers; pre-norm stacks end with a final LayerNorm."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.embed = StackEmbedding(config)
        self.positions = StackPositions(config, bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(
            config.layer_groups or config.num_encoder_layers))
        self.depth = config.num_encoder_layers
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(B, S, E) token embeddings → (B, S, D) encoder states."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (S,)
        x = self.embed(tokens, positions)  # (B, S, D)
        bias, rotation = self.positions.biased(bias, positions), self.positions.rotation(positions)
        for layer in applied_layers(self.layers, self.depth):
            x = layer(x, bias, rotation)
        return self.final_norm(x)


class Decoder(nn.Module):
    """Position encoding, N decoder layers with an explicit per-layer self-attention cache."""

    def __init__(self, config: TransformerConfig, *, cross_attention: bool) -> None:
        super().__init__()
        self.embed = StackEmbedding(config)
        self.positions = StackPositions(config, bidirectional=False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, cross_attention=cross_attention)
            for _ in range(config.layer_groups or config.num_decoder_layers)
        )
        self.depth = config.num_decoder_layers
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor,
        self_bias: torch.Tensor | None,
        past: list[KeyValue] | None,
        cross_key_values: list[KeyValue] | None,
        cross_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """(B, T, D) token embeddings at (T,) or (B, T) positions → (B, T, D) and the updated
        cache, one (B, nkv, P+T, hs) pair per layer."""
        x = self.embed(tokens, positions)  # (B, T, D)
        self_bias = self.positions.biased(self_bias, positions)
        rotation = self.positions.rotation(positions)
        presents = []
        for i, layer in enumerate(applied_layers(self.layers, self.depth)):
            x, present = layer(
                x,
                self_bias=self_bias,
                past=past[i] if past is not None else None,
                cross_key_value=cross_key_values[i] if cross_key_values is not None else None,
                cross_bias=cross_bias,
                rotation=rotation,
            )
            presents.append(present)
        return self.final_norm(x), presents


class Transformer(nn.Module):
    """The Transformer: shared token embedding, encoder and/or decoder, output projection, and
    optionally a task head (`config.task_head`) on an encoder-only / decoder-only model."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = TokenEmbedding(config)
        # XLNet's relative positions and segment recurrence have an encoder of their own
        encoder = RecurrentEncoder if config.positional == "relative_xl" else Encoder
        self.encoder = encoder(config) if config.has_encoder else None
        self.decoder = (
            Decoder(config, cross_attention=config.architecture == "encoder-decoder")
            if config.has_decoder else None
        )
        self.lm_head = LanguageModelHead(config)
        self.head = make_head(config)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) final states → (B, T, V) vocabulary logits."""
        return self.lm_head(h, self.embedding.tokens.weight)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids, 1/0 mask (and segment ids) → (B, S, D) encoder states."""
        if isinstance(self.encoder, RecurrentEncoder):
            return self.encode_segment(input_ids, attention_mask, token_type_ids).states
        tokens = self.embedding(input_ids, token_type_ids)  # (B, S, D)
        bias = to_bias(padding_allowed(attention_mask), tokens.dtype)  # (B, 1, 1, S)
        return self.encoder(tokens, bias)

    def encode_segment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       token_type_ids: torch.Tensor | None = None, *,
                       memory: Memory | None = None, order: torch.Tensor | None = None
                       ) -> EncoderPass:
        """A relative_xl (XLNet) encoder over one segment after the `memory` of earlier ones:
        (B, T) ids, mask, segment ids → (B, T, D) states, the query stream's states when
        `order` (B, T, T) gives a factorisation order (permutation LM, see
        `ferry.model.recurrent_encoder`), and the next memory."""
        if not isinstance(self.encoder, RecurrentEncoder):
            raise ValueError("encode_segment needs relative_xl positions (an XLNet encoder)")
        tokens = self.embedding(input_ids)  # (B, T, D)
        return self.encoder(tokens, attention_mask, token_type_ids, memory=memory, order=order)

    def permutation_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           order: torch.Tensor, token_type_ids: torch.Tensor | None = None, *,
                           memory: Memory | None = None) -> torch.Tensor:
        """Permutation LM (XLNet): (B, T, V) logits of every position's query stream, which
        sees only the tokens before it in `order` ((B, T, T) bool, [b, i, j]: j precedes i)."""
        queries = self.encode_segment(input_ids, attention_mask, token_type_ids,
                                      memory=memory, order=order).queries  # (B, T, D)
        return self.logits(queries)

    def cross_key_values(self, memory: torch.Tensor) -> list[KeyValue]:
        """(B, S, D) encoder states → each decoder layer's cross-attention K/V, (B, nh, S, hs)."""
        return [layer.cross_attn.key_value(memory)
                for layer in applied_layers(self.decoder.layers, self.decoder.depth)]

    def decode(
        self,
        input_ids: torch.Tensor,
        *,
        past: list[KeyValue] | None = None,
        cross_key_values: list[KeyValue] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """Run the decoder on `input_ids` (B, T) that follow `past` (P cached positions).

        Args:
            cross_key_values: from `cross_key_values(memory)`; None for decoder-only models.
            encoder_attention_mask: (B, S) source mask applied in cross-attention.
            attention_mask: optional (B, P+T) mask over the decoder's own keys (left padding).

        Returns:
            (B, T, V) logits and the updated cache, one (B, nkv, P+T, hs) pair per layer.
        """
        h, presents = self.decode_states(
            input_ids, past=past, cross_key_values=cross_key_values,
            encoder_attention_mask=encoder_attention_mask, attention_mask=attention_mask)
        return self.logits(h), presents

    def decode_states(
        self,
        input_ids: torch.Tensor,
        *,
        past: list[KeyValue] | list[StaticKeyValue] | None = None,
        cross_key_values: list[KeyValue] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KeyValue]]:
        """`decode` before the output projection: (B, T, D) final states and the cache.

        With `attention_mask` each row's positions are numbered by its real tokens (cumsum of
        the mask), so left-padded rows — a decoder-only model's prompts, an encoder-decoder's
        rows that joined a running batch later — decode as if unpadded; relative position bias
        (T5) needs no numbering: the distances between a row's own columns are its own. With a
        static cache (`past` of `StaticKeyValue`, see `ferry.model.kv_cache`) `attention_mask`
        spans the buffers' capacity.
        """
        T = input_ids.shape[1]
        static = past is not None and isinstance(past[0], StaticKeyValue)
        if static:  # keys are the whole buffers; the new tokens go at a position tensor
            start, key_len = past[0].position, past[0].capacity
        else:
            start = past[0][0].shape[2] if past is not None else 0
            key_len = start + T
        positions = torch.arange(T, device=input_ids.device) + start  # (T,)
        if attention_mask is not None and self.config.positional != "relative_bias":
            numbered = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, key_len)
            positions = numbered[:, positions] if static else numbered[:, -T:]  # (B, T)
        tokens = self.embedding(input_ids)  # (B, T, D)
        # No branch on T == 1: T is symbolic in the exported graphs.
        allowed = causal_allowed(T, key_len, tokens.device, start=start if static else None)
        if attention_mask is not None:  # (B, key_len): a static cache's mask spans the buffer
            allowed = allowed & padding_allowed(attention_mask)  # (B, 1, T, key_len)
        self_bias = to_bias(allowed, tokens.dtype)
        cross_bias = (
            to_bias(padding_allowed(encoder_attention_mask), tokens.dtype)
            if encoder_attention_mask is not None else None
        )  # (B, 1, 1, S)
        return self.decoder(
            tokens, positions=positions, self_bias=self_bias, past=past,
            cross_key_values=cross_key_values, cross_bias=cross_bias,
        )

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) ids + mask → (B, S, D) final states of an encoder-only or decoder-only model
        (causal for decoder-only)."""
        if self.config.architecture == "decoder-only":
            return self.decode_states(input_ids, attention_mask=attention_mask)[0]
        return self.encode(input_ids, attention_mask, token_type_ids)

    def head_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The task head's logits: (B, L) sequence classes, (B, S, L) token classes or
        (B, S, 2) answer start/end."""
        return self(input_ids, attention_mask, token_type_ids=token_type_ids, outputs="head")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
        outputs: str = "lm",
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training forward pass (teacher forcing), by architecture:

        - encoder-decoder: source (B, S) + mask, `decoder_input_ids` (B, T) → (B, T, V) logits;
        - encoder-only: (B, S) → (B, S, V) token logits (masked-LM head);
        - decoder-only: (B, T) → (B, T, V) next-token logits.

        `outputs` picks what encoder-only / decoder-only models return from one pass: "lm" (the
        vocabulary logits), "head" (the task head's logits, see `head_logits`) or "both" (a
        tuple, e.g. masked LM + next-sentence prediction).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        arch = self.config.architecture
        if arch == "encoder-decoder":
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder forward pass needs decoder_input_ids")
            memory = self.encode(input_ids, attention_mask)  # (B, S, D)
            return self.decode(
                decoder_input_ids,
                cross_key_values=self.cross_key_values(memory),
                encoder_attention_mask=attention_mask,
            )[0]
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)  # (B, S, D)
        if outputs == "lm":
            return self.logits(states)
        if self.head is None:
            raise ValueError("this model has no task head (config.task_head is 'none')")
        head = self.head(states, attention_mask)
        return head if outputs == "head" else (self.logits(states), head)

    def attention_probabilities(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        *,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every layer's attention probabilities in one forward pass (arguments as `forward`),
        what Hugging Face's `output_attentions=True` returns, keyed by layer:
        `encoder.layer_{i}.attention` (B, nh, S, S), `decoder.layer_{i}.self_attention`
        (B, nh, T, T), `decoder.layer_{i}.cross_attention` (B, nh, T, S)."""
        with recording(self, attention=True) as states:
            self(input_ids, attention_mask, decoder_input_ids, token_type_ids=token_type_ids)
        return {name.removeprefix(ATTENTION_PREFIX): probabilities
                for name, probabilities in states.items() if is_attention_map(name)}
