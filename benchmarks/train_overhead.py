"""Training throughput: ferry's loop against a bare minimal PyTorch loop, same model, same batches.

    python benchmarks/train_overhead.py                       # CPU, `small` preset, fp32
    python benchmarks/train_overhead.py --device cuda --preset base --precision bf16 --compile

Both loops train the same architecture on the same batches of the date task (or, with
`--sequence-length N`, of a synthetic digit-reversal task with N-token sources and targets). The
bare loop gets the batches pre-collated, so ferry's per-step data handling counts as its overhead.
Tokens/s counts padded source + target tokens; each figure is the median over 10-step windows
after the first `--warmup` steps.
Prints a table, or with --json one JSON object; MFU appears where the device's peak is known (or
given with --peak-tflops).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ferry.model import Transformer, preset
from ferry.train import train
from ferry.train.config import train_config_from_dict
from ferry.train.data import global_batch_indices
from ferry.train.datasets.dates import write_date_task, write_jsonl
from ferry.train.flops import peak_flops, training_flops
from ferry.train.loop import parameter_groups
from ferry.train.objectives import Seq2SeqObjective
from ferry.train.tokenizer import special_token_ids


def bare_loop(model: Transformer, batches: list[dict], *, device: torch.device, precision: str,
              warmup: int, window: int, lr: float, compile_model: bool
              ) -> tuple[list[float], list[float]]:
    """The minimal loop: forward, mean loss, backward, clip, AdamW step.

    Returns tokens/s and FLOP/s of each `window` consecutive steps after the warm-up.
    """
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=lr, betas=(0.9, 0.98))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    runner = torch.compile(model) if compile_model else model
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    tokens_per_s, flops_per_s = [], []
    tokens = flops = 0.0
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if i >= warmup and (i - warmup) % window == 0:
            _sync(device)
            if i > warmup:
                elapsed = time.perf_counter() - start
                tokens_per_s.append(tokens / elapsed)
                flops_per_s.append(flops / elapsed)
            start, tokens, flops = time.perf_counter(), 0.0, 0.0
        with (contextlib.nullcontext() if dtype is None
              else torch.autocast(device.type, dtype=dtype)):
            logits = runner(batch["input_ids"], batch["attention_mask"],
                            batch["decoder_input_ids"])
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1),
                ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        src, tgt = batch["input_ids"], batch["decoder_input_ids"]
        tokens += src.numel() + tgt.numel()
        flops += training_flops(model, source_tokens=src.numel(), target_tokens=tgt.numel(),
                                source_len=src.shape[1], target_len=tgt.shape[1])
    _sync(device)
    if (len(batches) - warmup) % window == 0:
        elapsed = time.perf_counter() - start
        tokens_per_s.append(tokens / elapsed)
        flops_per_s.append(flops / elapsed)
    return tokens_per_s, flops_per_s


def write_reversal_task(directory: Path, *, length: int, num_train: int) -> None:
    """Pairs of `length` random digits and the same digits reversed (one token per digit)."""
    rng = random.Random(0)

    def rows(count: int) -> list[dict]:
        digits = ["".join(rng.choices("0123456789", k=length)) for _ in range(count)]
        return [{"source": d, "target": d[::-1]} for d in digits]

    write_jsonl(directory / "train.jsonl", rows(num_train))
    write_jsonl(directory / "eval.jsonl", rows(64))


def ferry_config(args: argparse.Namespace, data: Path, out_dir: Path, window: int) -> dict:
    """The training config of ferry's side: eval and checkpoint only after the last step."""
    longest = max(128, args.sequence_length + 1)
    return {
        "objective": "seq2seq", "out_dir": str(out_dir), "seed": 0, "device": args.device,
        "precision": args.precision, "compile": args.compile,
        "model": {"preset": args.preset, "overrides": {"dropout": 0.0}},
        "tokenizer": {"vocab_size": 600, "num_sentinels": 16},
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                 "max_source_len": longest, "max_target_len": longest},
        "optim": {"lr": 5e-4, "warmup_steps": 10, "max_steps": args.steps,
                  "batch_size": args.batch_size, "schedule": "constant"},
        "eval": {"every": args.steps, "max_examples": 64},
        "log": {"every": window, "peak_tflops": args.peak_tflops},
    }


def collated_batches(config, run_dir: Path, data: Path, args: argparse.Namespace
                     ) -> tuple[list[dict], int]:
    """Every step's batch as ferry's loop builds it, with the run's own tokenizer; and the
    vocabulary size."""
    tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
    objective = Seq2SeqObjective(config, tokenizer, special_token_ids(tokenizer))
    examples = objective.load(str(data / "train.jsonl"))
    batches = [objective.collate([examples[i] for i in global_batch_indices(
        step, num_examples=len(examples), batch_size=args.batch_size, seed=0)])
        for step in range(1, args.steps + 1)]
    return batches, tokenizer.get_vocab_size()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps, a multiple of 10")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--sequence-length", type=int, default=0,
                        help="Use N-digit reversal pairs instead of dates (longer sequences).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="ferry/bare pairs, alternating order; the median ratio is reported")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    window = 10  # steps per throughput sample; medians over samples resist machine noise
    if args.warmup % window or (args.steps - args.warmup) < 2 * window:
        parser.error(f"--warmup must be a multiple of {window} and leave ≥ {2 * window} steps")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        num_train = max(20000, args.batch_size * args.steps)
        if args.sequence_length:
            write_reversal_task(data, length=args.sequence_length, num_train=num_train)
        else:
            write_date_task(data, num_train=num_train, num_eval=64)
        ratios, ferry_tps, bare_tps, ferry_mfu, bare_flops = [], [], [], [], []
        batches: list[dict] = []
        vocab_size = 0
        for repeat in range(args.repeats):
            # Alternate which loop runs first: slow drifts of a shared machine cancel out.
            order = ("ferry", "bare") if repeat % 2 == 0 else ("bare", "ferry")
            measured = {}
            for which in order:
                if which == "ferry":
                    config = train_config_from_dict(
                        ferry_config(args, data, Path(tmp) / f"run-{repeat}", window))
                    result = train(config, progress=False, log=lambda message: None)
                    windows = [r for r in result.history if "tokens_per_s" in r
                               and args.warmup < r["step"] and r["step"] % window == 0]
                    measured["ferry"] = statistics.median(r["tokens_per_s"] for r in windows)
                    ferry_mfu += [r["mfu"] for r in windows if "mfu" in r]
                    if not batches:  # the same batches for the bare loop, collated up front
                        batches, vocab_size = collated_batches(config, result.run_dir, data,
                                                               args)
                else:
                    torch.manual_seed(0)  # repeat 0 runs ferry first, so batches exist here
                    model = Transformer(preset(args.preset, dropout=0.0,
                                               vocab_size=vocab_size)).to(device)
                    samples, flop_samples = bare_loop(
                        model.train(), batches, device=device, precision=args.precision,
                        warmup=args.warmup, window=window, lr=5e-4, compile_model=args.compile)
                    measured["bare"] = statistics.median(samples)
                    bare_flops.append(statistics.median(flop_samples))
            ferry_tps.append(measured["ferry"])
            bare_tps.append(measured["bare"])
            ratios.append(measured["ferry"] / measured["bare"])
        ferry_tokens_per_s = statistics.median(ferry_tps)
        bare_tokens_per_s = statistics.median(bare_tps)

    peak = peak_flops(device, args.precision, args.peak_tflops)
    ratio = statistics.median(ratios)
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} threads"
                   + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__, "device": args.device, "preset": args.preset,
        "precision": args.precision, "compile": args.compile, "batch_size": args.batch_size,
        "timed_steps": args.steps - args.warmup,
        "ferry_tokens_per_s": ferry_tokens_per_s, "bare_tokens_per_s": bare_tokens_per_s,
        "ferry_over_bare": ratio, "overhead_percent": 100 * (1 - ratio),
        "repeats": args.repeats, "ratio_per_repeat": ratios,
    }
    if peak:
        report["ferry_mfu"] = statistics.median(ferry_mfu) if ferry_mfu else None
        report["bare_mfu"] = statistics.median(bare_flops) / peak
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"training throughput, {report['machine']}, torch {torch.__version__}")
        print(f"  {args.preset} preset, {args.precision}, compile={args.compile}, "
              f"batch {args.batch_size}, {report['timed_steps']} timed steps")
        print(f"  {'loop':<8} {'tokens/s':>12} {'MFU':>8}")
        for name, tps, mfu in (("ferry", ferry_tokens_per_s, report.get("ferry_mfu")),
                               ("bare", bare_tokens_per_s, report.get("bare_mfu"))):
            print(f"  {name:<8} {tps:>12,.0f} {f'{100 * mfu:.1f}%' if mfu else '—':>8}")
        print(f"  ferry / bare = {ratio:.3f}  (overhead {report['overhead_percent']:.1f}%; median "
              f"of {args.repeats} alternating pairs: {', '.join(f'{r:.3f}' for r in ratios)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
