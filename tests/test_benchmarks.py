"""The shipped benchmarks run and report what they claim (figures belong in issue notes, not
assertions: only sanity is checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_training_overhead_benchmark_reports_both_loops(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "train_overhead.py"), "--preset", "tiny", "--steps",
         "40", "--warmup", "10", "--batch-size", "16", "--peak-tflops", "1", "--repeats", "1",
         "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ferry_tokens_per_s"] > 0 and report["bare_tokens_per_s"] > 0
    ratio = report["ferry_tokens_per_s"] / report["bare_tokens_per_s"]
    assert report["ratio_per_repeat"] == [report["ferry_over_bare"]]
    assert abs(report["ferry_over_bare"] - ratio) < 1e-9
    assert 0 < report["ferry_mfu"] < 1 and 0 < report["bare_mfu"] < 1
    assert report["timed_steps"] == 30 and "threads" in report["machine"]


def test_llm_benchmark_smoke_run_reports_every_variant_and_its_floor(tmp_path):
    """The LLM benchmark on its tiny shape (no llama.cpp): ferry's variants and transformers
    time the same prompts, ferry's tokens equal transformers', every variant has its floor."""
    out = tmp_path / "llm.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "llm_generation.py"), "--shape", "tiny", "--runs", "1",
         "--batches", "1,2", "--variants", "fp32,int4", "--engines", "ferry,transformers",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["same_tokens"] == "4/4 prompts"
    assert set(report["results"]) == {"ferry fp32", "ferry int4", "transformers eager"}
    for engine in report["results"].values():
        assert all(engine[b]["decode_tok_s"] > 0 and engine[b]["prefill_s"] > 0
                   for b in ("1", "2"))
    # int4 reads fewer weight bytes a token than fp32
    assert 0 < report["weight_bytes_per_token"]["ferry int4"] < \
        report["weight_bytes_per_token"]["ferry fp32"] / 3
    assert "fp32 ferry / best peer" in done.stdout and "b2: transformers eager" in done.stdout
    assert "b1 TTFT ms" in done.stdout
    # the saved run gives the same table again, and its chart, without timing anything
    chart = tmp_path / "llm.png"
    replayed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "llm_generation.py"), "--from-json", str(out),
         "--plot", str(chart)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    table = done.stdout[done.stdout.index("machine:"):]
    assert replayed.stdout.strip() == table.strip()
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ferry_bench_forces_the_token_count_and_reports_every_setting(tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from ferry.cli import main

    chart = tmp_path / "bench.png"
    result = CliRunner().invoke(main, [
        "bench", str(tiny_bundle), "--backend", "onnxruntime,torch", "--batch", "1,3",
        "--new-tokens", "7", "--source-len", "9", "--runs", "2", "--json", "--plot", str(chart)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = [(r["backend"], r["batch"]) for r in report["results"]]
    assert settings == [("onnxruntime", 1), ("onnxruntime", 3), ("torch", 1), ("torch", 3)]
    for r in report["results"]:
        assert r["new_tokens"] == 7 and r["runs"] == 2
        assert r["latency_p90_ms"] >= r["latency_p50_ms"] > 0
        assert abs(r["tokens_per_s"] - r["batch"] * 7 / (r["latency_p50_ms"] / 1000)) < 1e-6 * \
            r["tokens_per_s"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    beams = CliRunner().invoke(main, [
        "bench", str(tiny_bundle), "--batch", "2", "--num-beams", "3", "--new-tokens", "5",
        "--source-len", "7", "--runs", "1", "--json"])
    assert beams.exit_code == 0, beams.output
    (result,) = json.loads(beams.stdout)["results"]
    assert result["num_beams"] == 3 and result["new_tokens"] == 5 and result["tokens_per_s"] > 0
    bad = CliRunner().invoke(main, ["bench", str(tiny_bundle), "--batch", "x"])
    assert bad.exit_code == 2 and "--batch" in bad.output


def test_serve_load_benchmark_reports_every_level_against_offline(tiny_bundle, tmp_path):
    """The serving load test on the tiny bundle: a real `ferry serve`, two client levels."""
    out, chart = tmp_path / "serve.json", tmp_path / "serve.png"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "serve_load.py"), str(tiny_bundle), "--clients", "1,4",
         "--requests", "8", "--new-tokens", "4", "--json", str(out), "--plot", str(chart)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["clients"] for r in report["results"]] == [1, 4]
    for result in report["results"]:
        # at least --requests, and 8 per client (a steady state)
        assert result["requests"] == max(8, 8 * result["clients"]) and result["tokens_per_s"] > 0
        assert 0 < result["p50_s"] <= result["p99_s"] and result["ttft_p50_s"] > 0
        assert result["offline_tokens_per_s"] > 0
        assert result["of_offline"] == result["tokens_per_s"] / result["offline_tokens_per_s"]
    assert report["results"][0]["of_one_at_a_time"] == 1.0
    assert chart.read_bytes().startswith(b"\x89PNG") and "clients" in done.stdout
