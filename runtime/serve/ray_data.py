"""Offline inference on a Ray cluster: a Ray Data dataset of records (the fields of
`ferry COMMAND --input`: `text`, `text_pair`, or `question` and `context`) mapped through a
bundle, one loaded model per actor, in batches. Needs `pip install 'ferry[ray]'`.

    import ray
    from ferry.runtime.serve.ray_data import infer_dataset

    results = infer_dataset(ray.data.read_json("texts.jsonl"), "bundles/dates", "generate",
                            concurrency=4, max_new_tokens=32)
    results.write_json("out/")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.batch_files import COMMAND_FIELDS, batch_inference


class BundleActor:
    """One loaded model in a Ray Data actor: a batch of records in, the batch with its results'
    fields added out (`batch_inference`)."""

    def __init__(self, bundle: str, command: str, backend: str, load_options: dict,
                 arguments: dict) -> None:
        from ferry.runtime import load

        self.infer = batch_inference(load(bundle, backend, **load_options), command,
                                     **arguments)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(batch)
        records = [{name: _plain(batch[name][i]) for name in names}
                   for i in range(len(batch[names[0]]))]
        results = self.infer(records)
        for field in results[0] if results else ():
            column = np.empty(len(results), dtype=object)
            column[:] = [result[field] for result in results]
            batch[field] = column
        return batch


def _plain(value):
    """A numpy scalar of a Ray Data column as the Python value the model takes."""
    return value.item() if isinstance(value, np.generic) else value


def infer_dataset(dataset, bundle: str | Path, command: str = "generate", *,
                  backend: str = "onnxruntime", load_options: dict | None = None,
                  batch_size: int = 32, concurrency: int = 1, num_cpus: float = 1,
                  **arguments):
    """`dataset` with each record's result added (`output` for generate; the fields
    `classify` / `tag` / `answer` return otherwise), computed by `concurrency` actors that each
    load the bundle once. `arguments` go to the model's method (e.g. `max_new_tokens`)."""
    if command not in COMMAND_FIELDS:
        raise FerryError(f"unknown command {command!r}; one of {sorted(COMMAND_FIELDS)}")
    path = Path(bundle).resolve()
    if not path.is_dir():
        raise FerryError(f"bundle {bundle} does not exist; create one with `ferry export onnx`")
    return dataset.map_batches(
        BundleActor, batch_size=batch_size, batch_format="numpy", concurrency=concurrency,
        num_cpus=num_cpus, fn_constructor_kwargs={
            "bundle": str(path), "command": command, "backend": backend,
            "load_options": dict(load_options or {}), "arguments": arguments})
