"""Decoder-only LLM generation speed on a CPU: ferry's ONNX Runtime variants against llama.cpp,
ONNX Runtime GenAI, Optimum, CTranslate2 and transformers, on the same weights, in one run, as
ratios, with the memory-bandwidth floor.

One random-weight Hugging Face Qwen2 model (`--shape qwen2.5-0.5b`: Qwen2.5-0.5B's shape —
d_model 896, 24 layers, 14 query heads over 2 key/value heads, FFN 4864, vocabulary 151936, tied
embeddings, 494 M parameters; `--shape tiny` for a smoke run) and a small byte-level BPE
tokenizer are saved once; every engine runs that model:

- ferry imports it (`ferry import hf`) and exports its bundle: the portable fp32 graphs, the
  fused ones (the CPU default), dynamic int8 and weight-only int4 (`MatMulNBits`), on ONNX
  Runtime;
- the peers, each where installed (one that is not is reported as skipped):
  - transformers eager `generate` (fp32);
  - Optimum's ONNX Runtime model (`ORTModelForCausalLM`, its own fp32 export, with cache);
  - ONNX Runtime GenAI (`pip install onnxruntime-genai`): its model builder's fp32 and int4
    (`MatMulNBits`, accuracy level 4: int8 activations, as ferry's int4) CPU models. The
    builder imports the newest transformers, which Optimum refuses: give a Python that has
    onnxruntime-genai and that transformers with `--genai-builder-python`;
  - CTranslate2 (`pip install ctranslate2`): fp32 and int8;
  - llama.cpp (`pip install llama-cpp-python`, built from source with the CPU's own
    instructions): F32 and Q8_0 written by its `convert_hf_to_gguf.py` (give a llama.cpp
    checkout with `--llama-cpp DIR`, e.g. the `vendor/llama.cpp` of llama-cpp-python's source
    archive; the converter needs `pip install gguf mistral-common`) and Q4_0 quantised from
    F32.

A 128-token prompt (random ids, the same for every engine), 128 forced new tokens, greedy,
batch 1 and 8 (llama.cpp: one context of 8 sequences, through its C API). Engines are timed in
alternating rounds (medians), each in a process of its own (`ferry.runtime.isolated_engine`:
engines sharing a process slow each other, llama.cpp most; `--one-process` shows how much).
Decode speed excludes the prompt: a generate of one token (the prefill, reported as the time to
first token, TTFT) is timed too and subtracted. The floor: bytes of weights read per decoded
token (each graph's initializers, the embedding table read one row at a time excluded) ÷ the
machine's measured read bandwidth (numpy reductions over 1 GiB on as many threads as the
engines use).

    python benchmarks/llm_generation.py [--shape qwen2.5-0.5b|tiny] [--threads 2] [--runs 3]
                                        [--batches 1,8] [--llama-cpp DIR] [--workdir DIR]
                                        [--genai-builder-python PYTHON] [--engines a,b]
                                        [--out results.json] [--plot chart.png]
    python benchmarks/llm_generation.py --from-json results.json [--plot chart.png]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch

from ferry.export import export_bundle
from ferry.runtime import Bundle, load
from ferry.runtime.benchmark import QUIET_BELOW, machine_description, wait_until_quiet
from ferry.runtime.isolated_engine import close_engines, start_engine
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


def run_tool(command: list[str]) -> None:
    """Run a peer's converter; on failure, raise with the end of what it printed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def optimum_engine(model_dir: Path, threads: int) -> Engine:
    """Optimum's `ORTModelForCausalLM` on its own fp32 ONNX export (with cache), kept beside
    the model directory."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    exported = model_dir.with_name(f"{model_dir.name}-optimum")
    if not exported.exists():
        ORTModelForCausalLM.from_pretrained(model_dir, export=True,
                                            use_cache=True).save_pretrained(exported)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(exported, session_options=options)

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        ids = torch.from_numpy(prompts(batch))

        def generate():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=2)

        return generate

    return make


def genai_engine(model_dir: Path, precision: str, threads: int, builder_python: str) -> Engine:
    """ONNX Runtime GenAI on the CPU model its builder writes from the directory (`fp32`, or
    `int4`: MatMulNBits, accuracy level 4 — int8 activations, as ferry's int4), the builder run
    by `builder_python` (its releases import the newest transformers' model classes)."""
    import onnxruntime_genai as og

    built = model_dir.with_name(f"{model_dir.name}-genai-{precision}")
    if not built.exists():
        run_tool([builder_python, "-m", "onnxruntime_genai.models.builder",
                  "-i", str(model_dir), "-o", str(built), "-p", precision, "-e", "cpu",
                  "-c", str(built.with_name(built.name + "-cache")),
                  "--extra_options", "int4_accuracy_level=4"])
    config = json.loads((built / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=threads)
    (built / "genai_config.json").write_text(json.dumps(config, indent=4))
    model = og.Model(str(built))

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        ids = prompts(batch)

        def generate():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=PROMPT_LEN + new_tokens,
                                      min_length=PROMPT_LEN + new_tokens, do_sample=False,
                                      batch_size=batch)
            generator = og.Generator(model, params)
            generator.append_tokens(ids)
            steps = 1  # appending the prompt computes the first new token
            while not generator.is_done():
                generator.generate_next_token()
                steps += 1
            assert steps >= new_tokens, steps

        return generate

    return make


def ctranslate2_engine(model_dir: Path, quantization: str, threads: int) -> Engine:
    """CTranslate2's `Generator` on its conversion of the directory (`float32` or `int8`)."""
    import ctranslate2 as ct2
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    target = model_dir.with_name(f"{model_dir.name}-ct2-{quantization}")
    if not target.exists():
        TransformersConverter(str(model_dir)).convert(str(target), quantization=quantization)
    generator = ct2.Generator(str(target), device="cpu", intra_threads=threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in prompts(batch)]

        def generate():
            results = generator.generate_batch(tokens, max_length=new_tokens,
                                               min_length=new_tokens, sampling_topk=1,
                                               include_prompt_in_result=False)
            assert all(len(r.sequences_ids[0]) == new_tokens for r in results), \
                [len(r.sequences_ids[0]) for r in results]

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
        "try:\n"
        "    import conversion.base as base\n"
        "except ImportError:  # checkouts before the converter became a package\n"
        "    import convert_hf_to_gguf as base\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2'\n"
        "import convert_hf_to_gguf\n"
        "sys.argv = ['convert', *sys.argv[2:]]\n"
        "convert_hf_to_gguf.main()\n")
    for kind in ("Q8_0", "F32"):
        if not out[kind].exists():
            run_tool([sys.executable, "-c", wrapper, str(checkout), str(model_dir),
                      "--outtype", kind.lower(), "--outfile", str(out[kind])])
    if not out["Q4_0"].exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        code = llama_cpp.llama_model_quantize(str(out["F32"]).encode(),
                                              str(out["Q4_0"]).encode(), params)
        if code != 0:
            raise RuntimeError(f"llama_model_quantize failed ({code})")
    return out


@functools.cache
def QUIET_LLAMA_CPP(lc):  # noqa: N802 — one callback for the process's life, dropping its logs
    return lc.llama_log_callback(lambda level, text, user_data: None)


def llama_cpp_engine(path: Path, threads: int) -> Engine:
    """llama.cpp through llama-cpp-python's C API: a context of `batch` sequences, the prompts
    prefilled in one `llama_decode`, then one decode per step taking each sequence's argmax."""
    import llama_cpp as lc

    lc.llama_log_set(QUIET_LLAMA_CPP(lc), None)
    lc.llama_backend_init()
    model = lc.llama_model_load_from_file(str(path).encode(), lc.llama_model_default_params())
    vocab_size = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))

    def make(batch: int, new_tokens: int) -> Callable[[], None]:
        params = lc.llama_context_default_params()
        params.n_ctx = batch * (PROMPT_LEN + NEW_TOKENS + 8)
        params.n_batch = max(batch * PROMPT_LEN, 512)
        params.n_ubatch = 512
        params.n_seq_max = batch
        params.n_threads = params.n_threads_batch = threads
        context = lc.llama_init_from_model(model, params)
        tokens = lc.llama_batch_init(params.n_batch, 0, 1)
        ids = prompts(batch)

        def decode(entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
            """Decode (token, position, sequence, wants logits) entries; (rows, vocab) logits
            of the entries that want them, in order."""
            for i, (token, position, sequence, wanted) in enumerate(entries):
                tokens.token[i], tokens.pos[i] = token, position
                tokens.n_seq_id[i], tokens.seq_id[i][0] = 1, sequence
                tokens.logits[i] = wanted
            tokens.n_tokens = len(entries)
            if lc.llama_decode(context, tokens) != 0:
                raise RuntimeError("llama_decode failed")
            return np.stack([np.ctypeslib.as_array(lc.llama_get_logits_ith(context, i),
                                                   shape=(vocab_size,))
                             for i, entry in enumerate(entries) if entry[3]])

        def generate():
            lc.llama_memory_clear(lc.llama_get_memory(context), True)
            logits = decode([(int(token), position, row, position == PROMPT_LEN - 1)
                             for row in range(batch)
                             for position, token in enumerate(ids[row])])
            for step in range(1, new_tokens):
                chosen = logits.argmax(axis=1)  # (batch,)
                logits = decode([(int(chosen[row]), PROMPT_LEN + step - 1, row, True)
                                 for row in range(batch)])

        return generate

    return make


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


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


# Per precision: ferry's engines and the peers running the weights at that precision; the table's
# ratio rows divide the fastest of each (by decode tok/s) at every batch.
SAME_PRECISION = {
    "fp32": (("ferry fp32", "ferry fused"),
             ("transformers eager", "optimum onnxruntime", "genai fp32", "ctranslate2 fp32",
              "llama.cpp F32")),
    "int8": (("ferry int8",), ("ctranslate2 int8", "llama.cpp Q8_0")),
    "int4": (("ferry int4",), ("genai int4", "llama.cpp Q4_0")),
}


def best_of(results: dict[str, dict], names: tuple[str, ...], batch: int
            ) -> tuple[str, dict] | None:
    """The engine among `names` with the highest decode tok/s at `batch`, and its cell."""
    cells = [(name, results[name][batch]) for name in names
             if isinstance(results.get(name, {}).get(batch), dict)]
    return max(cells, key=lambda cell: cell[1]["decode_tok_s"], default=None)


def format_table(results: dict[str, dict], batches: list[int], floors: dict[str, float],
                 machine: str) -> str:
    """Per engine and batch: generate and decode tok/s, time to first token (the prefill); the
    batch-1 floor and its share; then the ratio rows of `SAME_PRECISION`."""
    head = "".join(f"{f'b{b} gen tok/s':>14}{f'b{b} decode':>12}{f'b{b} TTFT ms':>12}"
                   for b in batches)
    lines = [f"machine: {machine}", f"{'engine':<24}{head}{'floor b1':>10}{'of floor':>10}"]
    for name, row in results.items():
        cells = ""
        for b in batches:
            cell = row.get(b)
            cells += (f"{cell['generate_tok_s']:>14.1f}{cell['decode_tok_s']:>12.1f}"
                      f"{cell['prefill_s'] * 1e3:>12.0f}"
                      if isinstance(cell, dict) else f"{'—':>14}{'—':>12}{'—':>12}")
        floor = floors.get(name)
        share = (f"{row[1]['decode_tok_s'] / floor:>10.0%}"
                 if floor and isinstance(row.get(1), dict) else f"{'':>10}")
        lines.append(f"{name:<24}{cells}" + (f"{floor:>10.1f}" if floor else f"{'':>10}")
                     + share)
    for precision, (ours, peers) in SAME_PRECISION.items():
        cells, best_peers = "", []
        for b in batches:
            best_ours, best_peer = best_of(results, ours, b), best_of(results, peers, b)
            if best_ours is None or best_peer is None:
                cells += f"{'—':>14}{'—':>12}{'—':>12}"
                continue
            (_, a), (peer, p) = best_ours, best_peer
            cells += (f"{a['generate_tok_s'] / p['generate_tok_s']:>13.2f}x"
                      f"{a['decode_tok_s'] / p['decode_tok_s']:>11.2f}x"
                      f"{p['prefill_s'] / a['prefill_s']:>11.2f}x")
            best_peers.append(f"b{b}: {peer}")
        if best_peers:
            lines.append(f"{precision + ' ferry / best peer':<24}{cells}   "
                         f"({', '.join(best_peers)})")
    return "\n".join(lines)


def plot(results: dict[str, dict], batches: list[int], floors: dict[str, float], path: Path,
         machine: str) -> Path:
    """A PNG: decode tok/s of every engine, one panel per batch (ferry's bars dark, the peers'
    light), each engine's batch-1 floor a tick."""
    from ferry.runtime.charts import pyplot, saved

    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 0.35 * len(names) + 1.4),
                             dpi=110, sharey=True, squeeze=False)
    for ax, batch in zip(axes[0], batches):
        speeds = [cell["decode_tok_s"] if isinstance(cell := results[n].get(batch), dict) else 0
                  for n in names]
        ax.barh(names, speeds, color=["#1f4e79" if n.startswith("ferry") else "#9dc3e6"
                                      for n in names])
        if batch == 1:
            for row, name in enumerate(names):
                if name in floors:
                    ax.plot([floors[name]] * 2, [row - 0.4, row + 0.4], color="black", lw=1)
        ax.set_title(f"batch {batch}" + (" (| = bandwidth floor)" if batch == 1 else ""))
        ax.set_xlabel("decode tokens/s")
    axes[0][0].invert_yaxis()  # the table's order, top down (the panels share the axis)
    return saved(plt, fig, path, machine)


def report_of(results: dict[str, dict], batches: list[int], floors: dict[str, float],
              machine: str, plot_path: Path | None) -> str:
    """The table, and the chart when asked for."""
    if plot_path is not None:
        print(f"chart: {plot(results, batches, floors, plot_path, machine)}", file=sys.stderr)
    return format_table(results, batches, floors, machine)


def replay(path: Path, plot_path: Path | None) -> int:
    """Print the table (and draw the chart) of an earlier run's `--out` file."""
    report = json.loads(path.read_text())
    results = {name: {int(b): cell for b, cell in row.items()}
               for name, row in report["results"].items()}
    batches = sorted({b for row in results.values() for b in row})
    floors = {name: report["bandwidth_bytes_s"] / size
              for name, size in report["weight_bytes_per_token"].items()}
    print(report_of(results, batches, floors, report["machine"], plot_path))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="a llama.cpp checkout (its convert_hf_to_gguf.py), for the llama.cpp "
                             "engines")
    parser.add_argument("--genai-builder-python", default=sys.executable,
                        help="a Python with onnxruntime-genai and a transformers recent enough "
                             "for its model builder (default: this one)")
    parser.add_argument("--variants", default=",".join(OURS),
                        help="ferry's variants to export and time (fp32 is always exported)")
    parser.add_argument("--engines", default="",
                        help="comma-separated substrings: time only the engines named so")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the model, bundle and GGUF files here (reused when present)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one-process", action="store_true",
                        help="load every engine in this process instead of one process each "
                             "(shows how much engines sharing a process slow each other)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw decode tok/s per engine and batch as a PNG")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="time nothing: print the table (and --plot) of an earlier --out")
    args = parser.parse_args()
    if args.from_json is not None:
        return replay(args.from_json, args.plot)
    machine = machine_description()  # the load average before this run adds to it
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
        factories: dict[str, Callable[[], Engine]] = {
            f"ferry {p}": partial(ferry_engine, bundle, p, args.threads) for p in ours}
        factories["transformers eager"] = partial(transformers_engine, model_dir, args.threads)
        factories["optimum onnxruntime"] = partial(optimum_engine, model_dir, args.threads)
        for precision in ("fp32", "int4"):
            factories[f"genai {precision}"] = partial(genai_engine, model_dir, precision,
                                                      args.threads, args.genai_builder_python)
        for quantization in ("float32", "int8"):
            factories[f"ctranslate2 {quantization.replace('float', 'fp')}"] = partial(
                ctranslate2_engine, model_dir, quantization, args.threads)
        if args.llama_cpp is not None and installed("llama_cpp"):
            for kind, path in gguf_files(model_dir, args.llama_cpp).items():
                factories[f"llama.cpp {kind}"] = partial(llama_cpp_engine, path, args.threads)
                floors_bytes[f"llama.cpp {kind}"] = path.stat().st_size
        for name, suffix in (("optimum onnxruntime", "optimum"), ("genai fp32", "genai-fp32"),
                             ("genai int4", "genai-int4")):
            path = model_dir.with_name(f"{model_dir.name}-{suffix}") / "model.onnx"
            if path.exists():  # exported by an earlier run: its floor is known before timing
                floors_bytes[name] = weight_bytes_per_token(path)
        wanted = [w.strip() for w in args.engines.split(",") if w.strip()]
        wait_until_quiet()  # the bandwidth of the quiet machine, before engines load (read
        bandwidth = read_bandwidth(args.threads)  # beside six loaded ones it once gave 14 of 28)
        engines: dict[str, Engine] = {}
        for name, factory in factories.items():
            if wanted and not any(w in name for w in wanted):
                continue
            busy = wait_until_quiet()
            print(f"loading {name} …" + (f" (the machine still busy: {busy:.1f} CPUs)"
                                         if busy >= QUIET_BELOW else ""), file=sys.stderr)
            try:
                engines[name] = start_engine(factory, isolated=not args.one_process,
                                             torch_threads=args.threads)
            except ImportError as exc:  # a peer that is not installed
                print(f"{name}: skipped ({exc})", file=sys.stderr)
        floors = {name: bandwidth / size for name, size in floors_bytes.items()}
        results: dict[str, dict] = {}
        for batch in batches:
            for name, value in measure(engines, batch, args.runs).items():
                results.setdefault(name, {})[batch] = value
        close_engines(engines.values())
    print(f"shape {args.shape}, prompt {PROMPT_LEN}, {NEW_TOKENS} forced new tokens, greedy, "
          f"{args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s; greedy tokens "
          f"identical to transformers on {agreement}")
    if args.out:  # first: a failing chart loses no measurement
        args.out.write_text(json.dumps({
            "machine": machine, "shape": args.shape, "threads": args.threads,
            "bandwidth_bytes_s": bandwidth, "weight_bytes_per_token": floors_bytes,
            "same_tokens": agreement, "results": results}, indent=2))
    print(report_of(results, batches, floors, machine, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
