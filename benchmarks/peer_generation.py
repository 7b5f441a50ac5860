"""Generation speed of ferry against its peers, on one machine, in one run, as ratios.

The shape is the issue's: the `base` preset (d_model 512, 6+6 layers, 8 heads, FFN 2048,
vocabulary 32000), random weights, 32-token sources, 64 forced new tokens, greedy, batch 1 and
16. ferry runs its own bundle (the portable fp32, int8 and fused fp32 graphs on ONNX Runtime);
the peers run a model of the same shape wherever they are installed (optional: `pip install
transformers optimum[onnxruntime] ctranslate2`): Hugging Face transformers eager `generate`,
Optimum's ONNX Runtime model, CTranslate2 fp32 / int8. A peer that is not installed is reported
as skipped. Engines are timed in alternating rounds (medians), so a noisy machine slows them
alike.

    python benchmarks/peer_generation.py [--threads 2] [--runs 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ferry.export import export_bundle
from ferry.model import Transformer, preset, save_checkpoint
from ferry.runtime import load
from ferry.runtime.benchmark import machine_description, random_sources
from ferry.train.text_corpus import docstring_paragraphs
from ferry.train.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

SOURCE_LEN, NEW_TOKENS = 32, 64
OURS = ("fp32", "int8", "fused")  # ferry's variants measured: portable fp32, int8, fused fp32


def base_checkpoint(directory: Path) -> Path:
    """A random-init `base` encoder-decoder checkpoint with a tokenizer (its ids < vocab)."""
    torch.manual_seed(0)
    model = Transformer(preset("base", dropout=0.0)).eval()
    tokenizer = train_tokenizer(docstring_paragraphs()[:2000], vocab_size=4000,
                                num_sentinels=8)
    checkpoint = directory / "checkpoint"
    save_checkpoint(model, checkpoint, {"special_ids": special_token_ids(tokenizer),
                                        "objective": "seq2seq", "samples": []})
    save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
    return checkpoint


def hf_model():
    """transformers' BART with the base shape (post-norm, ReLU, sinusoidal-free learned
    positions do not change the work per token)."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(vocab_size=32000, d_model=512, encoder_layers=6, decoder_layers=6,
                        encoder_attention_heads=8, decoder_attention_heads=8,
                        encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_position_embeddings=512,
                        activation_function="relu", dropout=0.0, forced_bos_token_id=None,
                        normalize_before=False)  # read by CTranslate2's converter
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


def hf_model_dir(workdir: Path) -> Path:
    """The peer model saved for Optimum / CTranslate2, with a word-level tokenizer whose
    vocabulary `tok0 … tok31999` maps one-to-one onto the model's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = workdir / "bart-hf"
    if not path.exists():
        hf_model().save_pretrained(path)
        specials = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0-3
        vocab = {token: i for i, token in enumerate(specials)}
        vocab.update({f"tok{i}": i for i in range(len(specials), 32000)})
        words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", pad_token="<pad>",
                                eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


def hf_eager(batch: int, workdir: Path, threads: int) -> Callable[[], None]:
    model = hf_model()
    ids = torch.randint(5, 32000, (batch, SOURCE_LEN))

    def generate():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1,
                           do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    return generate


def optimum_ort(batch: int, workdir: Path, threads: int) -> Callable[[], None]:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForSeq2SeqLM.from_pretrained(hf_model_dir(workdir), export=True,
                                                 session_options=options)
    ids = torch.randint(5, 32000, (batch, SOURCE_LEN))

    def generate():
        model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=1, do_sample=False,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)

    return generate


def ctranslate2(quantization: str) -> Callable[[int, Path, int], Callable[[], None]]:
    def make(batch: int, workdir: Path, threads: int) -> Callable[[], None]:
        import ctranslate2 as ct2
        from ctranslate2.converters import TransformersConverter

        target = workdir / f"ct2-{quantization}"
        if not target.exists():
            TransformersConverter(str(hf_model_dir(workdir))).convert(
                str(target), quantization=quantization)
        translator = ct2.Translator(str(target), device="cpu", intra_threads=threads)
        rng = np.random.default_rng(0)
        tokens = [[f"tok{t}" for t in rng.integers(5, 32000, SOURCE_LEN)] for _ in range(batch)]

        def generate():
            translator.translate_batch(tokens, beam_size=1, max_decoding_length=NEW_TOKENS,
                                       min_decoding_length=NEW_TOKENS)

        return generate

    return make


def ferry_engine(bundle: Path, precision: str) -> Callable[[int, Path, int], Callable[[], None]]:
    def make(batch: int, workdir: Path, threads: int) -> Callable[[], None]:
        model = load(bundle, intra_op_threads=threads, precision=precision)
        ids = random_sources(model, batch, SOURCE_LEN, seed=0)
        mask = np.ones_like(ids)

        def generate():
            out = model.generate_ids(ids, mask, max_new_tokens=NEW_TOKENS,
                                     min_new_tokens=NEW_TOKENS)
            assert out.shape == (batch, NEW_TOKENS)

        return generate

    return make


def measure(engines: dict[str, Callable], batch: int, runs: int, workdir: Path, threads: int
            ) -> dict[str, float | str]:
    """tokens/s per engine: one warm-up each, then `runs` rounds timing every engine once per
    round in turn (so a noisy neighbour slows all engines alike), median per engine."""
    calls, results = {}, {}
    for name, make in engines.items():
        try:
            calls[name] = make(batch, workdir, threads)
            calls[name]()
        except ImportError as exc:
            results[name] = f"skipped ({exc.name} not installed)"
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        print(f"batch {batch}: round {round_ + 1}/{runs}", file=sys.stderr)
    results.update({name: batch * NEW_TOKENS / statistics.median(t) for name, t in times.items()})
    return {name: results[name] for name in engines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, dict[int, float | str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print("building the base bundle (random weights, fp32 + int8 + fused) …", file=sys.stderr)
        bundle = export_bundle(base_checkpoint(workdir), workdir / "bundle",
                               precisions=OURS, log=lambda m: None)
        engines = {**{f"ferry onnxruntime {p}": ferry_engine(bundle, p) for p in OURS},
                   "transformers eager": hf_eager, "optimum onnxruntime": optimum_ort,
                   "ctranslate2 fp32": ctranslate2("float32"),
                   "ctranslate2 int8": ctranslate2("int8")}
        for batch in batches:
            for name, value in measure(engines, batch, args.runs, workdir, args.threads).items():
                results.setdefault(name, {})[batch] = value
    print(format_table(results, batches))
    if args.out:
        args.out.write_text(json.dumps({"machine": machine_description(),
                                        "threads": args.threads, "results": results}, indent=2))
    return 0


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
            lines.append(f"{ours.split()[-1]} / {peer:<19}" + cells)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
