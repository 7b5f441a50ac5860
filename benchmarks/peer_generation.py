"""Generation speed of ferry against its peers, on one machine, in one run, as ratios, on the
same weights.

One random-weight Hugging Face BART (`--shape bart-base`: bart-base's shape — d_model 768, 12
heads, 6+6 layers, FFN 3072, vocabulary 50265 — or `--shape base`: the paper's base, d_model 512,
8 heads, FFN 2048, vocabulary 32000, ReLU) is saved once; every engine runs that model: ferry
imports it (`ferry import hf`) and exports its bundle (the portable fp32, int8 and fused fp32
graphs on ONNX Runtime); the peers load the same directory wherever they are installed
(optional: `pip install transformers optimum[onnxruntime] ctranslate2`): Hugging Face
transformers eager `generate`, Optimum's ONNX Runtime model, CTranslate2 fp32 / int8. A peer
that is not installed is reported as skipped. 32-token sources, 64 forced new tokens, greedy,
batch 1 and 16. Engines are timed in alternating rounds (medians), so a noisy machine slows them
alike, each in a process of its own (`ferry.runtime.isolated_engine`: engines sharing a process
slow each other; `--one-process` shows how much); ferry's greedy tokens are checked against
transformers' on the same inputs.

    python benchmarks/peer_generation.py [--shape bart-base|base] [--threads 2] [--runs 5]
                                         [--batches 1,16] [--num-beams 1] [--contend N]
                                         [--out results.json] [--workdir DIR] [--one-process]

`--contend N` times every engine beside N processes that each keep a CPU busy (a known, bounded
load, the same for all engines): how each copes with a machine it shares. ferry's CPU sessions
then choose their own spinning (off: no free core for each thread, `ferry.runtime.cpu_threads`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ferry.export import export_bundle
from ferry.runtime import load
from ferry.runtime.benchmark import (
    alternating_medians,
    background_load,
    machine_description,
    wait_until_quiet,
)
from ferry.runtime.isolated_engine import close_engines, start_engine
from ferry.train.hf_import import import_hf

SOURCE_LEN, NEW_TOKENS = 32, 64
OURS = ("fp32", "int8", "fused")  # ferry's variants measured: portable fp32, int8, fused fp32
SHAPES = {
    "bart-base": dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                      encoder_attention_heads=12, decoder_attention_heads=12,
                      encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
                      activation_function="gelu"),
    "base": dict(vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6,
                 encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                 decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="relu"),
}
FIRST_WORD = 4  # ids below are BART's <s>, <pad>, </s>, <unk>


def hf_model_dir(workdir: Path, shape: str) -> Path:
    """The one model every engine runs: a random-weight BART of `shape`, with a word-level
    tokenizer whose vocabulary `tok4 … tokN` maps one-to-one onto the model's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

    path = workdir / f"bart-{shape}"
    if not path.exists():
        config = BartConfig(**SHAPES[shape], dropout=0.0, forced_eos_token_id=None,
                            normalize_before=False)  # read by CTranslate2's converter
        torch.manual_seed(0)
        BartForConditionalGeneration(config).eval().save_pretrained(path)
        specials = ["<s>", "<pad>", "</s>", "<unk>"]
        vocab = {token: i for i, token in enumerate(specials)}
        vocab.update({f"tok{i}": i for i in range(FIRST_WORD, config.vocab_size)})
        words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", pad_token="<pad>",
                                eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


def model_and_bundle(workdir: Path, shape: str) -> tuple[Path, Path]:
    """The random model of `shape` in `workdir` and ferry's bundle of it (fp32, int8, fused),
    made unless a complete one is there from an earlier run."""
    model_dir, bundle = workdir / f"bart-{shape}", workdir / f"bundle-{shape}"
    if (bundle / "manifest.json").exists() and model_dir.exists():
        print(f"reusing {model_dir} and {bundle}", file=sys.stderr)
        return model_dir, bundle
    print(f"saving a random-weight {shape} BART, importing and exporting it (fp32 + int8 + "
          "fused) …", file=sys.stderr)
    model_dir = hf_model_dir(workdir, shape)
    imported = import_hf(model_dir, workdir / f"imported-{shape}", log=lambda m: None)
    return model_dir, export_bundle(imported, bundle, precisions=OURS, log=lambda m: None)


def sources(batch: int, vocab_size: int) -> np.ndarray:
    """(batch, SOURCE_LEN) random word ids, the same for every engine."""
    rng = np.random.default_rng(0)
    return rng.integers(FIRST_WORD, vocab_size, (batch, SOURCE_LEN)).astype(np.int64)


def hf_eager(batch: int, model_dir: Path, threads: int, beams: int) -> Callable[[], None]:
    from transformers import BartForConditionalGeneration

    model = BartForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = torch.from_numpy(sources(batch, model.config.vocab_size))

    def generate():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=beams,
                           do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    return generate


def optimum_ort(batch: int, model_dir: Path, threads: int, beams: int) -> Callable[[], None]:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForSeq2SeqLM.from_pretrained(model_dir, export=True,
                                                 session_options=options)
    ids = torch.from_numpy(sources(batch, model.config.vocab_size))

    def generate():
        model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=beams,
                       do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    return generate


def ctranslate2(quantization: str) -> Callable[..., Callable[[], None]]:
    def make(batch: int, model_dir: Path, threads: int, beams: int) -> Callable[[], None]:
        import ctranslate2 as ct2
        from ctranslate2.converters import TransformersConverter

        target = model_dir.with_name(f"{model_dir.name}-ct2-{quantization}")
        if not target.exists():
            TransformersConverter(str(model_dir)).convert(str(target), quantization=quantization)
        translator = ct2.Translator(str(target), device="cpu", intra_threads=threads)
        vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        tokens = [[f"tok{t}" for t in row] for row in sources(batch, vocab_size)]

        def generate():
            translator.translate_batch(tokens, beam_size=beams, max_decoding_length=NEW_TOKENS,
                                       min_decoding_length=NEW_TOKENS)

        return generate

    return make


def returned(value):
    """`value` itself: an engine that needs no loading, as a factory a child process can call."""
    return value


def ferry_engine(bundle: Path, precision: str, spinning: bool | None = None
                 ) -> Callable[..., Callable[[], None]]:
    def make(batch: int, model_dir: Path, threads: int, beams: int) -> Callable[[], None]:
        model = load(bundle, intra_op_threads=threads, precision=precision, spinning=spinning)
        ids = sources(batch, model.vocab_size)
        mask = np.ones_like(ids)

        def generate():
            out = model.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS, num_beams=beams)
            assert out.shape == (batch, NEW_TOKENS)

        return generate

    return make


def measure(engines: dict[str, Callable], batch: int, runs: int, model_dir: Path, threads: int,
            beams: int = 1, settle: bool = True) -> dict[str, float | str]:
    """tokens/s per engine: one warm-up each, then `runs` rounds timing every engine once per
    round in turn (so a noisy neighbour slows all engines alike), median per engine. `settle`:
    each engine loads once the machine is quiet (not when the run contends on purpose)."""
    calls, results = {}, {}
    for name, make in engines.items():
        if settle:  # each engine loads as on a machine of its own
            wait_until_quiet()
        try:
            calls[name] = make(batch, model_dir, threads, beams)
            calls[name]()
        except ImportError as exc:
            results[name] = f"skipped ({exc.name or exc} not installed)"
    medians = alternating_medians(calls, runs, on_round=lambda i: print(
        f"batch {batch}: round {i}/{runs}", file=sys.stderr))
    results.update({name: batch * NEW_TOKENS / seconds for name, seconds in medians.items()})
    return {name: results[name] for name in engines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bart-base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--num-beams", type=int, default=1,
                        help="> 1: beam search (every beam runs the full 64 tokens)")
    parser.add_argument("--engines", default="",
                        help="comma-separated substrings: time only the engines named so")
    parser.add_argument("--contend", type=int, default=0,
                        help="time the engines beside this many busy processes")
    parser.add_argument("--one-process", action="store_true",
                        help="run every engine in this process instead of one process each "
                             "(shows how much engines sharing a process slow each other)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the random model and ferry's bundle here and reuse them in "
                             "later runs (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[int, float | str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        model_dir, bundle = model_and_bundle(workdir, args.shape)
        agreement = same_tokens_as_transformers(bundle, model_dir)
        print(f"greedy tokens identical to transformers on {agreement}", file=sys.stderr)
        factories = {**{f"ferry onnxruntime {p}": partial(ferry_engine, bundle, p) for p in OURS},
                     # beside other work: ONNX Runtime's default, threads that always spin
                     **({"ferry onnxruntime spinning int8": partial(ferry_engine, bundle, "int8",
                                                                    True)}
                        if args.contend else {}),
                     "transformers eager": partial(returned, hf_eager),
                     "optimum onnxruntime": partial(returned, optimum_ort),
                     "ctranslate2 fp32": partial(ctranslate2, "float32"),
                     "ctranslate2 int8": partial(ctranslate2, "int8")}
        wanted = [w.strip() for w in args.engines.split(",") if w.strip()]
        engines = {name: start_engine(factory, isolated=not args.one_process,
                                      torch_threads=args.threads)
                   for name, factory in factories.items()
                   if not wanted or any(w in name for w in wanted)}
        with background_load(args.contend):
            contended = machine_description()
            for batch in batches:
                for name, value in measure(engines, batch, args.runs, model_dir, args.threads,
                                           args.num_beams, settle=not args.contend).items():
                    results.setdefault(name, {})[batch] = value
        close_engines(engines.values())
    search = f"beam search, {args.num_beams} beams" if args.num_beams > 1 else "greedy"
    beside = f", beside {args.contend} busy processes ({contended})" if args.contend else ""
    print(f"shape {args.shape}, {search}, {args.threads} threads{beside}; greedy tokens "
          f"identical to transformers on {agreement}")
    print(format_table(results, batches))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_description(), "shape": args.shape,
                                        "threads": args.threads, "num_beams": args.num_beams,
                                        "contending_processes": args.contend,
                                        "same_tokens": agreement,
                                        "results": results}, indent=2))
    return 0


def same_tokens_as_transformers(bundle: Path, model_dir: Path, batch: int = 4) -> str:
    """How many greedy generations (16 tokens) of ferry's fp32 graphs equal transformers' on the
    same sources: the engines share weights, so they must compute the same thing."""
    try:
        from transformers import BartForConditionalGeneration
    except ImportError:
        return "— (transformers not installed)"
    reference = BartForConditionalGeneration.from_pretrained(model_dir).eval()
    ids = sources(batch, reference.config.vocab_size)
    with torch.inference_mode():
        expected = reference.generate(torch.from_numpy(ids), max_new_tokens=16, num_beams=1,
                                      do_sample=False)[:, 1:].numpy()
    ours = load(bundle, precision="fp32").generate_ids(ids, max_new_tokens=16)
    same = sum(e[e != 1].tolist() == o[o != 1].tolist() for e, o in zip(expected, ours))
    return f"{same}/{batch} sources"


def format_table(results: dict[str, dict[int, float | str]], batches: list[int]) -> str:
    """tokens/s per engine and batch, and each ferry variant as ratios of each peer."""
    lines = [f"machine: {machine_description()}",
             f"{'engine':<26}" + "".join(f"{f'batch {b} tok/s':>18}" for b in batches)]
    for name, row in results.items():
        cells = [f"{v:>18.1f}" if isinstance(v, float) else f"{'skipped':>18}"
                 for v in (row[b] for b in batches)]
        lines.append(f"{name:<26}" + "".join(cells))
    for ours in (name for name in results if name.startswith("ferry")):
        for peer, row in results.items():
            if peer.startswith("ferry"):
                continue
            ratios = [results[ours][b] / row[b] if isinstance(row[b], float) else None
                      for b in batches]
            cells = "".join(f"{f'{r:.2f}x':>18}" if r else f"{'—':>18}" for r in ratios)
            lines.append(f"{ours.removeprefix('ferry onnxruntime '):<13} / {peer:<19}"
                         + cells)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
