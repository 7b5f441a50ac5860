"""Parity: do two backends compute the same thing? Graph by graph, and as generated tokens.

Every graph is compared in isolation on identical inputs: the decoder graphs are fed the
*reference* backend's encoder outputs and KV cache, so a difference is attributed to the graph
that made it. Inputs are padded batches (rows of different lengths), because padding is where
ports go wrong (masks in cross-attention, fully masked rows).

Differences are reported as max |a - b| and a relative figure, max |a - b| / max |reference|
(robust to reference values near zero, unlike an elementwise ratio).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import asdict, dataclass, field

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import MEMORY_INPUTS, is_probe
from ferry.runtime.backends.base import Feed, GraphBackend
from ferry.runtime.charts import PERCENTILES
from ferry.runtime.decoding_state import left_padded, renamed
from ferry.runtime.generation import greedy_generate
from ferry.runtime.recurrence import carried_memory, empty_memory, has_memory
from ferry.runtime.special_ids import SpecialIds

FP32_ATOL = 1e-4  # fp32 backends must agree with the fp32 torch reference within this,
# or within this share of the output's largest magnitude when that is larger: a 24-layer LLM's
# logits of magnitude 30 differ by ~2e-4 between fp32 kernels that sum in another order
FP32_RTOL = 1e-5
FP16_Q99_ATOL = 1e-2  # 16-bit graphs: 99th percentile of |Δ| (fp16: 10 mantissa bits)
BF16_Q99_ATOL = 8e-2  # bf16 keeps 7 mantissa bits: ~8× fp16's rounding error


@dataclass(frozen=True)
class Tolerance:
    """What a precision must meet against the fp32 torch reference."""

    atol: float | None  # max |Δ| on every graph output; None: not a gate
    min_token_agreement: float  # share of greedy sequences identical to the reference's
    # the 99th percentile of |Δ| on every graph output (16-bit graphs: a few outliers among
    # thousands of logits are expected, a shifted bulk is not); None: not a gate
    q99_atol: float | None = None


TOLERANCES = {
    "fp32": Tolerance(atol=FP32_ATOL, min_token_agreement=1.0),
    "int8": Tolerance(atol=None, min_token_agreement=0.95),
    "int4": Tolerance(atol=None, min_token_agreement=0.90),
    "fp16": Tolerance(atol=None, min_token_agreement=0.95, q99_atol=FP16_Q99_ATOL),
    "bf16": Tolerance(atol=None, min_token_agreement=0.90, q99_atol=BF16_Q99_ATOL),
}
TOLERANCES["fused"] = TOLERANCES["fp32"]  # fp32 graphs, ONNX Runtime's fused kernels


def tolerance_for(precision: str) -> Tolerance:
    if precision not in TOLERANCES:
        raise FerryError(f"no tolerance is defined for precision {precision!r}; known: "
                         f"{sorted(TOLERANCES)}")
    return TOLERANCES[precision]


@dataclass(frozen=True)
class FeedSizes:
    """Shapes of the parity inputs. Rows get different source lengths (padding)."""

    batch: int = 3
    src_len: int = 11
    tgt_len: int = 5
    past_len: int = 6


def padded_source(rng: np.random.Generator, sizes: FeedSizes, *, vocab_size: int, pad: int,
                  first_token: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, S) random ids and mask; row 0 is full length, the others are shorter, padded."""
    lengths = [sizes.src_len] + list(rng.integers(1, sizes.src_len, size=sizes.batch - 1))
    ids = rng.integers(first_token, vocab_size, size=(sizes.batch, sizes.src_len))
    mask = (np.arange(sizes.src_len)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return np.where(mask == 1, ids, pad).astype(np.int64), mask


def segment_ids(mask: np.ndarray, segments: int = 2) -> np.ndarray:
    """(B, S) token types for a padded batch: the second half of each row's tokens is segment 1
    (a sentence pair), padding is 0; all 0 for a model with one segment (RoBERTa)."""
    lengths = mask.sum(axis=1, keepdims=True)  # (B, 1)
    second = (np.arange(mask.shape[1])[None, :] >= lengths // 2) & (mask == 1)
    return (second & (segments > 1)).astype(np.int64)


def is_generative(graphs: dict) -> bool:
    """Whether these graphs generate (encoder-decoder, or a decoder-only LM's cached graphs)
    or are single passes (encoder-only, task heads)."""
    return "decoder_step" in graphs


def graph_feeds(reference: dict[str, GraphBackend], *, sizes: FeedSizes, vocab_size: int,
                pad: int, seed: int, first_token: int = 5, segments: int = 2) -> dict[str, Feed]:
    """One feed per graph; decoder feeds carry the reference's encoder outputs and KV cache.
    `segments`: the model's segment (token type) count, for graphs that read segment ids."""
    rng = np.random.default_rng(seed)
    input_ids, mask = padded_source(rng, sizes, vocab_size=vocab_size, pad=pad,
                                    first_token=first_token)
    single = {"input_ids": input_ids, "attention_mask": mask,
              "token_type_ids": segment_ids(mask, segments)}
    feeds = {name: {k: single[k] for k in graph.spec.input_names if k not in MEMORY_INPUTS}
             for name, graph in reference.items() if name in ("lm", "head")}
    for name, feed in feeds.items():  # a recurrent graph: a second segment after a first
        if has_memory(reference[name].spec):
            first = reference[name].infer({**feed, **empty_memory(reference[name].spec,
                                                                  sizes.batch)})
            feed.update(carried_memory(first))
    if "decoder_step" in reference and "encoder" not in reference:  # decoder-only generation
        prompt_ids, prompt_mask = left_padded(input_ids, mask)
        feeds["decoder_init"] = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
        past = reference["decoder_init"].infer(feeds["decoder_init"])
        new = 2  # a prefill chunk's causal attention, the last position's logits
        feeds["decoder_step"] = {
            "input_ids": rng.integers(first_token, vocab_size, size=(sizes.batch, new)),
            "attention_mask": np.concatenate(
                [prompt_mask, np.ones((sizes.batch, new), np.int64)], axis=1),
            **renamed(past, "present_", "past_")}
    if "encoder" not in reference:
        return feeds
    encoder_feed = {"input_ids": input_ids, "attention_mask": mask}
    cross = renamed(reference["encoder"].infer(encoder_feed), "cross_", "cross_")

    def targets(length: int) -> np.ndarray:
        return rng.integers(first_token, vocab_size, size=(sizes.batch, length)).astype(np.int64)

    init_feed = {"input_ids": targets(sizes.tgt_len), "encoder_attention_mask": mask, **cross}
    past_source = reference["decoder_init"].infer({**init_feed, "input_ids": targets(
        sizes.past_len)})
    step_feed = {"input_ids": targets(1), "encoder_attention_mask": mask, **cross,
                 **renamed(past_source, "present_", "past_")}
    if "attention_mask" in reference["decoder_step"].spec.input_names:
        # the last row joined the batch later: its first cached positions are padding
        decoder_mask = np.ones((sizes.batch, sizes.past_len + 1), np.int64)
        decoder_mask[-1, : sizes.past_len // 2] = 0
        step_feed["attention_mask"] = decoder_mask
    return {"encoder": encoder_feed, "decoder_init": init_feed, "decoder_step": step_feed}


@dataclass
class TensorDiff:
    graph: str
    output: str
    max_abs: float
    max_rel: float
    passed: bool
    percentiles: tuple[float, ...] = ()  # |Δ| at charts.PERCENTILES
    scale: float = 0.0  # max |reference|

    @property
    def q99_abs(self) -> float:
        """The 99th percentile of |Δ|."""
        return self.percentiles[PERCENTILES.index(99.0)] if self.percentiles else 0.0

    def describe(self) -> str:
        return f"max |Δ| {self.max_abs:.2e}, 99th percentile {self.q99_abs:.2e}"


@dataclass
class ParityReport:
    """Outcome of comparing a backend with a reference (graph outputs and greedy tokens)."""

    reference: str
    candidate: str
    atol: float | None
    diffs: list[TensorDiff] = field(default_factory=list)
    q99_atol: float | None = None
    sequences: int = 0  # greedy sequences compared (single-pass graphs: argmax decisions)
    identical_sequences: int = 0
    min_token_agreement: float = 1.0
    agreement: str = "greedy tokens identical"  # what `sequences` counts, for the table

    @property
    def token_agreement(self) -> float:
        return self.identical_sequences / self.sequences if self.sequences else 1.0

    @property
    def passed(self) -> bool:
        return (all(d.passed for d in self.diffs)
                and self.token_agreement >= self.min_token_agreement)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "candidate": self.candidate, "atol": self.atol,
                "q99_atol": self.q99_atol,
                "min_token_agreement": self.min_token_agreement,
                "passed": self.passed, "token_agreement": self.token_agreement,
                "sequences": self.sequences, "identical_sequences": self.identical_sequences,
                "outputs": [{**asdict(d), "q99_abs": d.q99_abs} for d in self.diffs]}


def compared_positions(graph: str, feed: Feed, output: str) -> np.ndarray | None:
    """Where an output is compared: a decoder-only prompt's (`decoder_init` with an
    `attention_mask` and no encoder) logits, present K/V and probed states at its real
    positions only — a padded position feeds nothing (every later query masks it), and fused
    kernels leave it at 0 where the written-out attention averages over the padding; elsewhere
    everything (None)."""
    if graph != "decoder_init" or "encoder_attention_mask" in feed or "attention_mask" not in feed:
        return None
    real = np.asarray(feed["attention_mask"]) != 0  # (B, S)
    if output == "logits" or is_probe(output):  # (B, S, V) or a hidden state (B, S, D)
        return real[:, :, None]  # (B, S, 1)
    if output.startswith("present_"):
        return real[:, None, :, None]  # (B, 1, S, 1)
    return None


def diff_outputs(graph: str, reference: Feed, candidate: Feed, atol: float | None,
                 q99_atol: float | None = None, feed: Feed | None = None) -> list[TensorDiff]:
    """Per-output max abs / rel difference and 99th percentile of |Δ|; NaN or Inf in the
    candidate always fails, the two statistics only where their bound is given (max |Δ| ≤
    `atol`, or ≤ `FP32_RTOL` × max|reference| where that is larger)."""
    diffs = []
    for name in reference:
        # as numpy: a backend may hand back device-resident arrays (the torch backend's KV)
        ref, got = np.asarray(reference[name]), np.asarray(candidate[name])
        if got.shape != ref.shape:
            raise FerryError(f"graph {graph}: output {name} has shape {got.shape}, "
                             f"reference {ref.shape}")
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        compared = compared_positions(graph, feed or {}, name)
        if compared is not None:  # the real positions only (NaN anywhere still fails)
            err = err[np.broadcast_to(compared, err.shape)]
            ref = ref[np.broadcast_to(compared, ref.shape)]
        max_abs = float(err.max()) if err.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        spread = (tuple(float(v) for v in np.percentile(err, PERCENTILES)) if err.size
                  else (0.0,) * len(PERCENTILES))
        diff = TensorDiff(graph, name, max_abs, max_abs / max(scale, 1e-12), False, spread, scale)
        diff.passed = (bool(np.isfinite(got).all())
                       and (atol is None or max_abs <= max(atol, FP32_RTOL * scale))
                       and (q99_atol is None or diff.q99_abs <= q99_atol))
        diffs.append(diff)
    return diffs


def compare_graphs(reference: dict[str, GraphBackend], candidate: dict[str, GraphBackend],
                   feeds: dict[str, Feed], atol: float | None) -> list[TensorDiff]:
    """Run every graph on both backends with the same feed and diff the outputs."""
    diffs = []
    for graph, feed in feeds.items():
        diffs += diff_outputs(graph, reference[graph].infer(feed), candidate[graph].infer(feed),
                              atol, feed=feed)
    return diffs


def compare_generation(reference: dict[str, GraphBackend], candidate: dict[str, GraphBackend],
                       input_ids: np.ndarray, attention_mask: np.ndarray, *,
                       special: SpecialIds, max_new_tokens: int) -> tuple[int, int]:
    """(sequences, sequences with identical greedy tokens)."""
    ref = greedy_generate(reference, input_ids, attention_mask, special=special,
                          max_new_tokens=max_new_tokens)
    got = greedy_generate(candidate, input_ids, attention_mask, special=special,
                          max_new_tokens=max_new_tokens)
    return len(ref), identical_rows(ref, got, special.pad)


def decisions(outputs: Feed, mask: np.ndarray) -> list[np.ndarray]:
    """The argmax decisions of single-pass graph outputs: per row for (B, L) outputs (classes,
    or a start/end position), per real token for (B, S, L) outputs (tags, vocabulary)."""
    picked = []
    for name in sorted(outputs):
        best = outputs[name].argmax(axis=-1)
        picked.append(best[mask == 1] if best.ndim == 2 else best)
    return picked


def agreeing_decisions(reference: Feed, candidate: Feed, mask: np.ndarray) -> tuple[int, int]:
    """(decisions, decisions on which the two backends pick the same argmax)."""
    pairs = list(zip(decisions(reference, mask), decisions(candidate, mask)))
    return (sum(a.size for a, _ in pairs), sum(int((a == b).sum()) for a, b in pairs))


def identical_rows(expected: np.ndarray, got: np.ndarray, pad: int) -> int:
    """How many generated rows are token-identical (ignoring padding after the end)."""
    return int(sum(np.array_equal(trim(a, pad), trim(b, pad)) for a, b in zip(expected, got)))


def trim(row: np.ndarray, pad: int) -> np.ndarray:
    """A generated row without the padding after its end."""
    keep = len(row)
    while keep and row[keep - 1] == pad:
        keep -= 1
    return row[:keep]


GOLDEN_MAX_ELEMENTS = 1 << 26  # golden arrays are small; a header claiming more is refused


def load_golden(path) -> dict[str, np.ndarray]:
    """The arrays of a bundle's golden.npz (never unpickled). Each array's header is read
    first: one that declares more than GOLDEN_MAX_ELEMENTS values in all is refused before
    anything is allocated."""
    try:
        with zipfile.ZipFile(path) as archive:
            declared = 0
            for member in archive.namelist():
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"{member}: unsupported .npy version {version}")
                    shape, _, _ = read_header(f)
                declared += math.prod(shape)
            if declared > GOLDEN_MAX_ELEMENTS:
                raise FerryError(f"{path} declares {declared:,} values, far more than golden "
                                 "inputs hold; re-export the bundle")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FerryError(f"{path} is not a readable golden.npz ({exc})") from exc


def _check_outputs(report: ParityReport, expected: dict[str, Feed],
                   candidate: dict[str, GraphBackend], feeds: dict[str, Feed]) -> None:
    """Run every graph of `candidate` once on its feed; add its output diffs against `expected`
    to the report, and for single-pass graphs its argmax decisions too."""
    for graph, feed in feeds.items():
        got = candidate[graph].infer(feed)
        report.diffs += diff_outputs(graph, expected[graph], got, report.atol, report.q99_atol,
                                     feed=feed)
        if not is_generative(candidate):
            total, same = agreeing_decisions(expected[graph], got, feed["attention_mask"])
            report.sequences += total
            report.identical_sequences += same
            report.agreement = "argmax decisions identical"


def golden_arrays(golden: dict[str, np.ndarray], graph: str, kind: str) -> Feed:
    """One graph's stored golden inputs (`kind` "in") or fp32 torch outputs ("out")."""
    prefix = f"{graph}/{kind}/"
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


def verify_against_golden(graphs: dict[str, GraphBackend], golden: dict[str, np.ndarray], *,
                          special: SpecialIds, backend: str, precision: str = "fp32"
                          ) -> ParityReport:
    """Run every graph on the golden inputs and the golden generations; diff with the stored
    fp32 torch outputs and tokens, with the precision's tolerance. Needs no torch."""
    tolerance = tolerance_for(precision)
    report = ParityReport(reference="golden (torch fp32)", candidate=backend,
                          atol=tolerance.atol, min_token_agreement=tolerance.min_token_agreement,
                          q99_atol=tolerance.q99_atol)
    _check_outputs(report, {g: golden_arrays(golden, g, "out") for g in graphs}, graphs,
                   {g: golden_arrays(golden, g, "in") for g in graphs})
    if not is_generative(graphs):
        return report
    expected_ids = golden["generation/output_ids"]
    got = greedy_generate(graphs, golden["generation/input_ids"],
                          golden["generation/attention_mask"], special=special,
                          max_new_tokens=expected_ids.shape[1])
    report.sequences = len(expected_ids)
    report.identical_sequences = identical_rows(expected_ids, got, special.pad)
    return report


def compare_backends(graphs_by_backend: dict[str, dict[str, GraphBackend]], *,
                     golden: dict[str, np.ndarray], special: SpecialIds, vocab_size: int,
                     sizes: FeedSizes = FeedSizes(batch=5, src_len=17, tgt_len=6, past_len=9),
                     seed: int = 7, tolerances: dict[str, Tolerance] | None = None,
                     segments: int = 2) -> list[ParityReport]:
    """Compare every backend with the first one: graphs on fresh random padded inputs, greedy
    tokens on the bundle's golden generation inputs. `tolerances` maps a backend name to its
    precision's tolerance (default: fp32's); `segments` is the model's segment count."""
    names = list(graphs_by_backend)
    reference = graphs_by_backend[names[0]]
    feeds = graph_feeds(reference, sizes=sizes, vocab_size=vocab_size, pad=special.pad, seed=seed,
                        segments=segments)
    expected = {graph: reference[graph].infer(feed) for graph, feed in feeds.items()}  # once
    reports = []
    for name in names[1:]:
        tolerance = (tolerances or {}).get(name, TOLERANCES["fp32"])
        candidate = graphs_by_backend[name]
        report = ParityReport(reference=names[0], candidate=name, atol=tolerance.atol,
                              min_token_agreement=tolerance.min_token_agreement,
                              q99_atol=tolerance.q99_atol)
        _check_outputs(report, expected, candidate, feeds)
        if is_generative(reference):
            report.sequences, report.identical_sequences = compare_generation(
                reference, candidate, golden["generation/input_ids"],
                golden["generation/attention_mask"], special=special,
                max_new_tokens=golden["generation/output_ids"].shape[1])
        reports.append(report)
    return reports


def format_table(reports: list[ParityReport]) -> str:
    """A plain-text parity table; per-layer tensors (`present_key_0`, …) are folded into their
    worst layer (`present_key_*`)."""
    width = max([len(f"{r.candidate} vs {r.reference}") for r in reports] + [8])
    lines = [f"{'backends':<{width}} {'graph/output':<34} {'max abs':>9} {'max rel':>9} "
             f"{'p99 abs':>9}  ok"]
    for report in reports:
        pair = f"{report.candidate} vs {report.reference}"
        folded: dict[str, TensorDiff] = {}
        for d in report.diffs:
            stem = d.output.rstrip("0123456789")
            key = f"{d.graph}/{stem}*" if stem != d.output else f"{d.graph}/{d.output}"
            if key not in folded or d.max_abs > folded[key].max_abs or not d.passed:
                folded[key] = d
        for key, d in folded.items():
            lines.append(f"{pair:<{width}} {key:<34} {d.max_abs:>9.2e} {d.max_rel:>9.2e} "
                         f"{d.q99_abs:>9.2e}  {'yes' if d.passed else 'NO'}")
        lines.append(f"{pair:<{width}} {report.agreement:<34} "
                     f"{report.identical_sequences:>4}/{report.sequences:<4} "
                     f"{100 * report.token_agreement:>8.1f}% {'':>9}  "
                     f"{'yes' if report.token_agreement >= report.min_token_agreement else 'NO'}")
    if not reports:
        return "no backends compared"
    verdict = "PASS" if all(r.passed for r in reports) else "FAIL"
    gates = dict.fromkeys(
        (f"max |Δ| ≤ {r.atol:.0e} on every output" if r.atol is not None else "finite outputs")
        + (f", 99th percentile |Δ| ≤ {r.q99_atol:.0e}" if r.q99_atol is not None else "")
        + f" and ≥ {100 * r.min_token_agreement:.0f}% "
        + ("identical greedy sequences" if r.agreement.startswith("greedy")
           else "identical argmax decisions")
        for r in reports)
    lines.append(f"parity {verdict} ({'; '.join(gates)})")
    return "\n".join(lines)
