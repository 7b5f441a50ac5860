"""PyTorch backend: the reference. Runs the model rebuilt from the bundle's safetensors weights.

torch and `ferry.model` are imported only when this backend is loaded, so `ferry.runtime` itself
never needs torch.
"""

from __future__ import annotations

from ferry.errors import FerryError
from ferry.graph_spec import GraphSpec
from ferry.runtime.backends.base import Feed, GraphBackend, register_backend
from ferry.runtime.bundle import Bundle


class TorchGraph(GraphBackend):
    """Runs one graph's wrapper module (`ferry.model.graphs`) under `torch.inference_mode`."""

    def __init__(self, spec: GraphSpec, module, device) -> None:
        super().__init__(spec)
        self.module = module
        self.device = device

    def _infer(self, feed: Feed) -> Feed:
        import torch

        inputs = [torch.from_numpy(feed[name]).to(self.device) for name in self.spec.input_names]
        with torch.inference_mode():
            outputs = self.module(*inputs)
        return {name: out.float().cpu().numpy()
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
