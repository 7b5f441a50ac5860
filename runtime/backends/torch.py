"""PyTorch backend: the reference. Runs the model rebuilt from the bundle's safetensors weights.

torch and `ferry.model` are imported only when this backend is loaded, so `ferry.runtime` itself
never needs torch.
"""

from __future__ import annotations

import re

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec, is_attention_map, is_probe
from ferry.runtime.backends.base import DEVICE_RESIDENT, Feed, GraphBackend, register_backend
from ferry.runtime.backends.device_arrays import DeviceArray, StaticCacheStep, StaticCacheView
from ferry.runtime.bundle import Bundle


class TorchArray(DeviceArray):
    """A graph output kept on the torch backend's device (KV caches, cross-attention K/V).
    Feeding it back to a torch graph does not copy it, so a GPU decode step moves no cache
    through the host."""

    def __init__(self, tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(str(self.tensor.dtype).removeprefix("torch."))

    def take_rows(self, rows: np.ndarray) -> TorchArray:
        import torch

        return TorchArray(self.tensor[torch.as_tensor(rows, device=self.tensor.device)])

    def repeat_rows(self, repeats: int) -> TorchArray:
        return TorchArray(self.tensor.repeat_interleave(repeats, dim=0))

    def host(self) -> np.ndarray:
        return self.tensor.cpu().numpy()


class TorchGraph(GraphBackend):
    """Runs one graph's wrapper module (`ferry.model.graphs`) under `torch.inference_mode`.
    KV outputs stay on the device (`TorchArray`); logits and other outputs come back as
    numpy."""

    def __init__(self, spec: GraphSpec, module, device) -> None:
        super().__init__(spec)
        self.module = module
        self.device = device

    def _infer(self, feed: Feed) -> Feed:
        import torch

        inputs = [_on_device(feed[name], self.device) for name in self.spec.input_names]
        with torch.inference_mode():
            outputs = self.module(*inputs)
        return {tensor.name: TorchArray(out) if tensor.name.startswith(DEVICE_RESIDENT)
                else (out.float() if out.is_floating_point() else out).cpu().numpy().astype(
                    tensor.dtype, copy=False)
                for tensor, out in zip(self.spec.outputs, outputs)}


class TorchCacheView(StaticCacheView, TorchArray):
    """A `TorchStaticCacheStep`'s `present_*`: a view of a torch buffer (`StaticCacheView`)."""

    def __init__(self, buffer, length: int) -> None:
        self.buffer = buffer
        self.length = length

    @property
    def buffer_shape(self) -> tuple[int, int, int, int]:
        return tuple(self.buffer.shape)

    @property
    def tensor(self):
        return self.buffer[:, :, : self.length]

    def take_rows(self, rows: np.ndarray) -> TorchCacheView:
        import torch

        return TorchCacheView(self.buffer[torch.as_tensor(rows, device=self.buffer.device)],
                              self.length)


class TorchStaticCacheStep(StaticCacheStep):
    """The `decoder_step` graph on a static KV cache (`ferry.model.kv_cache`, see
    `StaticCacheStep`): steps neither copy the cache nor change shape. Its `present_*` are
    `TorchCacheView`s of the buffers.

    Args:
        compile: a `torch.compile` mode for the step, e.g. "default" (kernel fusion) or
            "reduce-overhead" (CUDA graphs on a GPU); None runs it eagerly.
    """

    view_type = TorchCacheView

    def __init__(self, spec: GraphSpec, model, device, *, compile: str | None = None) -> None:
        import torch

        from ferry.model.graphs import StaticCacheStepGraph

        super().__init__(spec)
        self.device = device
        self.module = StaticCacheStepGraph(model).eval()
        self.step = self.module if compile is None else torch.compile(self.module, mode=compile)

    def _fresh_view(self, value, shape: tuple[int, int, int, int], cached: int
                    ) -> TorchCacheView:
        import torch

        buffer = torch.zeros(shape, device=self.device)
        buffer[:, :, :cached] = _on_device(value, self.device)
        return TorchCacheView(buffer, cached)

    def _infer(self, feed: Feed) -> Feed:
        import torch

        cached, caches = self.caches(feed)
        buffers = [cache.buffer for cache in caches]
        inputs = []
        for name in self.spec.input_names:
            if name.startswith("past_"):
                continue
            value = feed[name]
            if name == "attention_mask":  # (B, P+T) → (B, capacity)
                value = self.capacity_mask(value, buffers[0].shape[2])
            inputs.append(_on_device(value, self.device))
        position = torch.tensor([cached], device=self.device)
        with torch.inference_mode():
            logits = self.step(*inputs, *buffers, position)[0]  # buffers written in place
        written = cached + feed["input_ids"].shape[1]  # P + T
        return {"logits": logits.float().cpu().numpy(),
                **{name: TorchCacheView(buffer, written)
                   for name, buffer in zip(self.present_names, buffers)}}


def _on_device(value, device):
    """A feed value as a torch tensor on `device` (no copy for this backend's own outputs)."""
    import torch

    if isinstance(value, TorchArray):
        return value.tensor
    return torch.from_numpy(np.asarray(value)).to(device)


def torch_graphs(model, specs: dict[str, GraphSpec], *, static_cache: bool = False,
                 compile: str | None = None) -> dict[str, GraphBackend]:
    """Wrap an in-memory `ferry.model.Transformer` as graph backends (also used by training's
    eval); `static_cache` runs `decoder_step` as a `TorchStaticCacheStep` (`compile`: its
    torch.compile mode)."""
    from ferry.model.graphs import GRAPH_MODULES
    from ferry.model.probes import ProbedGraph

    def module(name: str, spec: GraphSpec):
        graph = GRAPH_MODULES[name](model)
        probes = [n for n in spec.output_names if is_probe(n) or is_attention_map(n)]
        return (ProbedGraph(graph, probes) if probes else graph).eval()

    device = next(model.parameters()).device
    graphs: dict[str, GraphBackend] = {
        name: TorchGraph(spec, module(name, spec), device) for name, spec in specs.items()}
    if static_cache and "decoder_step" in specs:
        graphs["decoder_step"] = TorchStaticCacheStep(specs["decoder_step"], model, device,
                                                 compile=compile)
    return graphs


@register_backend("torch")
def load_torch(bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
               static_cache: bool | None = None, compile: str | None = None
               ) -> dict[str, GraphBackend]:
    """Rebuild the fp32 PyTorch model from the bundle's config and weights on `device`.

    Args:
        static_cache: decode on a static KV cache (`TorchStaticCacheStep`); default: on CUDA only
            (on a CPU it measured the same as the growing cache, ±3 %, for the demo and base
            shapes: the copies it saves are paid back by attending over the buffer's tail).
        compile: `torch.compile` mode for the static-cache decode step: "default" (fused
            kernels) or "reduce-overhead" (CUDA graphs, GPU only); None (default) runs eagerly.
    """
    if precision != "fp32":
        raise FerryError(f"the torch backend is the fp32 reference; precision {precision!r} "
                         "runs on --backend onnxruntime")
    try:
        import torch

        from ferry.model import Transformer, TransformerConfig
        from ferry.model.checkpoint import load_weights, read_weights
    except ImportError as exc:
        raise FerryError(f"the torch backend needs PyTorch ({exc}); install it with "
                         "`pip install 'ferry[train]'` or use --backend onnxruntime") from exc
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise FerryError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FerryError(f"device {device!r} requested but CUDA is not available; use cpu")
    config = TransformerConfig.from_dict(bundle.model_config)
    model = Transformer(config)
    weights = bundle.file("weights")
    load_weights(model, read_weights(weights, config), weights)
    model = model.to(device).eval()
    static_cache = device.startswith("cuda") if static_cache is None else static_cache
    if compile is not None and not static_cache:
        raise FerryError("compile needs static_cache=True: a growing cache changes shape "
                         "every step")
    return torch_graphs(model, bundle.graphs, static_cache=static_cache, compile=compile)
