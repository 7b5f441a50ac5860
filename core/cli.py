"""The `ferry` command: thin click commands over the library. Heavy imports happen inside commands.

Bad input (a FerryError) prints one line on stderr and exits with status 2; a failed parity or
verification check exits with status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ferry.errors import FerryError

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


def os_error_line(exc: OSError) -> str:
    """An OSError as what could not be done to which file, and why."""
    where = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    return f"cannot read or write{where}: {reason} (check the path, its permissions and space)"


class FerryGroup(click.Group):
    """Turns bad input — a FerryError, a malformed option (click's usage errors), a file that
    cannot be read or written, a missing optional dependency — into one line on stderr and exit
    status 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        if sys.stdout is None or sys.stdout.closed:  # started with `>&-`: results would vanish
            click.echo("error: standard output is closed; ferry prints its results there "
                       "(redirect it instead: > results.txt, or > /dev/null to discard)",
                       err=True)
            ctx.exit(EXIT_BAD_INPUT)
        try:
            return super().invoke(ctx)
        except FerryError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except OSError as exc:  # unwritable or full output, a closed stdout, …
            try:
                click.echo(f"error: {os_error_line(exc)}", err=True)
            except OSError:
                pass  # stderr is gone too: the exit status still says it
            ctx.exit(EXIT_BAD_INPUT)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in {"torch", "onnx", "safetensors", "tqdm",
                                                       "matplotlib", "onnxscript"}:
                click.echo(f"error: this command needs {exc.name}; install the training extras "
                           "with `pip install 'ferry[train]'`", err=True)
                ctx.exit(EXIT_BAD_INPUT)
            if exc.name and exc.name.split(".")[0] in {"fastapi", "starlette", "uvicorn",
                                                       "prometheus_client", "ray"}:
                extra = "ray" if exc.name.startswith("ray") else "serve"
                click.echo(f"error: this command needs {exc.name}; install the serving extras "
                           f"with `pip install 'ferry[{extra}]'`", err=True)
                ctx.exit(EXIT_BAD_INPUT)
            raise


@click.group(cls=FerryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ferry")
def main() -> None:
    """ferry: train a Transformer, export it to ONNX / TensorRT, run it anywhere, prove the
    backends agree.

    Start with `ferry demo`; `ferry COMMAND --help` lists a command's options and choices. Every
    command, step by step: docs/cli.md; the Python runtime: docs/runtime.md."""


# ---------------------------------------------------------------- demo and data


@main.command()
@click.option("--workdir", default="demo-run", show_default=True, type=click.Path(),
              help="Where data, the run and the bundle are written.")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Training steps (default: the demo's).")
def demo(workdir: str, steps: int | None) -> None:
    """Train → export → generate → compare, on the embedded date-normalisation task (CPU)."""
    from ferry.demo import run_demo

    if not run_demo(workdir, steps=steps):
        sys.exit(EXIT_CHECK_FAILED)


@main.group()
def data() -> None:
    """Write ferry's built-in generated datasets."""


@data.command("dates")
@click.option("--out", required=True, type=click.Path(), help="Directory for train/eval.jsonl.")
@click.option("--train", "num_train", default=20000, show_default=True, type=click.IntRange(min=1))
@click.option("--eval", "num_eval", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
def data_dates(out: str, num_train: int, num_eval: int, seed: int) -> None:
    """Date normalisation (`March 5, 2021` → `2021-03-05`) with a held-out split of unseen days."""
    from ferry.train.datasets.dates import write_date_task

    paths = write_date_task(out, num_train=num_train, num_eval=num_eval, seed=seed)
    for split, path in paths.items():
        click.echo(f"{split}: {path}")


@data.command("docs")
@click.option("--out", required=True, type=click.Path(), help="Directory for train/eval.jsonl.")
def data_docs(out: str) -> None:
    """Plain English text for the self-supervised objectives: the Python standard library's
    docstrings, one paragraph per line (`text` field)."""
    from ferry.train.datasets.text_corpus import write_text_corpus

    for split, path in write_text_corpus(out).items():
        click.echo(f"{split}: {path}")


@data.command("tasks")
@click.option("--out", required=True, type=click.Path(), help="Directory for the task folders.")
@click.option("--train", "num_train", default=4000, show_default=True, type=click.IntRange(min=1))
@click.option("--eval", "num_eval", default=400, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
def data_tasks(out: str, num_train: int, num_eval: int, seed: int) -> None:
    """Fine-tuning tasks: seasons (classification, CSV), same_day (sentence pairs), entities
    (BIO tagging), qa (extractive question answering), and the stories corpus (next-sentence
    prediction). See docs/training.md."""
    from ferry.train.datasets.task_data import write_task_data

    for split, path in write_task_data(out, num_train=num_train, num_eval=num_eval,
                                       seed=seed).items():
        click.echo(f"{split}: {path}")


# ---------------------------------------------------------------- training

config_option = click.option("--config", "config_path", required=True, type=click.Path(),
                             help="YAML training config (see examples/).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config key, e.g. --set optim.lr=3e-4 (repeatable).")


@main.group()
def train() -> None:
    """Train tokenizers and models from YAML configs. Examples: examples/; every config key:
    docs/training.md."""


@train.command("tokenizer")
@config_option
@set_option
@click.option("--out", required=True, type=click.Path(), help="Where to write tokenizer.json.")
def train_tokenizer_command(config_path: str, overrides: tuple[str, ...], out: str) -> None:
    """Train the config's tokenizer on its training data (tokenizer.* and data.* keys)."""
    from ferry.train import load_train_config
    from ferry.train.loop import tokenizer_for_config
    from ferry.train.tokenizer import save_tokenizer

    config = load_train_config(config_path, [*overrides, "tokenizer.path=null"])
    tokenizer = tokenizer_for_config(config)
    click.echo(f"tokenizer with {tokenizer.get_vocab_size()} tokens written to "
               f"{save_tokenizer(tokenizer, out)}")


resume_option = click.option(
    "--resume", default=None, metavar="auto|CHECKPOINT",
    help="Continue a run: 'auto' takes the latest intact checkpoint in out_dir (a fresh start "
         "if there is none); or a run_dir/checkpoints/step-… directory.")


def _run_training(stage: str, config_path: str, overrides: tuple[str, ...],
                  resume: str | None) -> None:
    from ferry.train import load_train_config, train
    from ferry.train.objectives import all_objectives, objective_class

    config = load_train_config(config_path, list(overrides))
    if objective_class(config.objective).stage != stage:
        fitting = sorted(n for n, o in all_objectives().items() if o.stage == stage)
        raise FerryError(f"`ferry train {stage}` runs the objectives {fitting}; the config asks "
                         f"for {config.objective!r}")
    result = train(config, progress=True, resume=resume)
    if result.rank != 0:  # under torchrun, rank 0 reports
        return
    click.echo(f"done in {result.seconds:.0f}s; latest checkpoint {result.checkpoint}, best "
               f"{result.best_checkpoint}; plot {result.run_dir / 'loss.png'}")
    click.echo("best eval: " + ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items()))


@train.command("pretrain")
@config_option
@set_option
@resume_option
def train_pretrain(config_path: str, overrides: tuple[str, ...], resume: str | None) -> None:
    """Pretrain with a self-supervised objective. The config's `objective`: causal_lm,
    masked_lm, masked_lm_whole_word, next_sentence, masked_lm_nsp, sentence_order,
    masked_lm_sop, permutation_lm, span_corruption or denoising. Under `torchrun
    --nproc_per_node N -m ferry train pretrain …` each process is one data-parallel rank. See
    docs/training.md."""
    _run_training("pretrain", config_path, overrides, resume)


@train.command("finetune")
@config_option
@set_option
@resume_option
def train_finetune(config_path: str, overrides: tuple[str, ...], resume: str | None) -> None:
    """Train on a supervised task. The config's `objective`: seq2seq (text-to-text),
    classification, token_classification, question_answering or prompt_classification. Runs
    under torchrun like pretrain. See docs/training.md."""
    _run_training("finetune", config_path, overrides, resume)


@main.command("plot")
@click.argument("run_dir", type=click.Path())
def plot(run_dir: str) -> None:
    """Draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl (also while the run is going on)."""
    from ferry.train.plots import plot_run

    click.echo(f"wrote {plot_run(run_dir)}")


# ---------------------------------------------------------------- import


@main.group("import")
def import_group() -> None:
    """Bring checkpoints from elsewhere into ferry."""


@import_group.command("hf")
@click.argument("directory", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Checkpoint directory to write.")
def import_hf_command(directory: str, out: str) -> None:
    """Import a local Hugging Face model DIRECTORY (config.json, model.safetensors or shards or
    pytorch_model.bin, tokenizer files) as a ferry checkpoint: BERT, RoBERTa, GPT-2, BART,
    mBART, Marian, with their task heads. Nothing is downloaded. See docs/hf.md."""
    from ferry.train.hf_import import import_hf

    import_hf(directory, out, log=lambda m: click.echo(m, err=True))


# ---------------------------------------------------------------- export


@main.group()
def export() -> None:
    """Export checkpoints: ONNX bundles, TensorRT engines, Hugging Face model directories."""


@export.command("onnx")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Bundle directory to write.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17, 23),
              help="ONNX opset (17–23: native LayerNormalization up to what the exporter writes).")
@click.option("--precision", "precisions", default="fp32,fused", show_default=True,
              help="Comma-separated: fp32 (always) plus variants: int8, int4, fp16, bf16, fused "
                   "(ONNX Runtime's fused kernels, what the onnxruntime backend runs on CPUs "
                   "by default).")
def export_onnx(checkpoint: str, out: str, opset: int, precisions: str) -> None:
    """Export CHECKPOINT (a ferry checkpoint directory, or a Hugging Face model directory,
    imported on the way) to an ONNX bundle, validated against torch. See docs/bundle.md."""
    import tempfile

    from ferry.export import export_bundle
    from ferry.model.hf_checkpoint import is_hf_directory

    def log(message: str) -> None:
        click.echo(message, err=True)

    variants = tuple(p.strip() for p in precisions.split(",") if p.strip())
    if not is_hf_directory(checkpoint):
        export_bundle(checkpoint, out, opset=opset, precisions=variants, log=log)
        return
    from ferry.train.hf_import import import_hf

    with tempfile.TemporaryDirectory(prefix="ferry-import-") as scratch:
        imported = import_hf(checkpoint, Path(scratch) / "checkpoint", log=log)
        export_bundle(imported, out, opset=opset, precisions=variants, log=log)


@export.command("hf")
@click.argument("checkpoint", type=click.Path())
@click.option("--out", required=True, type=click.Path(),
              help="Hugging Face model directory to write.")
def export_hf_command(checkpoint: str, out: str) -> None:
    """Write CHECKPOINT as a Hugging Face model directory (config.json, model.safetensors,
    tokenizer files) that `transformers` loads: the family it was imported from, or the one
    whose options it has."""
    from ferry.export.hf_export import export_hf

    export_hf(checkpoint, out, log=lambda m: click.echo(m, err=True))


@export.command("tensorrt")
@click.argument("bundle", type=click.Path())
@click.option("--check", is_flag=True,
              help="Only the static compatibility check; needs no TensorRT (runs in CI).")
@click.option("--precision", default="fp32", show_default=True,
              help="fp32 or a variant the bundle carries (fp16, bf16): the engines' precision.")
@click.option("--engine-dir", type=click.Path(), default=None,
              help="Where engines, sidecars and the timing cache go [default: BUNDLE/tensorrt].")
@click.option("--workspace-gib", default=8.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="TensorRT workspace memory limit.")
@click.option("--rebuild", is_flag=True, help="Rebuild engines that are up to date too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def export_tensorrt(bundle: str, check: bool, precision: str, engine_dir: str | None,
                    workspace_gib: float, rebuild: bool, as_json: bool) -> None:
    """Build a TensorRT engine for every graph of BUNDLE (strongly typed, precision from the
    ONNX variant, profiles from the graph specs, timing cache reused, a sidecar per engine).

    With --check: every op supported by TensorRT, no If/Loop, opset in range, every dynamic dim
    with a profile range; exit 1 naming the offending nodes. Needs no TensorRT.
    See docs/bundle.md."""
    from ferry.export.tensorrt_check import (
        check_bundle_for_tensorrt,
        format_checks,
        supported_operators,
    )
    from ferry.runtime import Bundle

    opened = Bundle.open(bundle)
    if not check:
        from ferry.export.tensorrt_build import build_engines

        built = build_engines(opened, precision=precision, engine_dir=engine_dir,
                              workspace_gib=workspace_gib, rebuild=rebuild,
                              log=lambda m: click.echo(m, err=True))
        if as_json:
            click.echo(json.dumps([{"graph": b.graph, "plan": str(b.plan), "status": b.status,
                                    "seconds": b.seconds} for b in built], indent=2))
        else:
            for b in built:
                click.echo(f"{b.graph:<14} {b.status:<12} {b.plan}")
        return
    checks = check_bundle_for_tensorrt(opened, precision)
    passed = all(c.passed for c in checks)
    if as_json:
        click.echo(json.dumps({"passed": passed, "graphs": [
            {"graph": c.graph, "file": c.file, "opset": c.opset, "op_types": c.op_types,
             "problems": c.problems, "profile": c.profile} for c in checks]}, indent=2))
    else:
        click.echo(format_checks(checks, supported_operators()))
    if not passed:
        sys.exit(EXIT_CHECK_FAILED)


# ---------------------------------------------------------------- runtime

backend_option = click.option(
    "--backend", default="onnxruntime", show_default=True,
    help="onnxruntime, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt, torch, torch-cuda, "
         "torch-cuda-graphs; optionally a variant the bundle carries after a colon: fp32, "
         "fused, int8, int4, fp16, bf16 (onnxruntime:int8, tensorrt:fp16). See docs/runtime.md.")


truncate_option = click.option(
    "--truncate", "truncation", flag_value=True, default=False,
    help="Cut inputs longer than the model's positions (as Hugging Face's truncation=True) "
         "instead of refusing them.")
max_input_option = click.option(
    "--max-input-tokens", type=click.IntRange(min=1), default=None,
    help="With --truncate: cut inputs to this many tokens.")


input_option = click.option(
    "--input", "input_path", type=click.Path(), default=None,
    help="Read the inputs from a JSON Lines / CSV / TSV file (of any size) instead of the "
         "command line; see docs/cli.md#files-in-files-out.")
output_option = click.option(
    "--output", "output_path", type=click.Path(), default=None,
    help="With --input: write one JSON line per input here (atomically; an interrupted run "
         "resumes).")
batch_size_option = click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
    help="With --input: inputs per model call.")


def _from_file(command: str, input_path: str | None, output_path: str | None,
               batch_size: int, given: tuple, *, model, arguments: dict, settings: dict,
               printing: dict[str, bool]) -> bool:
    """Run `command` over a file when --input is given (True), else check that the command
    line gave inputs (False). `arguments` go to the model's method; `printing`: the options
    that only make sense without a file (option → whether given)."""
    from ferry.runtime.batch_files import (
        COMMAND_FIELDS,
        ProgressLine,
        batch_inference,
        infer_file,
    )

    if input_path is not None and any(printing.values()):
        given_options = [name for name, on in printing.items() if on]
        raise FerryError(f"{', '.join(given_options)} cannot go with --input: the results of a "
                         "file go to --output, one JSON line per input")
    if input_path is None:
        if output_path is not None:
            raise FerryError("--output needs --input")
        if not given:
            raise FerryError(f"give the inputs on the command line or as a file with --input "
                             f"(see `ferry {command} --help`)")
        return False
    if given or output_path is None:
        raise FerryError("--input takes its inputs from the file: give --output and no inputs "
                         "on the command line")
    fields, optional = COMMAND_FIELDS[command]
    run = infer_file(input_path, output_path, batch_inference(model, command, **arguments),
                     fields=fields, optional=optional,
                     settings={"command": command, **settings}, batch_size=batch_size,
                     progress=ProgressLine())
    resumed = f", {run.resumed:,} done by an earlier run" if run.resumed else ""
    click.echo(f"wrote {run.computed + run.resumed:,} lines to {run.output}{resumed}", err=True)
    return True


def _truncation(truncation: bool, max_input_tokens: int | None) -> bool | int:
    if max_input_tokens is not None and not truncation:
        raise FerryError("--max-input-tokens needs --truncate")
    return max_input_tokens if truncation and max_input_tokens else truncation


def _load(bundle, spec: str, **options):
    """Load `backend[:precision]` (e.g. onnxruntime:int8) from an opened or named bundle."""
    from ferry.runtime import load

    return load(bundle, backend=spec, **options)


def _precision(spec: str) -> str:
    """The precision a `backend[:precision]` spec names (fp32 when none)."""
    from ferry.runtime.backends.base import parse_backend

    return parse_backend(spec)[1].get("precision", "fp32")


def _generator(bundle, spec: str, **options):
    """A model that generates: an encoder-decoder, or a decoder-only LM's generator."""
    from ferry.runtime import TaskModel

    model = _load(bundle, spec, **options)
    if isinstance(model, TaskModel):
        return model.as_generator()
    return model


@main.command()
@click.argument("bundle", type=click.Path())
@backend_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Inputs of concurrent requests grouped into one backend call at most.")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long a request waits for others to share its batch.")
@click.option("--continuous/--no-continuous", default=True, show_default=True,
              help="Decoder-only models: requests join a running generation between its "
                   "steps (continuous batching); every model: a request is answered as soon "
                   "as its rows end. Off: one generate call per batch.")
@click.option("--max-join-wait-ms", type=click.FloatRange(min=0), default=100.0,
              show_default=True,
              help="Continuous batching: how long a request waits for others to join a "
                   "running generation with (they join at once when they make a quarter of "
                   "its rows).")
@click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
              help="Inputs waiting at most; beyond, 503 with Retry-After.")
@click.option("--max-new-tokens", "max_new_tokens", type=click.IntRange(min=1), default=512,
              show_default=True, help="The most new tokens a request may ask for.")
@click.option("--max-input-tokens", type=click.IntRange(min=1), default=None,
              help="The most tokens of one input (default: the model's positions).")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20,
              show_default=True)
@click.option("--max-streams", type=click.IntRange(min=1), default=16, show_default=True,
              help="Streaming generations at once.")
@click.option("--timeout-s", type=click.FloatRange(min=0.001), default=60.0, show_default=True,
              help="A request's time limit, queueing included (504 beyond).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: one per core).")
@click.option("--spinning/--no-spinning", default=None,
              help="Let ONNX Runtime's threads spin-wait between operators, or make them sleep "
                   "(default: spin when every thread has a free core as the bundle loads, the "
                   "runtime's own choice; full batches keep the cores busy then).")
@click.option("--api-key", envvar="FERRY_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (env FERRY_API_KEY); /health and "
                   "/ready stay open.")
@click.option("--access-log/--no-access-log", default=False, show_default=True,
              help="Log a line per request (/metrics counts them either way).")
@click.option("--ray", "on_ray", is_flag=True,
              help="Serve replicas on Ray Serve (the cluster at RAY_ADDRESS, else a local one) "
                   "behind Ray's HTTP proxy on --host/--port, a request whose replica dies "
                   "sent to another; needs 'ferry[ray]'.")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: how many replicas.")
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="With --ray: Ray Serve autoscaling between MIN and MAX replicas instead.")
def serve(bundle: str, backend: str, host: str, port: int, max_batch: int, max_wait_ms: float,
          continuous: bool, max_join_wait_ms: float, max_queue: int, max_new_tokens: int,
          max_input_tokens: int | None,
          max_body_bytes: int, max_streams: int, timeout_s: float, threads: int,
          spinning: bool | None, api_key: str | None, access_log: bool, on_ray: bool,
          replicas: int,
          autoscale: str | None) -> None:
    """Serve BUNDLE over HTTP: generation (JSON, server-sent events, OpenAI-style
    /v1/completions), classify / tag / answer for task bundles, /health, /ready, /metrics,
    /v1/models. Concurrent requests are batched. See docs/serve.md."""
    import uvicorn

    from ferry.runtime.serve import ServeLimits, create_app

    limits = ServeLimits(max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_join_wait_ms=max_join_wait_ms, max_queue=max_queue,
                         max_new_tokens=max_new_tokens, max_input_tokens=max_input_tokens,
                         max_body_bytes=max_body_bytes, max_streams=max_streams,
                         timeout_s=timeout_s, api_key=api_key, continuous=continuous)
    options = ({"intra_op_threads": threads, "spinning": spinning}
               if backend.startswith("onnxruntime") else {})
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches this "
                   "address can use the model", err=True)
    if on_ray:
        _serve_on_ray(bundle, backend, options, limits, host, port, replicas, autoscale)
        return
    if autoscale is not None or replicas != 1:
        raise FerryError("--replicas and --autoscale need --ray")
    model = _load(bundle, backend, **options)
    plan = next(iter(model.graphs.values())).thread_plan
    if plan is not None:
        click.echo(f"ONNX Runtime: {plan.describe()}", err=True)
    app = create_app(model, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log,
                timeout_keep_alive=30,  # clients wait seconds between long generations
                timeout_graceful_shutdown=int(timeout_s) + 1)


def _serve_on_ray(bundle: str, backend: str, options: dict, limits, host: str, port: int,
                  replicas: int, autoscale: str | None) -> None:
    """`ferry serve --ray`: the app's replicas on Ray Serve, until interrupted."""
    import ray
    from ray import serve

    from ferry.runtime import Bundle
    from ferry.runtime.serve.ray_app import ray_application

    Bundle.open(bundle)  # a bad bundle is one line here, not a replica failing on the cluster
    scaling = None
    if autoscale is not None:
        low, _, high = autoscale.partition(":")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
            raise FerryError(f"--autoscale must be MIN:MAX with 0 < MIN ≤ MAX, got {autoscale!r}")
        scaling = {"min_replicas": int(low), "max_replicas": int(high)}
    ray.init(include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(ray_application(bundle, backend=backend, load_options=options, limits=limits,
                                  num_replicas=replicas, autoscaling_config=scaling),
                  route_prefix="/", blocking=True)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: stop the replicas, then leave quietly
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("texts", nargs=-1)
@backend_option
@input_option
@output_option
@batch_size_option
@click.option("--max-new-tokens", type=int, help="[default: 64]")
@click.option("--max-length", type=int,
              help="Length of the whole sequence (prompt or decoder start included).")
@click.option("--min-new-tokens", type=int, help="[default: 0]")
@click.option("--min-length", type=int, help="[default: 0]")
@click.option("--num-beams", type=int, help="> 1: beam search. [default: 1]")
@click.option("--length-penalty", type=float, help="[default: 1.0]")
@click.option("--early-stopping", type=click.Choice(["true", "false", "never"]),
              callback=lambda ctx, param, value: (None if value is None else
                                                  value if value == "never" else value == "true"),
              help="Beam search: true stops at num_beams finished hypotheses; never waits "
                   "until none can improve. [default: false]")
@click.option("--num-return-sequences", type=int, help="[default: 1]")
@click.option("--do-sample/--no-sample", default=None,
              help="Sample instead of searching. [default: no]")
@click.option("--temperature", type=float, help="[default: 1.0]")
@click.option("--top-k", type=int, help="[default: 50; 0 keeps all tokens]")
@click.option("--top-p", type=float, help="[default: 1.0]")
@click.option("--min-p", type=float, help="[default: 0, off]")
@click.option("--typical-p", type=float, help="[default: 1.0, off]")
@click.option("--seed", default=None, type=int, help="Sampling seed (reproducible samples).")
@click.option("--repetition-penalty", type=float, help="[default: 1.0]")
@click.option("--no-repeat-ngram-size", type=int, help="[default: 0]")
@click.option("--stop-string", "stop_strings", multiple=True,
              help="End a sequence once its text ends in this string (repeatable).")
@click.option("--stream", is_flag=True, help="Print tokens as they are generated (one text).")
@truncate_option
@max_input_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def generate(bundle: str, texts: tuple[str, ...], backend: str, stream: bool, as_json: bool,
             truncation: bool, max_input_tokens: int | None, input_path: str | None,
             output_path: str | None, batch_size: int, **generation) -> None:
    """Generate from each TEXT with the model in BUNDLE (greedy unless told otherwise): the
    output of an encoder-decoder, or the continuation of a decoder-only language model.

    Options left out take the bundle's generation defaults (a Hugging Face model's
    generation_config.json), else the defaults shown. They mean what Hugging Face generate()'s
    arguments mean; see docs/runtime.md."""
    generation = {k: v for k, v in generation.items() if v is not None and v != ()}
    cut = _truncation(truncation, max_input_tokens)
    model = _generator(bundle, backend)
    if _from_file("generate", input_path, output_path, batch_size, texts, model=model,
                  arguments={"truncation": cut, **generation}, settings={
                      "bundle": str(Path(bundle).resolve()), "backend": backend,
                      "truncation": cut, "generation": generation},
                  printing={"--stream": stream, "--json": as_json}):
        return
    if stream:
        if len(texts) != 1 or as_json:
            raise FerryError("--stream takes exactly one TEXT and no --json")
        for piece in model.stream(texts[0], truncation=cut, **generation):
            click.echo(piece, nl=False)
        click.echo()
        return
    outputs = model.generate(list(texts), truncation=cut, **generation)
    if as_json:
        click.echo(json.dumps([{"input": t, "output": o} for t, o in zip(texts, outputs)]))
        return
    for output in outputs:
        click.echo(output if isinstance(output, str) else "\t".join(output))


def _task_model(bundle: str, backend: str):
    from ferry.runtime import TaskModel

    model = _load(bundle, backend)
    if not isinstance(model, TaskModel):
        raise FerryError(f"{bundle} holds an encoder-decoder model; use `ferry generate` (tasks "
                         "run text-to-text there)")
    return model


def _print_results(inputs: list, results: list[dict], as_json: bool, line) -> None:
    if as_json:
        click.echo(json.dumps([{"input": i, **r} for i, r in zip(inputs, results)]))
        return
    for result in results:
        click.echo(line(result))


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("texts", nargs=-1)
@input_option
@output_option
@batch_size_option
@click.option("--pair", "pairs", multiple=True, help="Second text of a pair (one per TEXT).")
@click.option("--prompt", default=None,
              help='Classify by prompt: a template with {text} and {label}, e.g. '
                   '"{text} It was {label}."')
@click.option("--labels", default=None,
              help="Prompt labels, comma-separated; label=word scores another word.")
@truncate_option
@max_input_option
@click.option("--examples", "examples_path", type=click.Path(), default=None,
              help="Few-shot demonstrations: a JSONL/CSV file with text (and text_pair) and "
                   "label fields.")
@backend_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON with every label's score.")
def classify(bundle: str, texts: tuple[str, ...], pairs: tuple[str, ...], prompt: str | None,
             labels: str | None, examples_path: str | None, backend: str, as_json: bool,
             truncation: bool, max_input_tokens: int | None, input_path: str | None,
             output_path: str | None, batch_size: int) -> None:
    """Classify each TEXT: with the bundle's classification head, or zero-/few-shot with a
    prompt scored by its language model."""
    examples = []
    if examples_path:
        from ferry.records import read_examples

        examples = read_examples(examples_path)
    model = _task_model(bundle, backend)
    cut = _truncation(truncation, max_input_tokens)
    if _from_file("classify", input_path, output_path, batch_size, texts, model=model,
                  arguments={"prompt": prompt, "labels": labels, "examples": examples,
                             "truncation": cut}, settings={
                      "bundle": str(Path(bundle).resolve()), "backend": backend,
                      "prompt": prompt, "labels": labels, "examples": examples_path,
                      "truncation": cut}, printing={"--pair": bool(pairs), "--json": as_json}):
        return
    results = model.classify(list(texts), list(pairs) or None, prompt=prompt, labels=labels,
                             examples=examples, truncation=cut)
    _print_results(list(texts), results, as_json,
                   lambda r: f"{r['label']}\t{r['score']:.3f}")


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("texts", nargs=-1)
@backend_option
@input_option
@output_option
@batch_size_option
@click.option("--json", "as_json", is_flag=True, help="Print words, tags and entities as JSON.")
@truncate_option
@max_input_option
def tag(bundle: str, texts: tuple[str, ...], backend: str, as_json: bool, truncation: bool,
        max_input_tokens: int | None, input_path: str | None, output_path: str | None,
        batch_size: int) -> None:
    """Tag the words of each TEXT (BIO) and list the entities found (words cut off by
    --truncate are tagged `-`)."""
    model, cut = _task_model(bundle, backend), _truncation(truncation, max_input_tokens)
    if _from_file("tag", input_path, output_path, batch_size, texts, model=model,
                  arguments={"truncation": cut},
                  settings={"bundle": str(Path(bundle).resolve()), "backend": backend,
                            "truncation": cut},
                  printing={"--json": as_json}):
        return
    results = model.tag(list(texts), truncation=cut)
    _print_results(list(texts), results, as_json, lambda r: " ".join(
        f"{w}/{t or '-'}" for w, t in zip(r["words"], r["tags"])))


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--question", "questions", multiple=True)
@click.option("--context", "contexts", multiple=True,
              help="The text holding the answer (one per --question).")
@backend_option
@input_option
@output_option
@batch_size_option
@click.option("--json", "as_json", is_flag=True, help="Print answers with offsets as JSON.")
@click.option("--stride", default=32, show_default=True, type=click.IntRange(min=0),
              help="A context too long for the model is read in windows sharing this many "
                   "tokens.")
def answer(bundle: str, questions: tuple[str, ...], contexts: tuple[str, ...], backend: str,
           as_json: bool, stride: int, input_path: str | None, output_path: str | None,
           batch_size: int) -> None:
    """Answer each --question with a span of its --context (long contexts in overlapping
    windows); with --input, each line's question and context."""
    if len(questions) != len(contexts):
        raise FerryError(f"{len(questions)} --question but {len(contexts)} --context; give one "
                         "context per question")
    model = _task_model(bundle, backend)
    if _from_file("answer", input_path, output_path, batch_size, questions, model=model,
                  arguments={"stride": stride},
                  settings={"bundle": str(Path(bundle).resolve()), "backend": backend,
                            "stride": stride},
                  printing={"--context": bool(contexts), "--json": as_json}):
        return
    results = model.answer(list(questions), list(contexts), stride=stride)
    _print_results(list(questions), results, as_json, lambda r: r["answer"])


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--backends", default="all", show_default=True,
              help="Comma-separated backend[:precision], the first being the reference; `all`: "
                   "every backend and precision that loads on this machine, torch first. "
                   "Names as for --backend of `ferry generate`.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Also write a PNG of the error distributions here (with --bisect: the error "
                   "through the layers).")
@click.option("--bisect", "bisect_layers", is_flag=True,
              help="Find the first layer where two backends part ways: every graph's hidden "
                   "states (embeddings, each attention and FFN output, final norm) compared "
                   "on the golden inputs. --backends names the two (default torch,onnxruntime).")
@click.option("--precision", default=None,
              help="With --bisect: the precision of a backend named without one (e.g. "
                   "--precision int8 bisects torch against onnxruntime:int8).")
def compare(bundle: str, backends: str, as_json: bool, plot_path: str | None,
            bisect_layers: bool, precision: str | None) -> None:
    """Compare backends graph by graph and by greedy tokens; exit 1 if they disagree. Each
    precision is held to its tolerance (see docs/bundle.md). With --bisect, name the first
    layer that exceeds it."""
    from ferry.graph_spec import segment_count
    from ferry.runtime import Bundle
    from ferry.runtime.backends.base import every_backend
    from ferry.runtime.charts import plot_error_distributions
    from ferry.runtime.parity import compare_backends, format_table, load_golden, tolerance_for

    opened = Bundle.open(bundle)
    if bisect_layers:
        _bisect(opened, backends, precision, as_json, plot_path)
        return
    if precision is not None:
        raise FerryError("--precision applies to --bisect; name precisions in --backends "
                         "(e.g. onnxruntime:int8)")
    skipped: dict[str, str] = {}
    if backends.strip() == "all":
        models = {}
        for name in every_backend(opened.precisions):
            try:
                models[name] = _load(opened, name)
            except FerryError as exc:  # not installed here, no engines built, …
                skipped[name] = str(exc)
    else:
        names = [b.strip() for b in backends.split(",") if b.strip()]
        if len(set(names)) != len(names) or len(names) < 2:
            raise FerryError(f"--backends needs at least two different backends, got {names}")
        models = {name: _load(opened, name) for name in names}
    if len(models) < 2:
        raise FerryError(f"fewer than two backends load here ({list(models)}); skipped: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    names = list(models)
    first = models[names[0]]
    reports = compare_backends(
        {name: m.graphs for name, m in models.items()}, golden=load_golden(opened.file("golden")),
        special=first.special, vocab_size=opened.model_config["vocab_size"],
        tolerances={name: tolerance_for(_precision(name)) for name in names},
        segments=segment_count(opened.model_config),
    )
    passed = bool(reports) and all(r.passed for r in reports)
    if as_json:
        click.echo(json.dumps({"bundle": str(opened.path), "passed": passed,
                               "reports": [r.to_dict() for r in reports],
                               "skipped": skipped}, indent=2))
    else:
        click.echo(format_table(reports))
        for name, reason in skipped.items():
            click.echo(f"skipped {name}: {reason.split(';')[0]}")
    if plot_path:
        from ferry.runtime.benchmark import machine_description

        chart = plot_error_distributions(reports, plot_path, machine_description())
        click.echo(f"chart written to {chart}", err=True)
    if not passed:
        sys.exit(EXIT_CHECK_FAILED)


def _engine_builder():
    """The TensorRT engine builder, for commands that build engines of scratch graphs."""
    from ferry.export.tensorrt_build import build_engines

    return build_engines


def _bisect(bundle, backends: str, precision: str | None, as_json: bool,
            plot_path: str | None) -> None:
    """`ferry compare --bisect`: the two backends' probed graphs on the golden inputs, a table
    of |Δ| per layer; exit 1 when a layer exceeds the tolerance."""
    import tempfile

    from ferry.runtime.backends.base import parse_backend
    from ferry.runtime.bisect import bisect
    from ferry.runtime.charts import plot_error_growth
    from ferry.runtime.parity import tolerance_for

    names = [b.strip() for b in ("torch,onnxruntime" if backends.strip() == "all"
                                 else backends).split(",") if b.strip()]
    if len(names) != 2 or names[0] == names[1]:
        raise FerryError(f"--bisect compares two different backends, got {names}; e.g. "
                         "--backends torch,onnxruntime:int8")
    if precision is not None:
        tolerance_for(precision)  # an unknown precision fails here, with the known ones
        names = [n if ":" in n or parse_backend(n)[0] == "torch" else f"{n}:{precision}"
                 for n in names]
    with tempfile.TemporaryDirectory(prefix="ferry-bisect-") as scratch:
        result = bisect(bundle, names[0], names[1], workdir=Path(scratch),
                        log=lambda message: click.echo(message, err=True),
                        build_engines=_engine_builder())
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle.path), **result.to_dict()}, indent=2))
    else:
        click.echo(result.format_table())
    if plot_path:
        from ferry.runtime.benchmark import machine_description

        chart = plot_error_growth(result, plot_path, machine_description())
        click.echo(f"chart written to {chart}", err=True)
    if not result.passed:
        sys.exit(EXIT_CHECK_FAILED)


@main.command()
@click.argument("bundle", type=click.Path())
@click.argument("text")
@backend_option
@click.option("--out", "out_dir", type=click.Path(), default="explain", show_default=True,
              help="Directory for the heatmaps (one PNG per kind of attention) and "
                   "attention.json.")
@click.option("--layer", type=int, default=None,
              help="Only this layer (0-based; default: every layer).")
@click.option("--head", type=int, default=None,
              help="Only this head (0-based; default: the mean over heads).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Tokens a generative model continues TEXT with before its maps are taken.")
@click.option("--json", "as_json", is_flag=True, help="Also print the numbers as JSON.")
def explain(bundle: str, text: str, backend: str, out_dir: str, layer: int | None,
            head: int | None, max_new_tokens: int, as_json: bool) -> None:
    """Show what the model attends to for TEXT: every layer's attention probabilities as
    heatmaps (token × token for self-attention, target × source for cross-attention) and
    JSON. A generative model first generates greedily, then its output is explained too."""
    import tempfile

    from ferry.runtime import Bundle
    from ferry.runtime.explain import attention_maps

    opened = Bundle.open(bundle)
    with tempfile.TemporaryDirectory(prefix="ferry-explain-") as scratch:
        maps = attention_maps(opened, text, workdir=Path(scratch), backend=backend,
                              max_new_tokens=max_new_tokens, build_engines=_engine_builder())
    chosen = maps.selected(layer, head)  # an index out of range fails before any write
    for path in maps.write(Path(out_dir), layer, head):
        click.echo(f"wrote {path}", err=True)
    if as_json:
        click.echo(json.dumps(maps.to_dict(layer, head)))
    else:
        click.echo(f"{len(chosen)} attention maps of {maps.backend} for {len(maps.source)} "
                   f"source{f' and {len(maps.target)} target' if maps.target else ''} tokens "
                   f"in {out_dir}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise FerryError(f"{option} expects comma-separated integers, got {text!r}")
    return values


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--backend", "backends", default="onnxruntime", show_default=True,
              help="Comma-separated backend[:precision]s to measure (names as for --backend "
                   "of `ferry generate`).")
@click.option("--batch", "batches", default="1,16", show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Tokens forced per request.")
@click.option("--source-len", default=32, show_default=True, type=click.IntRange(min=1),
              help="Source tokens per request.")
@click.option("--runs", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per setting.")
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(min=1),
              help="> 1: time beam search (every beam runs the full length).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: one per core).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable results.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Also write a PNG chart of tokens/s here.")
def bench(bundle: str, backends: str, batches: str, new_tokens: int, source_len: int,
          runs: int, threads: int, as_json: bool, plot_path: str | None, num_beams: int) -> None:
    """Generation latency (p50/p90) and tokens/s per backend and batch size, greedy or with
    beam search (--num-beams). See docs/performance.md."""
    from ferry.runtime import Bundle
    from ferry.runtime.benchmark import bench_model, format_results, plot_results, results_dict

    opened = Bundle.open(bundle)
    results = []
    for name in [b.strip() for b in backends.split(",") if b.strip()]:
        options = {"intra_op_threads": threads} if name.startswith("onnxruntime") else {}
        model = _generator(opened, name, **options)
        for batch in _int_list(batches, "--batch"):
            results.append(bench_model(model, batch=batch, new_tokens=new_tokens,
                                       source_len=source_len, runs=runs, num_beams=num_beams))
            click.echo(f"measured {name} batch {batch}", err=True)
    if as_json:
        click.echo(json.dumps(results_dict(results), indent=2))
    else:
        click.echo(format_results(results))
    if plot_path:
        click.echo(f"chart written to {plot_results(results, plot_path)}", err=True)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: one per free core, as `load` chooses).")
def tune(bundle: str, threads: int) -> None:
    """Measure which of BUNDLE's fp32 graph variants (fused, portable) runs faster on this
    machine, record the choice for every later load here, and print the timings. `load` does
    this by itself at a bundle's first load on a machine; run it again after the machine or
    its load changed (see docs/runtime.md)."""
    from ferry.runtime import Bundle, load
    from ferry.runtime.variant_choice import CANDIDATES, cache_directory, fastest_model

    opened = Bundle.open(bundle)
    missing = [v for v in CANDIDATES if v not in opened.precisions]
    if missing:
        raise FerryError(f"{bundle} carries no {' or '.join(missing)} graphs, so there is no "
                         f"choice to make; export with --precision {','.join(CANDIDATES)}")
    options = {"intra_op_threads": threads} if threads else {}
    click.echo(f"timing {' and '.join(CANDIDATES)} on {opened.path} ...", err=True)
    _, timing = fastest_model(opened, options, lambda precision: load(
        opened, "onnxruntime", precision=precision, **options), again=True)
    click.echo(f"machine: {timing.machine}")
    click.echo(f"{'variant':<8} " + " ".join(f"{f'batch {b} ms':>12}" for b in timing.batches))
    for variant, seconds in timing.seconds.items():
        click.echo(f"{variant:<8} " + " ".join(f"{1000 * s:>12.2f}" for s in seconds))
    click.echo(f"chosen: {timing.chosen} ({timing.speedup():.2f}x the other), recorded in "
               f"{cache_directory()}")


@main.command()
@click.argument("bundle", type=click.Path())
@backend_option
@click.option("--precision", default=None,
              help="The variant to verify (fused, int8, int4, fp16, bf16); same as --backend "
                   "NAME:PRECISION.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
def verify(bundle: str, backend: str, precision: str | None, as_json: bool) -> None:
    """Check a backend against the bundle's golden.npz (no torch needed); exit 1 on mismatch.

    Per-precision tolerances: fp32 and fused must match every output within 1e-4 (or 1e-5 ×
    its largest magnitude) with identical greedy tokens; int8 / int4 must agree on ≥ 95% / 90%
    of the greedy sequences; fp16 / bf16 must keep the 99th percentile of |Δ| within 1e-2 /
    8e-2 with ≥ 95% / 90% identical sequences. See docs/bundle.md."""
    from ferry.runtime.parity import format_table, load_golden, verify_against_golden

    if precision:
        if ":" in backend and _precision(backend) != precision:
            raise FerryError(f"--backend {backend} and --precision {precision} disagree; "
                             "give the precision once")
        backend = f"{backend.partition(':')[0]}:{precision}"
    model = _load(bundle, backend)
    precision = _precision(backend)
    report = verify_against_golden(model.graphs, load_golden(model.bundle.file("golden")),
                                   special=model.special, backend=model.backend,
                                   precision=precision)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_table([report]))
    if not report.passed:
        sys.exit(EXIT_CHECK_FAILED)


@main.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest.")
def inspect(bundle: str, as_json: bool) -> None:
    """Describe a bundle: model, graphs and their I/O, producers, files (checksums verified)."""
    from ferry.runtime import Bundle

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    click.echo(f"bundle {opened.path} (format ferry-bundle v{manifest.format_version}, "
               f"{manifest.precision}, opset {manifest.opset})")
    for line in manifest.describe():
        click.echo(line)
    for name, spec in opened.graphs.items():
        click.echo(f"graph {name}:")
        for kind, tensors in (("in ", spec.inputs), ("out", spec.outputs)):
            shown = [t for t in tensors if not t.name[-1].isdigit() or t.name.endswith("_0")]
            for t in shown:
                more = " (one per layer)" if t.name.endswith("_0") else ""
                click.echo(f"  {kind} {t.name:<24} {t.dtype:<8} {list(t.shape)}{more}")
    from ferry.runtime.engine_sidecar import EngineSidecar

    # engines built by `ferry export tensorrt` into the default engine directory
    for sidecar_path in sorted((opened.path / "tensorrt").glob("*.json")):
        sidecar = EngineSidecar.read(sidecar_path)
        click.echo(f"engine tensorrt/{sidecar_path.stem}.plan: TensorRT "
                   f"{sidecar.platform.tensorrt_version}, {sidecar.platform.gpu_name} (compute "
                   f"capability {sidecar.platform.compute_capability}), built in "
                   f"{sidecar.build_seconds:.0f}s")
    click.echo("files (sha256 verified):")
    for name, digest in manifest.files.items():
        size = (opened.path / name).stat().st_size
        click.echo(f"  {name:<22} {size:>12,} bytes  {digest[:16]}…")
