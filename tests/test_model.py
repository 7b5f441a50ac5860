"""ferry.model: KV-cache decoding equals the teacher-forced pass, architectures, presets, config
validation and the sinusoidal positional encoding."""

from __future__ import annotations

import math

import pytest
import torch

from ferry.errors import FerryError
from ferry.model import PRESETS, Transformer, TransformerConfig, preset
from ferry.model.embedding import sinusoidal_table

TOLERANCE = 1e-5


def small_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model with a small vocabulary, randomly initialised, in eval mode."""
    torch.manual_seed(seed)
    config = preset("tiny", vocab_size=97, **overrides)
    return Transformer(config).eval()


def padded_source(vocab_size: int, lengths: list[int], seed: int = 1):
    """Right-padded (B, S) source ids (pad 0) and their 1/0 attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab_size, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return ids.masked_fill(mask == 0, 0), mask


def incremental_decode(model: Transformer, ids: torch.Tensor, prefix: int, **kwargs):
    """Logits of `ids` decoded as a `prefix`-token prompt, then one token at a time with the cache.

    `kwargs` go to every `decode` call; an `attention_mask` over all of `ids` is cut to the keys
    seen so far at each call.
    """
    full_mask = kwargs.pop("attention_mask", None)

    def step_kwargs(end: int) -> dict:
        if full_mask is None:
            return kwargs
        return {**kwargs, "attention_mask": full_mask[:, :end]}

    logits, past = model.decode(ids[:, :prefix], **step_kwargs(prefix))
    pieces = [logits]
    for t in range(prefix, ids.shape[1]):
        # The cache grows by one position per step.
        assert past[0][0].shape[2] == t
        logits, past = model.decode(ids[:, t : t + 1], past=past, **step_kwargs(t + 1))
        assert logits.shape[1] == 1
        pieces.append(logits)
    assert len(past) == model.config.num_decoder_layers
    assert past[0][0].shape[2] == ids.shape[1]
    return torch.cat(pieces, dim=1)


# --- (1) KV cache = teacher forcing ----------------------------------------------------------


# The families' options (BART: learned positions from row 2, embedding LayerNorm, unscaled
# embeddings, logits bias; Marian: concatenated sinusoids, SiLU) must keep the cache exact too.
FAMILY_OPTIONS = {
    "plain": {},
    "bart": {"positional": "learned", "position_offset": 2, "embedding_norm": "layernorm",
             "embedding_scale": "none", "lm_head_bias": True, "activation": "gelu"},
    "marian": {"positional": "sinusoidal_concat", "activation": "silu", "lm_head_bias": True},
}


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
@pytest.mark.parametrize("family", list(FAMILY_OPTIONS))
def test_encoder_decoder_cached_decoding_matches_teacher_forcing(norm_placement, positional,
                                                                   family):
    options = {"positional": positional, **FAMILY_OPTIONS[family]}
    model = small_model(norm_placement=norm_placement, **options)
    vocab = model.config.vocab_size
    source, mask = padded_source(vocab, [9, 5, 2, 7])
    target = torch.randint(5, vocab, (4, 7), generator=torch.Generator().manual_seed(2))

    with torch.no_grad():
        full = model(source, mask, target)  # (B, T, V)
        cross = model.cross_key_values(model.encode(source, mask))
        cached = incremental_decode(
            model, target, prefix=2, cross_key_values=cross, encoder_attention_mask=mask
        )

    assert full.shape == (4, 7, vocab)
    assert cached.shape == full.shape
    assert torch.isfinite(full).all()
    assert (cached - full).abs().max().item() <= TOLERANCE


def test_encoder_decoder_padding_really_masks_the_source():
    """Changing the ids under padding must not change any logits (the mask is honoured)."""
    model = small_model()
    source, mask = padded_source(model.config.vocab_size, [8, 3, 5])
    target = torch.randint(5, model.config.vocab_size, (3, 4))
    other = source.masked_fill(mask == 0, 42)
    with torch.no_grad():
        a = model(source, mask, target)
        b = model(other, mask, target)
        unmasked = model(other, torch.ones_like(mask), target)
    assert (a - b).abs().max().item() <= TOLERANCE
    # Sanity: without the mask the padded ids do matter, so the check above is meaningful.
    assert (a[1] - unmasked[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_decoder_only_cached_decoding_matches_forward(norm_placement):
    model = small_model(architecture="decoder-only", norm_placement=norm_placement)
    ids = torch.randint(5, model.config.vocab_size, (3, 10),
                        generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cached = incremental_decode(model, ids, prefix=3)
    assert full.shape == (3, 10, model.config.vocab_size)
    assert (cached - full).abs().max().item() <= TOLERANCE


def test_decoder_only_cached_decoding_with_left_padding():
    """With a left-padding attention mask, every real position's logits agree."""
    model = small_model(architecture="decoder-only", seed=4)
    ids = torch.randint(5, model.config.vocab_size, (3, 9),
                        generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        full = model(ids, mask)
        cached = incremental_decode(model, ids, prefix=7, attention_mask=mask)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= TOLERANCE
    assert torch.isfinite(full).all() and torch.isfinite(cached).all()


# --- (2) architectures, positions, tied embeddings ------------------------------------------


@pytest.mark.parametrize("architecture", ["encoder-decoder", "encoder-only", "decoder-only"])
def test_every_architecture_builds_and_gives_logits_of_the_right_shape(architecture):
    config = TransformerConfig(
        architecture=architecture, vocab_size=53, d_model=32, num_heads=4,
        num_encoder_layers=2, num_decoder_layers=3, d_ff=64, dropout=0.0, max_positions=64,
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    source = torch.randint(0, 53, (2, 11))
    target = torch.randint(0, 53, (2, 6))
    with torch.no_grad():
        if architecture == "encoder-decoder":
            logits = model(source, torch.ones_like(source), target)
            expected = (2, 6, 53)
        else:
            logits = model(source)
            expected = (2, 11, 53)
    assert logits.shape == expected
    assert torch.isfinite(logits).all()
    assert (model.encoder is not None) == (architecture != "decoder-only")
    assert (model.decoder is not None) == (architecture != "encoder-only")
    if model.encoder is not None:
        assert len(model.encoder.layers) == 2
    if model.decoder is not None:
        assert len(model.decoder.layers) == 3
        has_cross = [layer.cross_attn is not None for layer in model.decoder.layers]
        assert has_cross == [architecture == "encoder-decoder"] * 3


def test_encoder_decoder_forward_needs_decoder_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(torch.ones(1, 3, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_a_valid_config(name):
    config = preset(name)
    with torch.device("meta"):  # shapes only: the big presets allocate nothing
        model = Transformer(config)
    stack = model.decoder if model.decoder is not None else model.encoder
    attention = stack.layers[0].self_attn
    assert attention.q_proj.out_features == config.num_heads * config.head_dim
    assert attention.k_proj.out_features == config.kv_heads * config.head_dim
    assert preset(name, vocab_size=123).vocab_size == 123


def test_learned_positions_are_parameters_of_each_stack_and_sinusoids_are_not():
    learned = small_model(positional="learned", position_offset=2)
    sinusoidal = small_model(positional="sinusoidal")
    learned_names = dict(learned.named_parameters())
    # BART and mBART train one table per stack; the offset adds rows (fairseq's padding_idx + 1)
    for stack in ("encoder", "decoder"):
        assert learned_names[f"{stack}.embed.learned_positions.weight"].shape == (130, 64)
    assert not any("position" in name or "sinusoid" in name
                   for name, _ in sinusoidal.named_parameters())
    # The table is recomputed from the config, never stored in checkpoints.
    assert not any("sinusoid" in key for key in sinusoidal.state_dict())
    assert sinusoidal.encoder.embed.sinusoids.shape == (128, 64)
    assert (len(learned_names) - len(dict(sinusoidal.named_parameters()))) == 2


@pytest.mark.parametrize("positional", ["sinusoidal", "sinusoidal_concat", "learned"])
def test_positions_change_the_output(positional):
    """Every encoding makes the model order-aware: a shifted start gives other embeddings."""
    model = small_model(positional=positional, position_offset=2)
    tokens = model.embedding(torch.tensor([[7] * 6]))  # (1, 6, D)
    x = model.encoder.embed(tokens, torch.arange(6))
    assert not torch.allclose(x[0, 0], x[0, 1])
    shifted = model.encoder.embed(tokens[:, :1], torch.tensor([5]))
    assert torch.allclose(shifted[0, 0], x[0, 5])
    rows = model.encoder.embed.position_encoding(torch.arange(3))
    table = (model.encoder.embed.learned_positions.weight if positional == "learned"
             else model.encoder.embed.sinusoids)
    assert torch.equal(rows, table[2:5])  # the offset skips the first rows


def test_embedding_scale_and_norm_are_named_choices():
    """BERT / BART: unscaled tokens and a LayerNorm over the summed embeddings, per stack."""
    plain = small_model(embedding_scale="none", embedding_norm="layernorm")
    ids = torch.tensor([[3, 9, 4]])
    assert torch.equal(plain.embedding(ids)[0], plain.embedding.tokens.weight[ids[0]])
    for stack in (plain.encoder, plain.decoder):
        assert isinstance(stack.embed.norm, torch.nn.LayerNorm)
        x = stack.embed(plain.embedding(ids), torch.arange(3))
        assert torch.allclose(x.mean(-1), torch.zeros(1, 3), atol=1e-5)  # normalised
    scaled = small_model()
    assert torch.allclose(scaled.embedding(ids)[0],
                          scaled.embedding.tokens.weight[ids[0]] * 8.0)  # √64
    assert isinstance(scaled.encoder.embed.norm, torch.nn.Identity)


@pytest.mark.parametrize("activation, reference", [
    ("relu", lambda x: x.clamp(min=0)),
    ("gelu", lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    ("gelu_tanh", lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi)
                                                      * (x + 0.044715 * x**3)))),
    ("silu", lambda x: x * torch.sigmoid(x)),
])
def test_ffn_activations_are_the_published_formulas(activation, reference):
    model = small_model(activation=activation)
    ffn = model.encoder.layers[0].ffn
    x = torch.randn(2, 3, 64)
    expected = ffn.down(reference(ffn.up(x)))
    assert torch.allclose(ffn(x), expected, atol=1e-5)


def test_lm_head_transform_and_bias():
    """BERT's MLM head: dense → activation → LayerNorm → tied projection + bias."""
    model = small_model(architecture="encoder-only", lm_head_transform="dense_norm",
                        lm_head_bias=True, activation="gelu")
    head = model.lm_head
    torch.nn.init.normal_(head.bias)
    h = torch.randn(2, 3, 64)
    transformed = head.norm(torch.nn.functional.gelu(head.dense(h)))
    expected = transformed @ model.embedding.tokens.weight.T + head.bias
    assert torch.allclose(model.logits(h), expected, atol=1e-5)


def test_tied_embeddings_share_the_token_matrix():
    model = small_model(tie_embeddings=True)
    names = {name for name, _ in model.named_parameters()}
    assert model.lm_head.projection is None
    assert not any(name.startswith("lm_head") for name in names)
    h = torch.randn(2, 3, 64)
    expected = h @ model.embedding.tokens.weight.T
    assert torch.allclose(model.logits(h), expected, atol=1e-5)


def test_untied_embeddings_have_an_lm_head():
    tied = small_model(tie_embeddings=True)
    untied = small_model(tie_embeddings=False)
    params = dict(untied.named_parameters())
    assert params["lm_head.projection.weight"].shape == (97, 64)
    assert (params["lm_head.projection.weight"].data_ptr()
            != params["embedding.tokens.weight"].data_ptr())
    tied_count = sum(p.numel() for p in tied.parameters())
    untied_count = sum(p.numel() for p in untied.parameters())
    assert untied_count - tied_count == 97 * 64
    h = torch.randn(1, 2, 64)
    assert torch.allclose(untied.logits(h), h @ params["lm_head.projection.weight"].T,
                          atol=1e-5)


# --- (3) presets -------------------------------------------------------------------------------


def test_base_preset_is_the_paper_base_model():
    config = preset("base")
    assert config.architecture == "encoder-decoder"
    assert config.d_model == 512
    assert config.num_heads == 8
    assert config.head_dim == 64
    assert config.num_encoder_layers == 6
    assert config.num_decoder_layers == 6
    assert config.d_ff == 2048
    assert config.positional == "sinusoidal"
    assert config.norm_placement == "post"
    assert config.activation == "relu"
    assert config.tie_embeddings is True


def test_preset_overrides_apply():
    config = preset("tiny", d_model=32, num_heads=2, architecture="decoder-only")
    assert (config.d_model, config.num_heads, config.architecture) == (32, 2, "decoder-only")
    assert config.d_ff == preset("tiny").d_ff


# --- (4) fully padded rows ------------------------------------------------------------------


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
def test_fully_padded_source_row_gives_finite_outputs(norm_placement):
    model = small_model(norm_placement=norm_placement)
    source, mask = padded_source(model.config.vocab_size, [6, 0, 3])
    assert mask[1].sum() == 0
    target = torch.randint(5, model.config.vocab_size, (3, 5))
    with torch.no_grad():
        memory = model.encode(source, mask)
        logits = model(source, mask, target)
        cross = model.cross_key_values(memory)
        step, _ = model.decode(target[:, :1], cross_key_values=cross, encoder_attention_mask=mask)
    assert torch.isfinite(memory).all()
    assert torch.isfinite(logits).all()
    assert torch.isfinite(step).all()


# --- (5) config validation --------------------------------------------------------------------


def test_from_dict_round_trips():
    config = preset("small", architecture="decoder-only", positional="learned")
    assert TransformerConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_keys():
    data = {**preset("tiny").to_dict(), "d_modle": 64}
    with pytest.raises(FerryError, match="d_modle"):
        TransformerConfig.from_dict(data)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"d_model": 30, "num_heads": 4}, "divisible"),
        ({"architecture": "rnn"}, "architecture"),
        ({"positional": "alibi"}, "positional"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"norm": "batchnorm"}, "norm"),
        ({"feed_forward": "moe"}, "feed_forward"),
        ({"architecture": "decoder-only", "positional": "relative_bias"}, "relative_bias"),
        ({"positional": "relative_xl"}, "relative_xl positions are XLNet's"),  # encoder-decoder
        ({"memory_length": 16}, "memory_length .* needs relative_xl"),
        ({"architecture": "encoder-only", "positional": "relative_xl", "type_vocab_size": 2},
         "set type_vocab_size to 0"),
        ({"pooled_position": "middle"}, "pooled_position"),
        ({"positional": "rotary", "d_model": 60, "num_heads": 4}, "even head size"),
        ({"norm_placement": "middle"}, "norm_placement"),
        ({"activation": "tanh"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
        # Values a YAML override can easily produce: each must be a FerryError, not a crash.
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": -4}, "num_heads"),
        ({"d_model": "64"}, "d_model"),
    ],
)
def test_from_dict_rejects_invalid_values(change, words):
    data = {**preset("tiny").to_dict(), **change}
    with pytest.raises(FerryError, match=words):
        TransformerConfig.from_dict(data)


def test_unknown_preset_raises_ferry_error():
    with pytest.raises(FerryError, match="nope"):
        preset("nope")
    with pytest.raises(FerryError, match="colour"):
        preset("tiny", colour="red")


# --- (6) sinusoidal table ---------------------------------------------------------------------


def test_sinusoidal_table_matches_the_paper_formula():
    d_model = 16
    table = sinusoidal_table(64, d_model)
    assert table.shape == (64, d_model)
    for pos in (0, 1, 5, 37, 63):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # Position 0 is (0, 1, 0, 1, …).
    assert torch.equal(table[0, 0::2], torch.zeros(d_model // 2))
    assert torch.equal(table[0, 1::2], torch.ones(d_model // 2))


def test_concatenated_sinusoids_are_the_same_waves_sines_first():
    """fairseq / Marian: all sines, then all cosines, at the paper's frequencies."""
    interleaved = sinusoidal_table(64, 16)
    concat = sinusoidal_table(64, 16, layout="concat")
    assert torch.equal(concat[:, :8], interleaved[:, 0::2])
    assert torch.equal(concat[:, 8:], interleaved[:, 1::2])


def test_sinusoidal_embedding_adds_the_table_to_scaled_tokens():
    model = small_model()
    ids = torch.tensor([[3, 9, 4]])
    d = model.config.d_model
    table = sinusoidal_table(model.config.max_positions, d)
    tokens = model.embedding.tokens.weight[ids[0]] * math.sqrt(d)
    assert torch.allclose(model.embedding(ids)[0], tokens, atol=1e-5)
    embed = model.encoder.embed
    assert torch.allclose(embed(model.embedding(ids), torch.arange(3))[0], tokens + table[:3],
                          atol=1e-5)
    assert torch.allclose(embed(model.embedding(ids), torch.arange(3) + 10)[0],
                          tokens + table[10:13], atol=1e-5)
