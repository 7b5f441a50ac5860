"""PyTorch backend: the reference. Runs the model rebuilt from the bundle's safetensors weights.

torch and `ferry.model` are imported only when this backend is loaded, so `ferry.runtime` itself
never needs torch.
"""

from __future__ import annotations

import re

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import (
    DEVICE_RESIDENT,
    Feed,
    GraphBackend,
    cache_capacity,
    register_backend,
)
from ferry.runtime.bundle import Bundle


class DeviceTensor:
    """A graph output kept on the torch backend's device (KV caches, cross-attention K/V),
    numpy-like as far as the generation loop needs: `shape`, `dtype`, `len`, row selection
    (`t[rows]`), `np.repeat(t, n, axis=0)`. Reading it as a numpy array copies it to the host;
    feeding it back to a torch graph does not, so a GPU decode step moves no cache through the
    host."""

    def __init__(self, tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def ndim(self) -> int:
        return self.tensor.dim()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(str(self.tensor.dtype).removeprefix("torch."))

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, rows) -> DeviceTensor:
        import torch

        if isinstance(rows, np.ndarray):
            rows = torch.as_tensor(rows, device=self.tensor.device)
        return DeviceTensor(self.tensor[rows])

    def repeat(self, repeats: int, axis: int | None = None) -> DeviceTensor:
        """`np.repeat(t, repeats, axis=0)`: each row `repeats` times in a row."""
        if axis != 0:
            raise ValueError("a DeviceTensor repeats along axis 0 only")
        return DeviceTensor(self.tensor.repeat_interleave(repeats, dim=0))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self.tensor.cpu().numpy()
        return array if dtype is None else array.astype(dtype)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self).astype(dtype)


class TorchGraph(GraphBackend):
    """Runs one graph's wrapper module (`ferry.model.graphs`) under `torch.inference_mode`.
    KV outputs stay on the device (`DeviceTensor`); logits and other outputs come back as
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
        return {name: DeviceTensor(out) if name.startswith(DEVICE_RESIDENT)
                else out.float().cpu().numpy()
                for name, out in zip(self.spec.output_names, outputs)}


class CacheView(DeviceTensor):
    """A static-cache `present_*` output: the first `length` positions of a (B, nh, capacity, hs)
    buffer that the next step writes into in place. Row selection copies the selected rows'
    whole buffers, so a view keeps its room to grow. Views share their buffer with the step
    that made them: feed each view forward once (as the generation loop does), not an older
    one after a newer."""

    def __init__(self, buffer, length: int) -> None:
        self.buffer = buffer
        self.length = length

    @property
    def tensor(self):
        return self.buffer[:, :, : self.length]

    def __getitem__(self, rows) -> CacheView:
        import torch

        if isinstance(rows, np.ndarray):
            rows = torch.as_tensor(rows, device=self.buffer.device)
        return CacheView(self.buffer[rows], self.length)


class StaticCacheStep(GraphBackend):
    """The `decoder_step` graph on a static KV cache (`ferry.model.kv_cache`): the cache lives in
    preallocated buffers that each step writes in place at a position tensor, so steps neither
    copy the cache nor change shape (capacity doubles when full, up to the model's positions).
    Same feed and outputs as `decoder_step`; its `present_*` are `CacheView`s of the buffers.

    Args:
        compile: a `torch.compile` mode for the step, e.g. "default" (kernel fusion) or
            "reduce-overhead" (CUDA graphs on a GPU); None runs it eagerly.
    """

    def __init__(self, spec: GraphSpec, model, device, *, compile: str | None = None) -> None:
        import torch

        from ferry.model.graphs import StaticCacheStepGraph

        super().__init__(spec)
        self.device = device
        self.module = StaticCacheStepGraph(model).eval()
        self.step = self.module if compile is None else torch.compile(self.module, mode=compile)
        self.max_positions = spec.dims["past_len"].max + 1
        self.past_names = [n for n in spec.input_names if n.startswith("past_")]
        self.present_names = [n.replace("past_", "present_", 1) for n in self.past_names]

    def _buffer(self, value, cached: int):
        """The buffer holding `value`'s `cached` positions with room for one more: its own if it
        is a view with room, else a fresh zeroed one (capacity doubled)."""
        import torch

        if isinstance(value, CacheView) and value.buffer.shape[2] > cached:
            return value.buffer
        batch, heads, _, head_dim = value.shape
        buffer = torch.zeros((batch, heads, cache_capacity(cached, self.max_positions), head_dim),
                             device=self.device)
        buffer[:, :, :cached] = _on_device(value, self.device)
        return buffer

    def _infer(self, feed: Feed) -> Feed:
        import torch

        cached = feed[self.past_names[0]].shape[2]  # P
        buffers = [self._buffer(feed[name], cached) for name in self.past_names]
        inputs = []
        for name in self.spec.input_names:
            if name.startswith("past_"):
                continue
            tensor = _on_device(feed[name], self.device)
            if name == "attention_mask":  # decoder-only: (B, P) → (B, capacity), new slot on
                mask = torch.zeros((len(tensor), buffers[0].shape[2]), dtype=tensor.dtype,
                                   device=self.device)
                mask[:, :cached] = tensor
                mask[:, cached] = 1
                tensor = mask
            inputs.append(tensor)
        position = torch.tensor([cached], device=self.device)
        with torch.inference_mode():
            logits = self.step(*inputs, *buffers, position)[0]  # buffers written in place
        return {"logits": logits.float().cpu().numpy(),
                **{name: CacheView(buffer, cached + 1)
                   for name, buffer in zip(self.present_names, buffers)}}


def _on_device(value, device):
    """A feed value as a torch tensor on `device` (no copy for this backend's own outputs)."""
    import torch

    if isinstance(value, DeviceTensor):
        return value.tensor
    return torch.from_numpy(np.asarray(value)).to(device)


def torch_graphs(model, specs: dict[str, GraphSpec], *, static_cache: bool = False,
                 compile: str | None = None) -> dict[str, GraphBackend]:
    """Wrap an in-memory `ferry.model.Transformer` as graph backends (also used by training's
    eval); `static_cache` runs `decoder_step` as a `StaticCacheStep` (`compile`: its
    torch.compile mode)."""
    from ferry.model.graphs import GRAPH_MODULES

    device = next(model.parameters()).device
    graphs: dict[str, GraphBackend] = {
        name: TorchGraph(spec, GRAPH_MODULES[name](model).eval(), device)
        for name, spec in specs.items()}
    if static_cache and "decoder_step" in specs:
        graphs["decoder_step"] = StaticCacheStep(specs["decoder_step"], model, device,
                                                 compile=compile)
    return graphs


@register_backend("torch")
def load_torch(bundle: Bundle, *, device: str = "cpu", precision: str = "fp32",
               static_cache: bool | None = None, compile: str | None = None
               ) -> dict[str, GraphBackend]:
    """Rebuild the fp32 PyTorch model from the bundle's config and weights on `device`.

    Args:
        static_cache: decode on a static KV cache (`StaticCacheStep`); default: on CUDA only
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
