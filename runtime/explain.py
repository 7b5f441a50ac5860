"""What a model attends to: every layer's attention probabilities for one input, per head.

The portable (fp32) graphs write attention out, and the export names each layer's softmax
(`attention.<stack>.layer_<i>.<kind>`, see `ferry.model.probes`). `attention_maps` marks those
values as outputs in a scratch copy of the bundle (the bisection's probed bundle, so the fast
graphs stay as they are), runs the model on the text — an encoder-decoder or a decoder-only LM
first generates greedily, then runs its full output once teacher-forced — and returns the maps
with the tokens that label their axes. The torch reference records the same probabilities
through forward hooks, so every backend's maps can be compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.errors import FerryError
from ferry.files import atomic_write_bytes
from ferry.graph_spec import ATTENTION_PREFIX, is_attention_map
from ferry.runtime.backends.base import Feed
from ferry.runtime.bisect import (
    EngineBuilder,
    graph_probes,
    load_probed,
    precision_of,
    probed_bundle,
)
from ferry.runtime.bundle import Bundle
from ferry.runtime.decoding_state import renamed
from ferry.runtime.parity import trim
from ferry.runtime.recurrence import empty_memory, has_memory
from ferry.runtime.text_tasks import encode_texts


@dataclass
class AttentionMaps:
    """Attention probabilities of one input: `maps[name]` is (heads, queries, keys) for a
    layer (`encoder.layer_0.attention`, `decoder.layer_1.self_attention`,
    `decoder.layer_1.cross_attention`), its axes labelled by `source` (encoder positions, or a
    decoder-only model's whole sequence) and `target` (an encoder-decoder's decoder inputs)."""

    source: list[str]
    target: list[str]
    maps: dict[str, np.ndarray]
    backend: str

    def axes(self, name: str) -> tuple[list[str], list[str]]:
        """(query labels, key labels) of one map."""
        if name.startswith("decoder.") and self.target:
            return self.target, self.source if name.endswith("cross_attention") else self.target
        return self.source, self.source

    def layers(self, kind: str) -> list[str]:
        """The maps of one kind (`encoder.attention`, `decoder.self_attention`, …), by layer."""
        stack, sublayer = kind.split(".")
        return [n for n in self.maps if n.startswith(f"{stack}.") and n.endswith(f".{sublayer}")]

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(f"{n.split('.')[0]}.{n.split('.')[-1]}" for n in self.maps))

    def selected(self, layer: int | None, head: int | None) -> dict[str, np.ndarray]:
        """The maps of `layer` (None: every layer), each (queries, keys) for `head`, or the
        mean over heads (None); an index beyond the model is refused."""
        some = next(iter(self.maps.values()))
        layer_count = max(len(self.layers(kind)) for kind in self.kinds)
        if layer is not None and not 0 <= layer < layer_count:
            raise FerryError(f"--layer {layer} is out of range: the model has {layer_count} "
                             f"layers (0 … {layer_count - 1})")
        if head is not None and not 0 <= head < some.shape[0]:
            raise FerryError(f"--head {head} is out of range: the model has {some.shape[0]} "
                             f"heads (0 … {some.shape[0] - 1})")
        return {name: (probabilities[head] if head is not None else probabilities.mean(0))
                for name, probabilities in self.maps.items()
                if layer is None or f".layer_{layer}." in name}

    def to_dict(self, layer: int | None = None, head: int | None = None) -> dict:
        return {"backend": self.backend, "source": self.source, "target": self.target,
                "layer": layer, "head": "mean" if head is None else head,
                "maps": {name: {"queries": self.axes(name)[0], "keys": self.axes(name)[1],
                                "probabilities": np.round(values, 6).tolist()}
                         for name, values in self.selected(layer, head).items()}}

    def write(self, directory: Path, layer: int | None = None, head: int | None = None
              ) -> list[Path]:
        """`attention.json` (the numbers) and one PNG of heatmaps per kind of attention in
        `directory`; the files written."""
        from ferry.runtime.charts import plot_attention

        directory.mkdir(parents=True, exist_ok=True)
        data = self.to_dict(layer, head)
        written = [directory / "attention.json"]
        atomic_write_bytes(written[0], json.dumps(data).encode())
        chosen = self.selected(layer, head)
        for kind in self.kinds:
            maps = {n: chosen[n] for n in self.layers(kind) if n in chosen}
            if maps:
                title = (f"{kind.replace('.', ' ')} ({self.backend}, "
                         f"{'mean over heads' if head is None else f'head {head}'})")
                written.append(plot_attention(maps, self.axes(next(iter(maps))), title,
                                              directory / f"{kind.replace('.', '_')}.png"))
        return written


def _tokens(tokenizer, ids: np.ndarray) -> list[str]:
    """Each id as the text it stands for (special tokens included)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def attention_maps(bundle: Bundle, text: str, *, workdir: Path, backend: str = "onnxruntime",
                   max_new_tokens: int = 16, log=lambda message: None,
                   build_engines: EngineBuilder | None = None) -> AttentionMaps:
    """The attention probabilities of every layer and head for `text` on `backend` (its fp32
    graphs): an encoder-only model's over the text; a decoder-only LM's over the text and its
    greedy continuation of up to `max_new_tokens`; an encoder-decoder's encoder over the text,
    its decoder over its greedy output (self-attention) and over the text (cross-attention).

    Args:
        workdir: an empty scratch directory for the marked graphs.
        build_engines: for TensorRT, `ferry.export.tensorrt_build.build_engines`.
    """
    precision = precision_of(backend)
    if precision != "fp32":
        raise FerryError(f"attention maps come from the portable fp32 graphs (the {precision} "
                         "graphs compute attention inside kernels that never form the "
                         f"probabilities); use --backend {backend.partition(':')[0]}")
    names = {g: graph_probes(bundle.graph_file(g), is_attention_map) for g in bundle.graphs}
    if not any(names.values()):
        raise FerryError(f"the graphs of bundle {bundle.path} name no attention probabilities "
                         "(exported before ferry named them); re-export the bundle")
    probed = probed_bundle(bundle, ["fp32"], names, workdir)
    with load_probed(probed, backend, log, build_engines) as model:
        return _explained(model, text, max_new_tokens)


def _maps(outputs: Feed) -> dict[str, np.ndarray]:
    """A graph's attention maps of its one row, by layer name."""
    return {name.removeprefix(ATTENTION_PREFIX): np.asarray(value)[0]
            for name, value in outputs.items() if is_attention_map(name)}


def _explained(model, text: str, max_new_tokens: int) -> AttentionMaps:
    """`attention_maps` on a model loaded from a probed bundle."""
    graphs, bundle = model.graphs, model.bundle
    tokenizer = model.codec.tokenizer if hasattr(model, "codec") else model.tokenizer
    if "decoder_step" not in graphs:  # encoder-only (or a decoder-only task head): one pass
        graph = graphs["head" if "head" in graphs else "lm"]
        batch = encode_texts(tokenizer, [text], pad=bundle.special_ids["pad"],
                             max_length=bundle.model_config["max_positions"])
        feed = batch.feed(graph.spec.input_names)
        memory = empty_memory(graph.spec, 1) if has_memory(graph.spec) else {}
        maps = _maps(graph.infer({**feed, **memory}))  # keys: the (masked) memory, the text
        skipped = memory["memory_mask"].shape[1] if memory else 0
        return AttentionMaps(_tokens(tokenizer, feed["input_ids"][0]), [],
                             {name: m[..., skipped:] for name, m in maps.items()},
                             model.backend)
    generator = model.as_generator() if hasattr(model, "as_generator") else model
    special = generator.special
    ids, mask = generator.encode([text])
    output = trim(generator.generate_ids(ids, mask, max_new_tokens=max_new_tokens)[0],
                  special.pad)
    if "encoder" not in graphs:  # decoder-only: the prompt and its continuation, one pass
        sequence = np.concatenate([ids[0][mask[0] == 1], output])[None, :]  # (1, T)
        outputs = graphs["decoder_init"].infer(
            {"input_ids": sequence, "attention_mask": np.ones_like(sequence)})
        return AttentionMaps(_tokens(tokenizer, sequence[0]), [], _maps(outputs), model.backend)
    target = np.concatenate([[special.decoder_start], output[:-1]]).astype(np.int64)[None, :]
    encoded = graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    decoded = graphs["decoder_init"].infer({
        "input_ids": target, "encoder_attention_mask": mask,
        **renamed(encoded, "cross_", "cross_")})
    return AttentionMaps(_tokens(tokenizer, ids[0]), _tokens(tokenizer, target[0]),
                         {**_maps(encoded), **_maps(decoded)}, model.backend)
