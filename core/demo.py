"""`ferry demo`: the whole path on the CPU in a few minutes, on the embedded date task.

generate data → train tokenizer + model → export an ONNX bundle → generate with ONNX Runtime →
held-out exact match → compare ONNX Runtime with the PyTorch reference (graphs and tokens).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

DEMO_NEW_TOKENS = 16


def run_demo(workdir: str | Path, *, steps: int | None = None, log=print) -> bool:
    """Run the demo in `workdir`; returns whether held-out accuracy and parity both passed."""
    import torch

    from ferry.export import export_bundle
    from ferry.runtime import Bundle, load
    from ferry.runtime.parity import compare_backends, format_table, identical_rows, load_golden
    from ferry.train import train
    from ferry.train.config import train_config_from_dict
    from ferry.train.data import read_jsonl
    from ferry.train.datasets.dates import demo_train_config, write_date_task

    started = time.perf_counter()
    workdir = Path(workdir)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    log(f"== 1/5 data: date normalisation, written to {workdir / 'data'}")
    paths = write_date_task(workdir / "data")
    overrides = [f"optim.max_steps={steps}", f"eval.every={steps}"] if steps else []
    config = train_config_from_dict(demo_train_config(workdir / "data", workdir / "run"),
                                    overrides)
    log("== 2/5 training (tokenizer, then the model)")
    result = train(config, progress=True, log=log)
    log(f"   trained in {result.seconds:.0f}s; loss curve: {result.run_dir / 'loss.png'}")

    log("== 3/5 export to an ONNX bundle")
    bundle_dir = export_bundle(result.best_checkpoint, workdir / "bundle", log=log)

    log("== 4/5 generate with ONNX Runtime on the held-out split")
    bundle = Bundle.open(bundle_dir)
    ort_model = load(bundle, backend="onnxruntime")
    rows = read_jsonl(paths["eval"], ["source", "target"])
    sources = [r["source"] for r in rows]
    input_ids, mask = ort_model.codec.encode(sources)
    ort_ids = ort_model.generate_ids(input_ids, mask, max_new_tokens=DEMO_NEW_TOKENS)
    predictions = ort_model.codec.decode(ort_ids)
    accuracy = float(np.mean([p == r["target"] for p, r in zip(predictions, rows)]))
    for source, prediction in list(zip(sources, predictions))[:6]:
        log(f"   {source!r:<40} → {prediction!r}")
    log(f"   held-out exact match (ONNX Runtime): {accuracy:.1%} on {len(rows)} unseen dates")

    log("== 5/5 parity: ONNX Runtime vs the PyTorch reference")
    torch_model = load(bundle, backend="torch")
    reports = compare_backends(
        {"torch": torch_model.graphs, "onnxruntime": ort_model.graphs},
        golden=load_golden(bundle.file("golden")), special=ort_model.special,
        vocab_size=bundle.model_config["vocab_size"],
    )
    log(format_table(reports))
    torch_ids = torch_model.generate_ids(input_ids, mask, max_new_tokens=DEMO_NEW_TOKENS)
    same = identical_rows(torch_ids, ort_ids, ort_model.special.pad)
    log(f"   held-out greedy tokens identical, torch vs onnxruntime: {same}/{len(rows)}")
    passed = accuracy >= 0.95 and all(r.passed for r in reports) and same == len(rows)
    log(f"demo {'PASSED' if passed else 'FAILED'} in {time.perf_counter() - started:.0f}s: "
        f"exact match {accuracy:.1%} (target ≥ 95%), parity "
        f"{'ok' if all(r.passed for r in reports) and same == len(rows) else 'FAILED'}; "
        f"bundle at {bundle_dir}")
    return passed
