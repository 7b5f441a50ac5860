"""The options of T5 and the Llama family as ferry's model builds them: rotary positions (and
Llama 3's frequency scaling), T5's bucketed relative position bias, grouped-query attention with
the cache kept at the key/value heads, RMSNorm, gated FFNs, Qwen3's q/k norms; each checked
against its definition (transformers' own functions as the oracle where it has one), the KV
cache against teacher forcing, the exported graphs against torch, and both presets training.
(Whole imported checkpoints are checked in test_hf_import.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest
import torch
import transformers
from conftest import MODERN_FAMILIES, assert_decodes_like_onnxruntime, pretraining_config

from ferry.model import Transformer, preset
from ferry.model.attention import exported_attention
from ferry.model.graphs import graph_specs
from ferry.model.kv_cache import StaticKeyValue
from ferry.model.norms import RMSNorm
from ferry.model.relative_position import relative_buckets
from ferry.model.rotary import RotaryEmbedding, inverse_frequencies, rotate

TOLERANCE = 2e-5

LLAMA_OPTIONS = dict(
    architecture="decoder-only", num_encoder_layers=0, positional="rotary", norm="rmsnorm",
    norm_placement="pre", feed_forward="gated", activation="silu", ffn_bias=False,
    attention_bias="none", num_kv_heads=2, embedding_scale="none", tie_embeddings=False)
QWEN3_OPTIONS = {**LLAMA_OPTIONS, "qk_norm": True, "head_size": 24, "num_kv_heads": 1}
T5_OPTIONS = dict(
    positional="relative_bias", norm="rmsnorm", norm_placement="pre", feed_forward="gated",
    activation="gelu_tanh", ffn_bias=False, attention_bias="none", attention_scale="none",
    embedding_scale="none", relative_attention_num_buckets=8,
    relative_attention_max_distance=12, head_size=8, lm_head_scale="inverse_sqrt_d_model")


def model_with(seed: int = 0, **options) -> Transformer:
    torch.manual_seed(seed)
    config = preset("tiny", dropout=0.0, **options)
    model = Transformer(config).eval()
    with torch.no_grad():  # norms' gains and the relative tables away from their init values
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight") or "relative" in name:
                tensor.add_(0.3 * torch.randn_like(tensor))
    return model


# --- rotary positions ------------------------------------------------------------------------


def test_rotary_scores_depend_only_on_the_distance():
    config = preset("tiny", **LLAMA_OPTIONS)
    rotary = RotaryEmbedding(config)
    q, k = torch.randn(1, 1, 1, config.head_dim), torch.randn(1, 1, 1, config.head_dim)

    def score(query_position: int, key_position: int) -> float:
        rotated_q = rotate(q, rotary(torch.tensor([query_position])))
        rotated_k = rotate(k, rotary(torch.tensor([key_position])))
        return float((rotated_q * rotated_k).sum())

    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-5)  # position 0: no turn


@pytest.mark.parametrize("scaling", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rotary_frequencies_are_transformers_own(scaling):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ferry.model.families.llama import rope_options

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4,
                                  rope_parameters={"rope_theta": 50000.0, **scaling})
    ours = preset("tiny", **{**LLAMA_OPTIONS, "d_model": 256, "num_heads": 4,
                             **rope_options(hf.to_dict())})
    kind = scaling["rope_type"]
    if kind == "default":
        expected = 1.0 / 50000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    assert torch.allclose(inverse_frequencies(ours), expected, rtol=1e-6)
    if kind != "default":  # the scaling really changed something
        assert not torch.allclose(inverse_frequencies(ours),
                                  inverse_frequencies(preset("tiny", **{
                                      **LLAMA_OPTIONS, "d_model": 256, "num_heads": 4,
                                      "rope_theta": 50000.0})))


# --- T5's relative position bias -------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_are_t5s(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None, :]
    expected = T5Attention._relative_position_bucket(
        distance, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    ours = relative_buckets(distance, bidirectional=bidirectional, num_buckets=32,
                            max_distance=128)
    assert torch.equal(ours, expected)
    # every bucket is used (bidirectional: but "distance +0", which is bucket 0)
    assert len(ours.unique()) == (31 if bidirectional else 32)


def test_relative_bias_is_shared_by_the_layers_and_replaces_absolute_positions():
    model = model_with(**T5_OPTIONS)
    names = [name for name, _ in model.named_parameters()]
    assert [n for n in names if "relative" in n] == [
        "encoder.positions.relative.table.weight", "decoder.positions.relative.table.weight"]
    assert not any("learned_positions" in n for n in names)
    assert model.encoder.embed.sinusoids is None


# --- grouped-query attention, norms, FFN -----------------------------------------------------


@pytest.mark.parametrize("query_len", [1, 5])
def test_grouped_query_attention_written_out_equals_sdpa_over_repeated_heads(query_len):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, query_len, 8, generator=generator)
    k, v = (torch.randn(2, 2, 9, 8, generator=generator) for _ in range(2))
    bias = torch.zeros(2, 6, query_len, 9)
    bias[0, :, :, :3] = torch.finfo(torch.float32).min
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=bias)
    assert torch.allclose(exported_attention(q, k, v, bias), expected, atol=1e-6)
    unscaled = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), scale=1.0)
    assert torch.allclose(exported_attention(q, k, v, None, scale=1.0), unscaled, atol=1e-5)


def test_the_cache_and_the_graph_specs_keep_only_the_key_value_heads():
    model = model_with(**QWEN3_OPTIONS)
    config = model.config
    assert (config.num_heads, config.kv_heads, config.head_dim) == (4, 1, 24)
    ids = torch.randint(5, config.vocab_size, (2, 6))
    with torch.no_grad():
        logits, cache = model.decode(ids)
    assert cache[0][0].shape == (2, 1, 6, 24)
    step = graph_specs(config)["decoder_step"]
    assert step.inputs[2].shape == ("batch", 1, "past_len", 24)
    attention = model.decoder.layers[0].self_attn
    assert attention.q_proj.weight.shape == (4 * 24, config.d_model)
    assert attention.k_proj.weight.shape == (24, config.d_model)
    assert attention.q_proj.bias is None and attention.out_proj.bias is None
    assert isinstance(attention.q_norm, RMSNorm) and isinstance(attention.k_norm, RMSNorm)


def test_rmsnorm_and_the_gated_ffn_follow_their_definitions():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    x = torch.randn(3, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    ffn = model_with(**LLAMA_OPTIONS).decoder.layers[0].ffn
    h = torch.randn(2, 3, 64)
    with torch.no_grad():
        swiglu = ffn.down(torch.nn.functional.silu(ffn.gate(h)) * ffn.up(h))
        assert torch.allclose(ffn(h), swiglu)
    assert ffn.up.bias is None and ffn.gate.bias is None


# --- the cache agrees with teacher forcing ---------------------------------------------------


@pytest.mark.parametrize("options", [LLAMA_OPTIONS, QWEN3_OPTIONS],
                         ids=["llama", "qwen3"])
def test_decoder_only_cache_with_left_padding_matches_the_full_pass(options):
    model = model_with(seed=1, **options)
    ids = torch.randint(5, model.config.vocab_size, (3, 11),
                        generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    with torch.no_grad():
        full = model(ids, mask)
        logits, past = model.decode(ids[:, :6], attention_mask=mask[:, :6])
        pieces = [logits]
        for t in range(6, 11):
            logits, past = model.decode(ids[:, t:t + 1], past=past,
                                        attention_mask=mask[:, :t + 1])
            pieces.append(logits)
    cached = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max() <= TOLERANCE
    # a left-padded row computes what it computes alone
    with torch.no_grad():
        alone = model(ids[2:, 7:])
    assert (full[2, 7:] - alone[0]).abs().max() <= TOLERANCE


def test_t5_style_cache_and_static_cache_match_teacher_forcing():
    model = model_with(seed=2, **T5_OPTIONS)
    vocab = model.config.vocab_size
    source = torch.randint(5, vocab, (2, 14), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(source)
    mask[1, 9:] = 0
    target = torch.randint(5, vocab, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(source, mask, target)
        cross = model.cross_key_values(model.encode(source, mask))
        growing, static = [], []
        past = None
        capacity = 16
        layers = model.config.num_decoder_layers
        shape = (2, model.config.kv_heads, capacity, model.config.head_dim)
        buffers = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(layers)]
        for t in range(16):
            logits, past = model.decode(target[:, t:t + 1], past=past, cross_key_values=cross,
                                        encoder_attention_mask=mask)
            growing.append(logits)
            cache = [StaticKeyValue(k, v, torch.tensor([t])) for k, v in buffers]
            logits, _ = model.decode(target[:, t:t + 1], past=cache, cross_key_values=cross,
                                     encoder_attention_mask=mask)
            static.append(logits)
    assert (torch.cat(growing, 1) - full).abs().max() <= TOLERANCE
    assert (torch.cat(static, 1) - full).abs().max() <= TOLERANCE
    # distances past max_distance share a bucket, so the positions matter only up to it
    assert math.isfinite(float(full.abs().max()))


# --- exported graphs, presets ----------------------------------------------------------------


@pytest.mark.parametrize("name, overrides", [
    ("llama_small", {"num_kv_heads": 2, "rope_scaling": "llama3", "rope_scaling_factor": 8.0,
                     "rope_original_max_positions": 32}),
    ("t5_small", {"head_size": 16}),
])
def test_each_preset_trains_exports_and_its_graphs_agree_with_torch(name, overrides,
                                                                    tmp_path_factory):
    """The llama-style preset with causal LM, the t5-style one with span corruption, shrunk:
    the loss falls; then every fp32 ONNX Runtime variant (portable and fused) of the trained
    model agrees with torch on the golden inputs, as does the llama's int4 within its gate, and
    the portable graphs pass TensorRT's static check."""
    from ferry.export import export_bundle
    from ferry.export.fused_graphs import fused_node_counts
    from ferry.export.tensorrt_check import check_bundle_for_tensorrt
    from ferry.runtime import Bundle, load
    from ferry.runtime.parity import load_golden, verify_against_golden
    from ferry.train import train
    from ferry.train.config import train_config_from_dict
    from ferry.train.datasets.text_corpus import write_text_corpus

    data = tmp_path_factory.mktemp("docs")
    write_text_corpus(data)
    out = tmp_path_factory.mktemp("run")
    decoder_only = name == "llama_small"
    config = pretraining_config(
        data, out, "causal_lm" if decoder_only else "span_corruption", max_steps=40,
        model={"preset": name, "overrides": {
            "d_model": 64, "num_heads": 4, "d_ff": 128, "num_decoder_layers": 2,
            "num_encoder_layers": 0 if decoder_only else 2, "max_positions": 128,
            "dropout": 0.0, **overrides}})
    result = train(train_config_from_dict(config), progress=False, log=lambda message: None)
    losses = [r["train_loss"] for r in result.history if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # nats
    # (int4 is for decoding LLMs on CPUs; on this barely trained T5 it misses its agreement gate)
    precisions = ("fp32", "fused", "int4") if decoder_only else ("fp32", "fused")
    bundle = export_bundle(result.checkpoint, tmp_path_factory.mktemp("bundle") / "b",
                           precisions=precisions, log=lambda message: None)
    golden = load_golden(Bundle.open(bundle).file("golden"))
    for precision in precisions:
        model = load(bundle, f"onnxruntime:{precision}")
        report = verify_against_golden(model.graphs, golden, special=model.special,
                                       backend=precision, precision=precision)
        assert report.passed and report.diffs and report.sequences, report
    variants = Bundle.open(bundle).manifest.variants
    if decoder_only:  # int4: every weight matmul, the output projection too, is MatMulNBits,
        # those reading one input packed: per layer q/k/v (the kernel's packed QKV), the
        # output, gate/up, down
        counts = fused_node_counts(Path(bundle) / variants["int4"].graphs["decoder_step"])
        assert counts.get("MatMulNBits", 0) == 2 * 4 + 1, counts  # 2 layers × 4, the head
        # blocks of 128 where they keep the tokens, else of 32: the manifest says which
        int4_blocks = {int(a.i) for node in onnx.load(str(
            Path(bundle) / variants["int4"].graphs["decoder_step"])).graph.node
            if node.op_type == "MatMulNBits" for a in node.attribute if a.name == "block_size"}
        assert variants["int4"].settings == f"blocks of {int4_blocks.pop()}" and not int4_blocks
    # fused: one kernel per attention and per norm; the step's self-attention writes a static
    # cache in place (GroupQueryAttention), T5's cross-attention is MultiHeadAttention
    step = Path(bundle) / variants["fused"].graphs["decoder_step"]
    counts = fused_node_counts(step)
    assert counts.get("GroupQueryAttention", 0) == 2, counts
    assert counts.get("MultiHeadAttention", 0) == (0 if decoder_only else 2), counts
    graph = onnx.load(str(step)).graph
    assert "cache_position" in [i.name for i in graph.input]
    # the llama's step rotates queries and keys inside the kernel (heads 16 wide)
    rotating = [node for node in graph.node if node.op_type == "GroupQueryAttention"
                and any(a.name == "do_rotary" and a.i == 1 for a in node.attribute)]
    assert len(rotating) == (2 if decoder_only else 0)
    assert counts.get("SkipSimplifiedLayerNormalization", 0) >= 2, counts
    assert all(check.passed for check in check_bundle_for_tensorrt(Bundle.open(bundle), "fp32"))


@pytest.mark.parametrize("family", list(MODERN_FAMILIES))
def test_the_torch_static_cache_decodes_like_the_exported_graphs(modern_bundle, family):
    """The torch backend's static-cache step (CUDA's default path, run here on the CPU): rotary
    positions and grouped-query heads over a fixed buffer, several-token prefill chunks over
    left padding, T5's relative bias cut to the written positions, the buffer doubling."""
    assert_decodes_like_onnxruntime(modern_bundle(family), "torch", static_cache=True)
