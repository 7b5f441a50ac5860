"""The generation loop: exact behaviour on a fake Markov model whose answers can be worked out by
hand, then parity of every mode between the torch and ONNX Runtime backends on a real bundle."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import ferry.runtime
from ferry.errors import FerryError
from ferry.graph_spec import encoder_decoder_specs
from ferry.runtime.backends.base import GraphBackend
from ferry.runtime.generation import generate
from ferry.runtime.generation_config import GenerationConfig
from ferry.runtime.logits_processing import log_softmax
from ferry.runtime.special_ids import SpecialIds

PAD, BOS, EOS = 0, 1, 2
SPECIAL = SpecialIds(pad=PAD, eos=EOS, decoder_start=BOS)
VOCAB = 6


class MarkovGraph(GraphBackend):
    """A graph whose next-token logits depend only on the last input token: `table[last]`."""

    def __init__(self, spec, table: np.ndarray) -> None:
        super().__init__(spec)
        self.table = table

    def _infer(self, feed):
        if self.spec.name == "encoder":
            batch, length = feed["input_ids"].shape
            return {"encoder_hidden_states": np.zeros((batch, length, 2), np.float32),
                    "cross_key_0": np.zeros((batch, 1, length, 2), np.float32),
                    "cross_value_0": np.zeros((batch, 1, length, 2), np.float32)}
        ids = feed["input_ids"]
        new = np.zeros((ids.shape[0], 1, ids.shape[1], 2), np.float32)
        past = [feed.get("past_key_0"), feed.get("past_value_0")]
        present = [new if p is None else np.concatenate([p, new], axis=2) for p in past]
        return {"logits": self.table[ids], "present_key_0": present[0],
                "present_value_0": present[1]}


def markov(table: np.ndarray) -> dict[str, GraphBackend]:
    specs = encoder_decoder_specs(num_decoder_layers=1, num_heads=1, head_dim=2, d_model=2,
                                  vocab_size=table.shape[1], max_positions=32)
    return {name: MarkovGraph(spec, table.astype(np.float32)) for name, spec in specs.items()}


def run(table: np.ndarray, batch: int = 1, **kwargs):
    config = GenerationConfig.from_kwargs(output_scores=True, **kwargs).validate(
        vocab_size=table.shape[1], max_positions=32)
    ids = np.full((batch, 3), 7 % table.shape[1], dtype=np.int64)
    return generate(markov(table), ids, np.ones_like(ids), special=SPECIAL, config=config)


def random_table(seed: int) -> np.ndarray:
    table = np.random.default_rng(seed).normal(0, 2, size=(VOCAB, VOCAB))
    table[:, [PAD, BOS]] = -30.0  # never generate pad / bos
    return table


def brute_force(table: np.ndarray, max_len: int, length_penalty: float) -> list[tuple]:
    """Every sequence (ending at its first EOS or at max_len) with its score, best first."""
    logp = log_softmax(table.astype(np.float32))
    results = []
    for length in range(1, max_len + 1):
        for seq in itertools.product(range(VOCAB), repeat=length):
            if EOS in seq[:-1] or (length < max_len and seq[-1] != EOS):
                continue
            prev, total = BOS, 0.0
            for token in seq:
                total += float(logp[prev, token])
                prev = token
            results.append((total / length**length_penalty, seq))
    return sorted(results, key=lambda r: -r[0])


def rows(output) -> list[tuple]:
    """Generated rows up to and including their EOS (trailing padding dropped)."""
    result = []
    for row in output.sequences.tolist():
        result.append(tuple(row[: row.index(EOS) + 1] if EOS in row else row))
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_search_finds_the_exact_best_sequences(seed, length_penalty):
    table = random_table(seed)
    best = brute_force(table, max_len=4, length_penalty=length_penalty)
    out = run(table, num_beams=VOCAB**3, num_return_sequences=3, max_new_tokens=4,
              length_penalty=length_penalty)
    got = rows(out)
    assert got == [seq for _, seq in best[:3]]
    assert np.allclose(out.sequence_scores, [score for score, _ in best[:3]], atol=1e-4)


def test_greedy_follows_the_argmax_chain_and_scores_add_up():
    table = random_table(3)
    out = run(table, max_new_tokens=6)
    prev, expected = BOS, []
    for _ in range(6):
        prev = int(np.argmax(table[prev]))
        expected.append(prev)
        if prev == EOS:
            break
    assert rows(out)[0] == tuple(expected)
    assert np.isclose(out.sequence_scores[0], out.token_scores[0].sum())
    assert rows(run(table, max_new_tokens=6, num_beams=1)) == rows(out)


def test_sampling_matches_the_softmax_distribution_and_is_seeded():
    table = random_table(4)
    draws = np.concatenate([
        run(table, batch=250, do_sample=True, seed=seed, temperature=1.3,
            max_new_tokens=1).sequences[:, 0] for seed in range(16)])
    counts = np.bincount(draws, minlength=VOCAB) / len(draws)
    expected = np.exp(log_softmax((table[BOS] / 1.3).astype(np.float32)))
    assert np.abs(counts - expected).max() < 0.03, (counts, expected)
    first = run(table, batch=50, do_sample=True, seed=5, max_new_tokens=6)
    again = run(table, batch=50, do_sample=True, seed=5, max_new_tokens=6)
    other = run(table, batch=50, do_sample=True, seed=6, max_new_tokens=6)
    assert np.array_equal(first.sequences, again.sequences)
    assert not np.array_equal(first.sequences, other.sequences)


def test_top_k_and_top_p_restrict_the_candidates():
    table = random_table(6)
    order = np.argsort(-table[BOS])
    top2 = run(table, batch=250, do_sample=True, seed=1, top_k=2, max_new_tokens=1)
    assert set(top2.sequences[:, 0].tolist()) == set(order[:2].tolist())
    probs = np.exp(log_softmax(table[BOS].astype(np.float32)))[order]
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.8) + 1)
    top_p = run(table, batch=250, do_sample=True, seed=1, top_p=0.8, max_new_tokens=1)
    assert set(top_p.sequences[:, 0].tolist()) <= set(order[:nucleus].tolist())


def test_penalties_and_forced_tokens():
    sticky = np.full((VOCAB, VOCAB), -5.0)
    sticky[:, [PAD, BOS]] = -30.0
    np.fill_diagonal(sticky, 5.0)  # every token wants to repeat itself
    sticky[BOS, 3] = 6.0
    assert rows(run(sticky, max_new_tokens=5))[0] == (3, 3, 3, 3, 3)
    no_repeat = rows(run(sticky, max_new_tokens=8, no_repeat_ngram_size=2))[0]
    bigrams = list(zip(no_repeat, no_repeat[1:]))
    assert len(bigrams) == len(set(bigrams))
    mild = np.full((VOCAB, VOCAB), 0.5)
    mild[:, [PAD, BOS]] = -30.0
    np.fill_diagonal(mild, 1.0)
    mild[BOS, 3] = 1.2
    assert rows(run(mild, max_new_tokens=4))[0][:2] == (3, 3)
    assert rows(run(mild, max_new_tokens=4, repetition_penalty=4.0))[0][1] != 3  # 1/4 < 0.5
    assert 3 not in rows(run(sticky, max_new_tokens=4, suppress_tokens=[3]))[0]
    forced = rows(run(sticky, max_new_tokens=4, forced_bos_token_id=4, forced_eos_token_id=EOS))
    assert forced[0] == (4, 4, 4, EOS)


def test_min_new_tokens_holds_back_eos():
    eager = np.full((VOCAB, VOCAB), -5.0)
    eager[:, EOS] = 5.0
    eager[:, [PAD, BOS]] = -30.0
    assert rows(run(eager, max_new_tokens=6))[0] == (EOS,)
    held = rows(run(eager, max_new_tokens=6, min_new_tokens=3))[0]
    assert len(held) == 4 and held[-1] == EOS and EOS not in held[:3]


class ReadOnlyMarkovGraph(MarkovGraph):
    """A Markov graph whose logits are views of its own table, read-only (as a backend that
    returns a buffer it keeps would hand them out)."""

    def _infer(self, feed):
        outputs = super()._infer(feed)
        if "logits" in outputs:
            last = int(feed["input_ids"][0, -1])
            assert (feed["input_ids"][:, -1] == last).all()  # one row kind: a broadcast view
            view = np.broadcast_to(self.table[last], outputs["logits"][:, -1:].shape)
            outputs["logits"] = view
        return outputs


def test_read_only_logits_are_processed_on_a_copy():
    """The loop processes a step's logits in place when it owns them and on a copy when they
    are read-only: the backend's array is never written and the tokens are the same."""
    eager = np.full((VOCAB, VOCAB), -5.0)
    eager[:, EOS] = 5.0
    eager[:, [PAD, BOS]] = -30.0
    specs = encoder_decoder_specs(num_decoder_layers=1, num_heads=1, head_dim=2, d_model=2,
                                  vocab_size=VOCAB, max_positions=32)
    table = eager.astype(np.float32)
    graphs = {name: ReadOnlyMarkovGraph(spec, table) for name, spec in specs.items()}
    config = GenerationConfig.from_kwargs(max_new_tokens=6, min_new_tokens=3).validate(
        vocab_size=VOCAB, max_positions=32)
    ids = np.full((2, 3), 1, dtype=np.int64)
    out = generate(graphs, ids, np.ones_like(ids), special=SPECIAL, config=config)
    expected = run(eager, batch=2, max_new_tokens=6, min_new_tokens=3).sequences
    np.testing.assert_array_equal(out.sequences, expected)
    np.testing.assert_array_equal(table, eager.astype(np.float32))  # EOS never banned in it


def test_streaming_callback_sees_every_step():
    table = random_table(8)
    seen: list[np.ndarray] = []
    config = GenerationConfig(max_new_tokens=5).validate(vocab_size=VOCAB, max_positions=32)
    ids = np.full((2, 3), 4, dtype=np.int64)
    out = generate(markov(table), ids, np.ones_like(ids), special=SPECIAL, config=config,
                   on_token=seen.append)
    assert np.array_equal(np.stack(seen, axis=1), out.sequences)


@pytest.mark.parametrize(("arguments", "named"), [
    ({"num_beams": 0}, "num_beams"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": 0.0}, "temperature"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"max_new_tokens": 33}, "max_new_tokens"),
    ({"suppress_tokens": [99]}, "suppress_tokens"),
    ({"num_beamz": 2}, "num_beamz"),
])
def test_invalid_arguments_are_named(arguments, named):
    with pytest.raises(FerryError, match=named):
        GenerationConfig.from_kwargs(**{"max_new_tokens": 8, **arguments}).validate(
            vocab_size=VOCAB, max_positions=32)


def test_a_bundles_configs_are_validated_once_per_arguments(backends, monkeypatch):
    """A loaded model keeps each validated config by its arguments (a server's clients repeat
    theirs): the same arguments give the same frozen config without validating again, other
    arguments their own, a bad one its error every time, non-JSON values a fresh check."""
    model = backends[1]
    checks = []
    validate = GenerationConfig.validate
    monkeypatch.setattr(GenerationConfig, "validate",
                        lambda self, **limits: checks.append(self) or validate(self, **limits))
    first = model.generation_config(max_new_tokens=7, suppress_tokens=[5, 6])
    assert model.generation_config(suppress_tokens=[5, 6], max_new_tokens=7) is first
    assert len(checks) == 1 and first.suppress_tokens == (5, 6)
    assert model.generation_config(max_new_tokens=8) is not first
    for _ in range(2):  # 7.0 is refused (not taken for the 7 above), each time it is asked
        with pytest.raises(FerryError, match="max_new_tokens"):
            model.generation_config(max_new_tokens=7.0)
    assert len(checks) == 4
    with pytest.raises(FerryError, match="temperature"):  # not JSON: checked afresh
        model.generation_config(temperature=float("nan"))
    assert len(checks) == 5


# ---------------------------------------------------------------- real bundle, two backends

MODES = {
    "greedy": {},
    "beam": {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.8},
    "beam-early": {"num_beams": 3, "early_stopping": True},
    "sampling": {"do_sample": True, "seed": 3, "temperature": 0.9, "top_k": 20, "top_p": 0.95},
    "constrained": {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "min_new_tokens": 4},
}


@pytest.fixture(scope="module")
def backends(tiny_bundle):
    return (ferry.runtime.load(tiny_bundle, backend="torch"),
            ferry.runtime.load(tiny_bundle, backend="onnxruntime"))


@pytest.fixture(scope="module")
def sources(date_data) -> list[str]:
    import json

    lines = (date_data / "eval.jsonl").read_text().splitlines()[:24]
    return [json.loads(line)["source"] for line in lines]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_token_identical_across_backends(backends, sources, mode):
    reference, candidate = backends
    ids, mask = reference.codec.encode(sources)
    expected = reference.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
    got = candidate.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
    assert np.array_equal(expected.sequences, got.sequences)
    assert np.allclose(expected.sequence_scores, got.sequence_scores, atol=1e-4)


# Backend settings that keep the caches on the device between steps: they change no token.
DEVICE_CACHES = {"onnxruntime io-bound": ("onnxruntime", {"io_binding": True}),
                 "torch static cache": ("torch", {"static_cache": True})}


@pytest.fixture(scope="module")
def device_cache_models(tiny_bundle):
    return {name: ferry.runtime.load(tiny_bundle, backend=backend, **options)
            for name, (backend, options) in DEVICE_CACHES.items()}


@pytest.mark.parametrize("mode", MODES)
def test_device_resident_caches_change_no_token(backends, device_cache_models, sources, mode):
    reference, _ = backends
    ids, mask = reference.codec.encode(sources)
    expected = reference.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
    for name, model in device_cache_models.items():
        got = model.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
        assert np.array_equal(expected.sequences, got.sequences), name
        assert np.allclose(expected.sequence_scores, got.sequence_scores, atol=1e-4), name


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_stream_joins_to_the_generated_text(backends, sources, mode):
    _, model = backends
    arguments = {k: v for k, v in MODES[mode].items()}
    for source in sources[:6]:
        pieces = list(model.stream(source, max_new_tokens=14, **arguments))
        assert "".join(pieces) == model.generate([source], max_new_tokens=14, **arguments)[0]
        assert all(pieces)


@pytest.mark.parametrize("mode", ["greedy", "sampling"])
def test_a_batch_streamed_at_once_joins_to_each_generated_text(backends, sources, mode,
                                                               monkeypatch):
    """`stream_batch`: one generation for several inputs, each input's pieces joining to its
    `generate` output, inputs finishing at different steps; beyond the graphs' batch rows
    (3 here) the inputs stream in turn, seeded chunks as `generate` seeds them."""
    _, model = backends
    arguments = {**MODES[mode], "max_new_tokens": 14}
    texts = sources[:8]
    steps = list(model.stream_batch(texts, **arguments))
    assert all(len(pieces) == len(texts) for pieces in steps)
    joined = ["".join(pieces[i] or "" for pieces in steps) for i in range(len(texts))]
    assert joined == model.generate(texts, **arguments)
    for i in range(len(texts)):  # once an input has ended, it stays ended
        flags = [pieces[i] is None for pieces in steps]
        assert flags == sorted(flags)
    spec = model.graphs["decoder_init"].spec
    monkeypatch.setitem(spec.dims, "batch", dataclasses.replace(spec.dims["batch"], max=3))
    steps = list(model.stream_batch(texts, **arguments))
    assert ["".join(pieces[i] or "" for pieces in steps) for i in range(len(texts))] == \
        model.generate(texts, **arguments)
    with pytest.raises(FerryError, match="num_beams=1"):
        next(model.stream_batch(texts, num_beams=2))


def test_a_cancelled_stream_row_leaves_the_batch(backends, sources):
    """A row whose client left stops costing compute: the decoder steps run without it, and
    the other rows still come out as `generate` makes them."""
    _, model = backends
    texts = sources[:4]
    gone = [False] * len(texts)
    widths: list[int] = []
    step = model.graphs["decoder_step"]
    infer = step.infer
    step.infer = lambda feed: (widths.append(len(feed["input_ids"])), infer(feed))[1]
    try:
        steps = []
        for pieces in model.stream_batch(texts, max_new_tokens=14, min_new_tokens=14,
                                         cancelled=lambda: gone):
            steps.append(pieces)
            if len(steps) == 2:
                gone[1] = True  # row 1's client leaves after two steps
    finally:
        step.infer = infer
    assert widths[0] == 4 and widths[-1] == 3 and 3 in widths[:3], widths
    expected = model.generate(texts, max_new_tokens=14, min_new_tokens=14)
    joined = ["".join(pieces[i] or "" for pieces in steps) for i in range(len(texts))]
    assert all(pieces[1] is None for pieces in steps[3:])  # ended the step it was cancelled
    assert [joined[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert expected[1].startswith(joined[1]) and len(joined[1]) < len(expected[1])


def test_num_return_sequences_groups_outputs_per_input(backends, sources):
    _, model = backends
    grouped = model.generate(sources[:3], num_beams=3, num_return_sequences=3)
    assert len(grouped) == 3 and all(len(group) == 3 for group in grouped)


def test_finished_rows_leave_the_batch():
    """Each decoder step runs only the rows still generating (sampled rows end at different
    steps); the rows' tokens are as if they had kept running (padding after EOS)."""
    graphs = markov(random_table(5))
    batch_sizes: list[int] = []
    original = graphs["decoder_step"].infer
    graphs["decoder_step"].infer = lambda feed: (batch_sizes.append(len(feed["input_ids"])),
                                                 original(feed))[1]
    config = GenerationConfig.from_kwargs(do_sample=True, seed=0, max_new_tokens=12).validate(
        vocab_size=VOCAB, max_positions=32)
    ids = np.full((16, 3), 3, dtype=np.int64)
    out = generate(graphs, ids, np.ones_like(ids), special=SPECIAL, config=config).sequences
    ended = [(row == EOS).argmax() + 1 if (row == EOS).any() else 12 for row in out]
    assert len(set(ended)) > 2
    for step, size in enumerate(batch_sizes, start=1):  # the step feeding token `step`
        assert size == sum(length > step for length in ended)
    for row, length in zip(out, ended):
        assert (row[length:] == PAD).all() and (row[:length] != PAD).all()


def test_the_fast_candidate_ranking_equals_a_full_sort():
    """Beam search ranks only the members of the column groups whose maxima can hold a source's
    best continuations; it must pick exactly what a full stable sort of the (sources,
    beams·vocabulary) totals picks (ties: lower index first), with the same totals — also with
    banned (-inf) tokens, dead beams (-1e9), a tail group, many ties and rows nearly all
    banned."""
    from ferry.runtime.beam_search import _best, _best_continuations

    rng = np.random.default_rng(0)
    for trial in range(120):
        beams, vocab = 1 + trial % 5, 600 + 37 * trial  # vocab: groups of 64 and a tail
        logprobs = rng.standard_normal((3, beams, vocab)).astype(np.float32)
        scores = rng.standard_normal((3, beams)).astype(np.float32)
        if trial % 3 == 0:
            logprobs[:, :, rng.integers(0, vocab, 80)] = -np.inf
        if trial % 4 == 0:
            logprobs, scores = np.round(logprobs, 1), np.round(scores, 1)  # ties across the cut
        if trial % 5 == 0:
            scores[1, 1:] = -1e9
        if trial % 7 == 0:
            logprobs[2] = -np.inf
            logprobs[2, 0, 11] = 0.0
        totals = (logprobs + scores[:, :, None]).reshape(3, beams * vocab)
        full = np.lexsort((np.broadcast_to(np.arange(totals.shape[1]), totals.shape), -totals),
                          axis=1)[:, :2 * beams]
        picked, values = _best_continuations(logprobs, scores, 2 * beams)
        assert np.array_equal(picked, full), trial
        assert np.array_equal(values, np.take_along_axis(totals, full, axis=1)), trial
        assert np.array_equal(_best(totals, 2 * beams), full), trial


def test_log_softmax_in_parts_and_in_place_equals_one_pass(monkeypatch):
    """Beam search's log-softmax over (rows, vocabulary) runs in row parts on host threads,
    into a reused buffer or in place; every element must equal the one-pass float32 formula
    bit for bit (the oracle tests compare beam scores with `transformers`), -inf stays -inf,
    and half-precision logits are computed in float32."""
    from ferry.runtime import host_parallel

    monkeypatch.setattr(host_parallel, "host_threads", lambda: 3)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((40, 20_000)) * 4).astype(np.float32)  # 3.2 MB: 3 parts
    logits[5, 7] = -np.inf
    assert len(host_parallel.axis_parts(40, logits.nbytes)) == 3
    shifted = logits - logits.max(axis=-1, keepdims=True)
    expected = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    assert np.array_equal(log_softmax(logits), expected)
    buffer = np.empty_like(logits)
    assert log_softmax(logits, out=buffer) is buffer and np.array_equal(buffer, expected)
    in_place = logits.copy()
    assert np.array_equal(log_softmax(in_place, out=in_place), expected)
    assert log_softmax(logits)[5, 7] == -np.inf
    half = logits.astype(np.float16)
    wide = half.astype(np.float32)
    shifted = wide - wide.max(axis=-1, keepdims=True)
    assert np.array_equal(log_softmax(half),
                          shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
