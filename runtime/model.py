"""`ferry.runtime.load(bundle, backend=...)`: text or ids in, text or ids out, on any backend."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.runtime.backends.base import GraphBackend, backend_loader
from ferry.runtime.bundle import Bundle
from ferry.runtime.generation import SpecialIds, greedy_generate
from ferry.runtime.tokenization import TextCodec


class Seq2SeqModel:
    """An encoder-decoder model on one backend: `generate` text → text, `generate_ids` ids → ids.

    Thread-safe to call once loaded (backends hold no per-call state).
    """

    def __init__(
        self, graphs: dict[str, GraphBackend], codec: TextCodec, special: SpecialIds,
        *, backend: str, bundle: Bundle | None = None,
    ) -> None:
        self.graphs = graphs
        self.codec = codec
        self.special = special
        self.backend = backend
        self.bundle = bundle

    def generate(self, texts: str | list[str], *, max_new_tokens: int = 64) -> list[str]:
        """Generate greedily for each text; returns one string per input."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        input_ids, attention_mask = self.codec.encode(texts)
        return self.codec.decode(
            self.generate_ids(input_ids, attention_mask, max_new_tokens=max_new_tokens)
        )

    def generate_ids(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
        *, max_new_tokens: int = 64,
    ) -> np.ndarray:
        """(B, S) int64 source ids (right-padded) + optional mask → (B, N) generated ids."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise FerryError(f"input_ids must be a (batch, length) array, got shape "
                             f"{input_ids.shape}")
        if input_ids.shape[1] > self.codec.max_length:
            raise FerryError(f"input_ids has length {input_ids.shape[1]} but the model has "
                             f"{self.codec.max_length} positions; shorten the input")
        if attention_mask is None:
            attention_mask = (input_ids != self.special.pad).astype(np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        # Batches larger than the graphs' declared batch range run in chunks.
        chunk = self.graphs["encoder"].spec.dims["batch"].max
        pieces = [
            greedy_generate(self.graphs, input_ids[i : i + chunk], attention_mask[i : i + chunk],
                            special=self.special, max_new_tokens=max_new_tokens)
            for i in range(0, len(input_ids), chunk)
        ]
        width = max(p.shape[1] for p in pieces)
        return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])),
                                      constant_values=self.special.pad) for p in pieces])

    def close(self) -> None:
        for graph in self.graphs.values():
            graph.deactivate()

    def __enter__(self) -> Seq2SeqModel:
        for graph in self.graphs.values():
            graph.activate()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def load(bundle: str | Path | Bundle, backend: str = "onnxruntime", **options) -> Seq2SeqModel:
    """Open a bundle (verifying checksums) and load its graphs on `backend`.

    Args:
        bundle: a bundle directory written by `ferry export onnx`, or an opened `Bundle`.
        backend: "onnxruntime" (numpy + onnxruntime only) or "torch" (the reference).
        options: backend options, e.g. `intra_op_threads=2` for onnxruntime, `device="cuda"`
            for torch.
    """
    loader = backend_loader(backend)
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    if bundle.manifest.get("architecture") != "encoder-decoder":
        raise FerryError(f"bundle {bundle.path} holds a {bundle.manifest.get('architecture')} "
                         "model; this runtime serves encoder-decoder bundles")
    ids = bundle.special_ids
    codec = TextCodec.from_file(bundle.file("tokenizer"), pad_id=ids["pad"],
                                max_length=bundle.model_config["max_positions"])
    accepted = [p for p in inspect.signature(loader).parameters if p != "bundle"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise FerryError(f"backend {backend!r} has no option(s) {unknown}; it accepts {accepted}")
    graphs = loader(bundle, **options)
    return Seq2SeqModel(graphs, codec, SpecialIds(pad=ids["pad"], bos=ids["bos"], eos=ids["eos"]),
                        backend=backend, bundle=bundle)
