"""PyTorch backend: the reference. Runs the model rebuilt from the bundle's safetensors weights.

torch and `ferry.model` are imported only when this backend is loaded, so `ferry.runtime` itself
never needs torch.
"""

from __future__ import annotations

import numpy as np

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend, register_backend
from ferry.runtime.bundle import Bundle

# Outputs the generation loop only feeds back into the next graph call: they stay on the device.
DEVICE_RESIDENT = ("present_", "cross_")


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

        inputs = [value.tensor if isinstance(value, DeviceTensor)
                  else torch.from_numpy(value).to(self.device)
                  for value in (feed[name] for name in self.spec.input_names)]
        with torch.inference_mode():
            outputs = self.module(*inputs)
        return {name: DeviceTensor(out) if name.startswith(DEVICE_RESIDENT)
                else out.float().cpu().numpy()
                for name, out in zip(self.spec.output_names, outputs)}


def torch_graphs(model, specs: dict[str, GraphSpec]) -> dict[str, GraphBackend]:
    """Wrap an in-memory `ferry.model.Transformer` as graph backends (used by training's eval)."""
    from ferry.model.graphs import GRAPH_MODULES

    device = next(model.parameters()).device
    return {name: TorchGraph(spec, GRAPH_MODULES[name](model).eval(), device)
            for name, spec in specs.items()}


@register_backend("torch")
def load_torch(bundle: Bundle, *, device: str = "cpu", precision: str = "fp32"
               ) -> dict[str, GraphBackend]:
    """Rebuild the fp32 PyTorch model from the bundle's config and weights on `device`."""
    if precision != "fp32":
        raise FerryError(f"the torch backend is the fp32 reference; precision {precision!r} "
                         "runs on --backend onnxruntime")
    try:
        import torch
        from safetensors.torch import load_file

        from ferry.model import Transformer, TransformerConfig
    except ImportError as exc:
        raise FerryError(f"the torch backend needs PyTorch ({exc}); install it with "
                         "`pip install 'ferry[train]'` or use --backend onnxruntime") from exc
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FerryError(f"device {device!r} requested but CUDA is not available; use cpu")
    model = Transformer(TransformerConfig.from_dict(bundle.model_config))
    model.load_state_dict(load_file(str(bundle.file("weights"))))
    model = model.to(device).eval()
    return torch_graphs(model, bundle.graphs)
