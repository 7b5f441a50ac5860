"""`ferry serve` under load, on loopback: throughput, latency and time to first token at 1, 8, 32
and 128 concurrent clients, against the same bundle's offline `generate_ids` at the same batch
size and against one-request-at-a-time serving, in one run.

    python benchmarks/serve_load.py BUNDLE [--clients 1,8,32,128] [--requests 128]
        [--new-tokens 64] [--max-batch 32] [--max-wait-ms 5] [--threads 2] [--server-threads N]
        [--max-join-wait-ms 100] [--no-continuous] [--[no-]spinning] [--json out.json]
        [--plot chart.png]
    python benchmarks/serve_load.py --preset base …   # a random-weight bundle of that preset
    python benchmarks/serve_load.py --preset llama_small …   # decoder-only: continuous batching

The server is the real command (`ferry serve`, its own process); the clients are one asyncio
process (aiohttp) in this one, each sending its next request as soon as its previous one was
answered. Every request generates exactly `--new-tokens` tokens (min = max), so every engine
and level does the same work. Each level sends max(`--requests`, 8 × clients) requests (enough
batches for a steady state past the first batch's ramp); time to first token is measured with
streamed requests (`/generate/stream`) at the same concurrency, capped at the server's stream
slots. Offline: `generate_ids` on batches of min(clients,
max-batch) of the same inputs, in this process, on the same backend and threads, the
better of ONNX Runtime's threads spinning or sleeping between operators.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

from ferry.runtime import load
from ferry.runtime.benchmark import machine_description

REQUESTS_PER_CLIENT = 8  # each level sends at least this many requests per client

SENTENCES = ["March 5, 2021", "12/25/2003", "the 5th of May, 1999", "Feb 3, 2025",
             "31st of July, 2008", "Saturday, April 26, 1969", "Sunday, June 1, 2025",
             "October 12, 1492"]


def random_bundle(preset_name: str, workdir: Path) -> Path:
    """A random-weight model of `preset_name` (an encoder-decoder, or a decoder-only language
    model such as llama_small) with a small BPE tokenizer, exported with its fused graphs."""
    import torch

    from ferry.export import export_bundle
    from ferry.model import Transformer, preset
    from ferry.model.checkpoint import save_checkpoint
    from ferry.train.datasets.text_corpus import docstring_paragraphs
    from ferry.train.tokenizer import save_tokenizer, special_token_ids, train_tokenizer

    tokenizer = train_tokenizer(docstring_paragraphs(), vocab_size=4000, num_sentinels=8)
    torch.manual_seed(0)
    model = Transformer(preset(preset_name, vocab_size=tokenizer.get_vocab_size()))
    task = ({"kind": "causal_lm", "lm": True} if model.config.architecture == "decoder-only"
            else {"kind": "seq2seq", "lm": False})
    checkpoint = save_checkpoint(model, workdir / "checkpoint", {
        "special_ids": special_token_ids(tokenizer), "task": task})
    save_tokenizer(tokenizer, checkpoint / "tokenizer.json")
    print(f"exporting a random-weight {preset_name} bundle …", file=sys.stderr)
    return export_bundle(checkpoint, workdir / "bundle", precisions=("fp32", "fused"),
                         log=lambda message: None)


@contextlib.contextmanager
def served(bundle: Path, args) -> str:
    """`ferry serve` on a free loopback port, ready; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "ferry", "serve", str(bundle), "--port", str(port),
               "--backend", args.backend, "--threads", str(args.server_threads or args.threads),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(max(args.clients) * 4), "--max-streams",
               str(max(args.clients)), "--max-new-tokens", str(args.new_tokens),
               "--timeout-s", "600", "--max-join-wait-ms", str(args.max_join_wait_ms),
               "--continuous" if args.continuous else "--no-continuous",
               *({True: ["--spinning"], False: ["--no-spinning"]}.get(args.spinning, []))]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=1):
                    break
            except OSError:  # not listening yet, or 503 while warming up
                pass
            if server.poll() is not None:
                raise SystemExit(f"ferry serve exited: {server.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise SystemExit("ferry serve did not become ready in 300 s")
            time.sleep(0.2)
        yield base
    finally:
        server.terminate()
        server.wait(60)


def inputs(count: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} ({i})" for i in range(count)]


async def level(base: str, clients: int, requests: int, new_tokens: int) -> dict:
    """`requests` /generate calls from `clients` concurrent clients: wall time and latencies;
    then `clients` streamed calls at once: time to the first piece. The clients are aiohttp's
    (a C HTTP parser): on a 2-core machine the load generator shares the CPU with the server,
    and a pure-Python client would cost it as much as a small model does."""
    parameters = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    texts = inputs(requests)
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:
        queue = list(reversed(texts))

        async def worker() -> None:
            while queue:
                text = queue.pop()
                started = time.perf_counter()
                async with client.post("/generate", json={"inputs": text,
                                                          "parameters": parameters}) as answer:
                    answer.raise_for_status()
                    await answer.read()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started

    # fresh connections: the server may have closed the idle ones meanwhile
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as client:
        async def first_piece(text: str) -> float:
            begun = time.perf_counter()
            async with client.post("/generate/stream", json={
                    "inputs": text, "parameters": parameters}) as answer:
                answer.raise_for_status()
                async for line in answer.content:
                    if line.startswith(b"data: "):
                        return time.perf_counter() - begun
            raise RuntimeError("a stream ended without a piece")

        first = await asyncio.gather(*(first_piece(t) for t in texts[:clients]))
    ordered = sorted(latencies)
    return {"clients": clients, "requests": requests, "seconds": wall,
            "requests_per_s": requests / wall, "tokens_per_s": requests * new_tokens / wall,
            "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "ttft_p50_s": statistics.median(first)}


def offline(bundle: Path, args, batch: int, requests: int) -> float:
    """Tokens/s of `generate_ids` over the same inputs in batches of `batch`, in this process,
    with ONNX Runtime's threads spinning and sleeping between operators: the better of the two
    (the server runs with them sleeping)."""
    best = 0.0
    for spinning in (True, False):
        options = ({"intra_op_threads": args.threads, "spinning": spinning}
                   if args.backend.startswith("onnxruntime") else {})
        model = load(bundle, args.backend, **options)
        model = model.as_generator() if hasattr(model, "as_generator") else model
        ids, mask = model.codec.encode(inputs(requests))
        forced = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
        model.generate_ids(ids[:batch], mask[:batch], **forced)  # warm-up
        started = time.perf_counter()
        for start in range(0, requests, batch):
            model.generate_ids(ids[start : start + batch], mask[start : start + batch], **forced)
        best = max(best, requests * args.new_tokens / (time.perf_counter() - started))
    return best


def plot(results: list[dict], path: Path, machine: str) -> None:
    from ferry.runtime.charts import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    clients = [r["clients"] for r in results]
    ax.plot(clients, [r["tokens_per_s"] for r in results], marker="o", label="ferry serve")
    ax.plot(clients, [r["offline_tokens_per_s"] for r in results], marker="s", linestyle="--",
            label="offline generate_ids, batch min(clients, max-batch)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(machine, fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--preset", help="benchmark a random-weight bundle of this preset")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--clients", default="1,8,32,128")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-threads", type=int, default=None,
                        help="the server's ONNX Runtime threads, if not --threads (offline "
                             "generate_ids keeps --threads)")
    parser.add_argument("--max-join-wait-ms", type=float, default=100.0)
    parser.add_argument("--spinning", action="store_true", default=None,
                        help="serve with ONNX Runtime's threads spin-waiting between operators "
                             "(default: the server's own choice at load)")
    parser.add_argument("--no-spinning", dest="spinning", action="store_false",
                        help="serve with them sleeping between operators")
    parser.add_argument("--no-continuous", dest="continuous", action="store_false",
                        help="serve with batching at batch boundaries only (decoder-only "
                             "models batch continuously by default)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if (args.bundle is None) == (args.preset is None):
        parser.error("give a BUNDLE or --preset")
    machine = machine_description()
    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle or random_bundle(args.preset, Path(scratch))
        results = []
        with served(bundle, args) as base:
            for clients in args.clients:
                requests = max(args.requests, REQUESTS_PER_CLIENT * clients)
                print(f"{clients} clients, {requests} requests …", file=sys.stderr)
                results.append(asyncio.run(level(base, clients, requests, args.new_tokens)))
        solo = results[0]["tokens_per_s"] if args.clients[0] == 1 else None
        for result in results:
            batch = min(result["clients"], args.max_batch)
            result["offline_tokens_per_s"] = offline(bundle, args, batch, result["requests"])
            result["of_offline"] = result["tokens_per_s"] / result["offline_tokens_per_s"]
            result["of_one_at_a_time"] = result["tokens_per_s"] / solo if solo else None
    print(f"ferry serve on loopback: {bundle}, {args.new_tokens} forced tokens, max batch "
          f"{args.max_batch}, wait {args.max_wait_ms:g} ms, {args.threads} threads "
          f"(server {args.server_threads or args.threads}), "
          f"{'continuous' if args.continuous else 'batch-boundary'} batching\n{machine}")
    print(f"{'clients':>7} {'req/s':>8} {'tok/s':>9} {'p50 s':>7} {'p99 s':>7} {'TTFT s':>7} "
          f"{'offline tok/s':>13} {'of offline':>10} {'of 1 client':>11}")
    for r in results:
        alone = f"{r['of_one_at_a_time']:.2f}x" if r["of_one_at_a_time"] else "-"
        print(f"{r['clients']:>7} {r['requests_per_s']:>8.1f} {r['tokens_per_s']:>9.1f} "
              f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['ttft_p50_s']:>7.3f} "
              f"{r['offline_tokens_per_s']:>13.1f} {100 * r['of_offline']:>9.0f}% {alone:>11}")
    report = {"machine": machine, "bundle": str(args.bundle or f"random {args.preset}"),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot",
                                                                              "bundle")},
              "results": results, "load_after": os.getloadavg()[0]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(results, args.plot, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
