"""Decoder-only LLM generation speed on a CPU: ferry's ONNX Runtime variants against llama.cpp
and transformers, on the same weights, in one run, as ratios, with the memory-bandwidth floor.

One random-weight Hugging Face Qwen2 model (`--shape qwen2.5-0.5b`: Qwen2.5-0.5B's shape —
d_model 896, 24 layers, 14 query heads over 2 key/value heads, FFN 4864, vocabulary 151936, tied
embeddings, 494 M parameters; `--shape tiny` for a smoke run) and a small byte-level BPE
tokenizer are saved once; every engine runs that model:

- ferry imports it (`ferry import hf`) and exports its bundle: the portable fp32 graphs, the
  fused ones (the CPU default), dynamic int8 and weight-only int4 (`MatMulNBits`), on ONNX
  Runtime;
- llama.cpp (optional: `pip install llama-cpp-python`, built from source with the CPU's own
  instructions) converts the same directory with its `convert_hf_to_gguf.py` (give its
  llama.cpp checkout with `--llama-cpp DIR`) to Q8_0, and quantises that to Q4_0;
- transformers eager `generate` (fp32).

A 128-token prompt (random ids, the same for every engine), 128 forced new tokens, greedy,
batch 1 and 8 (llama.cpp at batch 1: its Python API decodes one sequence). Engines are timed in
alternating rounds (medians). Decode speed excludes the prompt: a generate of one token (the
prefill) is timed too and subtracted. The floor: bytes of weights read per decoded token (each
graph's initializers, the embedding table read one row at a time excluded) ÷ the machine's
measured read bandwidth (numpy reductions over 1 GiB on as many threads as the engines use).

    python benchmarks/llm_generation.py [--shape qwen2.5-0.5b|tiny] [--threads 2] [--runs 3]
                                        [--batches 1,8] [--llama-cpp DIR] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import torch

from ferry.export import export_bundle
from ferry.runtime import Bundle, load
from ferry.runtime.benchmark import machine_description
from ferry.train.hf_import import import_hf

PROMPT_LEN, NEW_TOKENS = 128, 128
OURS = ("fp32", "fused", "int8", "int4")
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-6),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=256, vocab_size=1024,
                 max_position_embeddings=1024, tie_word_embeddings=True),
}
FIRST_WORD, LAST_WORD = 3, 290  # ids of ordinary tokens in the 300-token tokenizer


def hf_model_dir(workdir: Path, shape: str) -> Path:
    """The one model every engine runs: a random-weight Qwen2 of `shape` with a byte-level BPE
    tokenizer of 300 tokens. Weights N(0, 0.02²) as its initialiser draws them, but the (tied)
    embeddings N(0, 1): the token's own embedding then dominates the residual stream, so the
    greedy decisions are far from ties and every quantised variant meets its agreement gate
    (with flat random logits int8 and int4 flip tokens, and the export refuses them). The
    speed of a decode step does not depend on the values."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ferry.train.datasets.text_corpus import docstring_paragraphs

    path = workdir / f"qwen2-{shape}"
    if path.exists():
        return path
    config = Qwen2Config(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # embeddings of norm ≫ the layers' outputs: greedy decisions that
        model.model.embed_tokens.weight.normal_(0.0, 1.0)  # quantisation does not flip
    model.save_pretrained(path)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(docstring_paragraphs()[:400], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", pad_token="</s>").save_pretrained(path)
    return path


def prompts(batch: int) -> np.ndarray:
    """(batch, PROMPT_LEN) random ordinary-token ids, the same for every engine."""
    rng = np.random.default_rng(0)
    return rng.integers(FIRST_WORD, LAST_WORD, (batch, PROMPT_LEN)).astype(np.int64)


# An engine: (batch, new tokens) → a call generating that many tokens for `prompts(batch)`.
Engine = Callable[[int, int], Callable[[], None]]


def ferry_engine(bundle: Path, precision: str, threads: int) -> Engine:
    model = load(bundle, intra_op_threads=threads, precision=precision).as_generator()

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        ids = prompts(batch)
        mask = np.ones_like(ids)

        def generate():
            out = model.generate_ids(ids, mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens)
            assert out.shape == (batch, new_tokens), out.shape

        return generate

    return make


def transformers_engine(model_dir: Path, threads: int) -> Engine:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        ids = torch.from_numpy(prompts(batch))

        def generate():
            with torch.inference_mode():
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               pad_token_id=2)

        return generate

    return make


def gguf_files(model_dir: Path, checkout: Path) -> dict[str, Path]:
    """The model as llama.cpp's Q8_0 (its converter) and Q4_0 (quantised from Q8_0's source
    precision, f32). The converter's BPE pre-tokenizer check is told this tokenizer is Qwen2's
    (the benchmark feeds ids, never text)."""
    import llama_cpp

    out = {kind: model_dir.parent / f"{model_dir.name}.{kind.lower()}.gguf"
           for kind in ("Q8_0", "F32", "Q4_0")}
    wrapper = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
        "import conversion.base as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "import convert_hf_to_gguf\n"
        "sys.argv = ['convert', *sys.argv[2:]]\n"
        "convert_hf_to_gguf.main()\n")
    for kind in ("Q8_0", "F32"):
        if not out[kind].exists():
            subprocess.run([sys.executable, "-c", wrapper, str(checkout), str(model_dir),
                            "--outtype", kind.lower(), "--outfile", str(out[kind])],
                           check=True, capture_output=True)
    if not out["Q4_0"].exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        code = llama_cpp.llama_model_quantize(str(out["F32"]).encode(),
                                              str(out["Q4_0"]).encode(), params)
        if code != 0:
            raise RuntimeError(f"llama_model_quantize failed ({code})")
    return out


def llama_cpp_engine(path: Path, threads: int) -> Engine:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), n_ctx=PROMPT_LEN + NEW_TOKENS + 8, n_batch=PROMPT_LEN,
                  n_threads=threads, n_threads_batch=threads, verbose=False)

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        if batch != 1:
            raise NotImplementedError("llama-cpp-python decodes one sequence at a time")
        tokens = prompts(1)[0].tolist()

        def generate():
            for count, _ in enumerate(model.generate(tokens, top_k=1, temp=0.0, reset=True),
                                      start=1):
                if count == new_tokens:  # forced length: end-of-text does not stop it
                    break

        return generate

    return make


def read_bandwidth(threads: int, size: int = 1 << 30) -> float:
    """Bytes/s read by `threads` numpy reductions over one `size`-byte array (best of 5)."""
    data = np.ones(size // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, parts))
            best = min(best, time.perf_counter() - start)
    return size / best


def weight_bytes_per_token(graph: Path) -> int:
    """Bytes of initializers a decode step reads: all but tables only gathered from (the
    embedding: one row per token)."""
    model = onnx.load(str(graph), load_external_data=False)
    users: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, set()).add(node.op_type)
    total = 0
    for tensor in model.graph.initializer:
        if users.get(tensor.name) == {"Gather"}:
            continue
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        total += size * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def timed(call: Callable[[], None]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(engines: dict[str, Engine], batch: int, runs: int) -> dict[str, dict]:
    """Per engine: generate tok/s (prompt + 128 tokens) and decode tok/s (the prefill's time
    subtracted), medians of `runs` alternating rounds after one warm-up each."""
    calls, results = {}, {}
    for name, engine in engines.items():
        try:
            calls[name] = engine(batch, NEW_TOKENS), engine(batch, 1)
        except NotImplementedError as exc:
            results[name] = f"— ({exc})"
            continue
        for call in calls[name]:
            call()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for round_ in range(runs):
        for name, (full, prefill) in calls.items():
            times[name].append((timed(full), timed(prefill)))
        print(f"batch {batch}: round {round_ + 1}/{runs}", file=sys.stderr)
    for name, pairs in times.items():
        full = statistics.median(t for t, _ in pairs)
        prefill = statistics.median(p for _, p in pairs)
        results[name] = {"generate_tok_s": batch * NEW_TOKENS / full,
                         "decode_tok_s": batch * (NEW_TOKENS - 1) / max(full - prefill, 1e-9),
                         "prefill_s": prefill}
    return {name: results[name] for name in engines if name in results}


def same_tokens_as_transformers(bundle: Path, model_dir: Path) -> str:
    """Whether ferry's fp32 graphs continue 4 prompts greedily (16 tokens) as transformers does."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = prompts(4)[:, :32]
    with torch.inference_mode():
        expected = reference.generate(torch.from_numpy(ids), max_new_tokens=16, do_sample=False,
                                      attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                      pad_token_id=2)[:, ids.shape[1]:].numpy()
    ours = load(bundle, precision="fp32").as_generator().generate_ids(ids, max_new_tokens=16)
    same = sum(e[e != 2].tolist() == o[o != 2].tolist() for e, o in zip(expected, ours))
    return f"{same}/4 prompts"


def format_table(results: dict[str, dict], batches: list[int], floors: dict[str, float]) -> str:
    head = "".join(f"{f'b{b} gen tok/s':>14}{f'b{b} decode':>12}" for b in batches)
    lines = [f"machine: {machine_description()}", f"{'engine':<24}{head}{'floor b1':>10}"
             f"{'of floor':>10}"]
    for name, row in results.items():
        cells = ""
        for b in batches:
            cell = row.get(b)
            cells += (f"{cell['generate_tok_s']:>14.1f}{cell['decode_tok_s']:>12.1f}"
                      if isinstance(cell, dict) else f"{'—':>14}{'—':>12}")
        floor = floors.get(name)
        share = (f"{row[1]['decode_tok_s'] / floor:>10.0%}"
                 if floor and isinstance(row.get(1), dict) else f"{'':>10}")
        lines.append(f"{name:<24}{cells}" + (f"{floor:>10.1f}" if floor else f"{'':>10}")
                     + share)
    for ours, peer in (("ferry int8", "llama.cpp Q8_0"), ("ferry int4", "llama.cpp Q4_0"),
                       ("ferry fp32", "transformers eager"), ("ferry int4", "transformers eager"),
                       ("ferry int8", "transformers eager")):
        if ours in results and peer in results:
            cells = ""
            for b in batches:
                a, p = results[ours].get(b), results[peer].get(b)
                cells += (f"{a['generate_tok_s'] / p['generate_tok_s']:>13.2f}x"
                          f"{a['decode_tok_s'] / p['decode_tok_s']:>11.2f}x"
                          if isinstance(a, dict) and isinstance(p, dict) else f"{'—':>14}{'—':>12}")
            lines.append(f"{ours.split()[-1]} / {peer:<17}{cells}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="a llama.cpp checkout (its convert_hf_to_gguf.py), for the llama.cpp "
                             "engines")
    parser.add_argument("--variants", default=",".join(OURS),
                        help="ferry's variants to export and time (fp32 is always exported)")
    parser.add_argument("--engines", default="",
                        help="comma-separated substrings: time only the engines named so")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model, bundle and GGUF files here (reused when present)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    ours = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"saving a random-weight {args.shape} Qwen2, importing and exporting it "
              f"({', '.join(ours)}) …", file=sys.stderr)
        model_dir = hf_model_dir(workdir, args.shape)
        bundle = workdir / "bundle"
        if not bundle.exists():
            export_bundle(import_hf(model_dir, workdir / "imported", log=lambda m: None), bundle,
                          precisions=tuple(dict.fromkeys(("fp32", *ours))),
                          log=lambda m: print(m, file=sys.stderr))
        agreement = same_tokens_as_transformers(bundle, model_dir)
        print(f"greedy tokens identical to transformers on {agreement}", file=sys.stderr)
        opened = Bundle.open(bundle)
        floors_bytes = {f"ferry {p}": weight_bytes_per_token(bundle / (
            opened.manifest.variants[p].graphs["decoder_step"] if p != "fp32"
            else opened.manifest.roles["decoder_step"])) for p in ours}
        engines: dict[str, Engine] = {f"ferry {p}": ferry_engine(bundle, p, args.threads)
                                      for p in ours}
        engines["transformers eager"] = transformers_engine(model_dir, args.threads)
        if args.llama_cpp is not None:
            for kind, path in gguf_files(model_dir, args.llama_cpp).items():
                if kind != "F32":
                    engines[f"llama.cpp {kind}"] = llama_cpp_engine(path, args.threads)
                    floors_bytes[f"llama.cpp {kind}"] = path.stat().st_size
        wanted = [w.strip() for w in args.engines.split(",") if w.strip()]
        engines = {n: e for n, e in engines.items() if not wanted or any(w in n for w in wanted)}
        bandwidth = read_bandwidth(args.threads)
        floors = {name: bandwidth / size for name, size in floors_bytes.items()}
        results: dict[str, dict] = {}
        for batch in batches:
            for name, value in measure(engines, batch, args.runs).items():
                results.setdefault(name, {})[batch] = value
    print(f"shape {args.shape}, prompt {PROMPT_LEN}, {NEW_TOKENS} forced new tokens, greedy, "
          f"{args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; greedy tokens "
          f"identical to transformers on {agreement}")
    print(format_table(results, batches, floors))
    if args.out:
        args.out.write_text(json.dumps({
            "machine": machine_description(), "shape": args.shape, "threads": args.threads,
            "bandwidth_bytes_s": bandwidth, "weight_bytes_per_token": floors_bytes,
            "same_tokens": agreement, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
