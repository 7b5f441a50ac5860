"""Probes: the residual stream between a stack's sublayers, recorded by name during a forward.

Bisecting a disagreement between two backends (`ferry compare --bisect`) needs the same
intermediate states from every backend. The torch model records them with forward hooks
(`recording`); the exporter returns them as extra graph outputs once, so the ONNX value that
holds each state carries the state's name, then drops those outputs again
(`ferry.export.onnx_export`): every exported graph names its probes at no cost, and the runtime
marks them as outputs only when it bisects (`ferry.runtime.bisect`).

Names, in the order a forward pass produces them (`{stack}` is `encoder` or `decoder`):

- `probe.{stack}.embeddings`: the embedding layer's output (token + position + segment).
- `probe.{stack}.layer_{i}.attention` (encoder), `.self_attention`, `.cross_attention`
  (decoder), `.ffn`: the residual stream after that sublayer (after its norm when post-norm).
- `probe.{stack}.final_norm`: a pre-norm stack's final norm.

and each layer's attention probabilities (B, nh, T, S), `attention.{stack}.layer_{i}.attention`
(encoder), `.self_attention`, `.cross_attention` (decoder): values of the portable graphs, where
attention is written out (`ferry explain` marks them); fused kernels never form them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ferry.graph_spec import ATTENTION_PREFIX, PROBE_PREFIX, is_attention_map
from ferry.model.attention import MultiHeadAttention

_SUBLAYERS = {"attn_residual": "attention", "self_residual": "self_attention",
              "cross_residual": "cross_attention", "ffn_residual": "ffn"}
_LAYER = re.compile(r"(encoder|decoder)\.layers\.\d+\.(\w+)")
_ATTENTION = re.compile(r"(encoder|decoder)\.layers\.\d+\.(self_attn|cross_attn)\.probabilities")
_STACK_PART = re.compile(r"(encoder|decoder)\.(embed|final_norm)")


def probe_name(module_path: str, module: nn.Module) -> str | None:
    """The probe a module's output is recorded as (by its path in a `Transformer`), with `{}`
    for the layer index that `recording` fills in; None: not probed."""
    if match := _ATTENTION.fullmatch(module_path):
        stack, kind = match.groups()
        kind = ("attention" if stack == "encoder" else "self_attention") if kind == "self_attn" \
            else "cross_attention"
        return f"{ATTENTION_PREFIX}{stack}.layer_{{}}.{kind}"
    if match := _LAYER.fullmatch(module_path):
        stack, part = match.groups()
        return (f"{PROBE_PREFIX}{stack}.layer_{{}}.{_SUBLAYERS[part]}"
                if part in _SUBLAYERS else None)
    if match := _STACK_PART.fullmatch(module_path):
        stack, part = match.groups()
        if isinstance(module, nn.Identity):  # a post-norm stack: the last layer's output
            return None
        return f"{PROBE_PREFIX}{stack}.{'embeddings' if part == 'embed' else part}"
    return None


@contextlib.contextmanager
def recording(model: nn.Module, *, attention: bool = False
              ) -> Iterator[dict[str, torch.Tensor]]:
    """Within this block, every probed module of `model` (a `ferry.model.Transformer`) stores
    its output in the yielded dict under its probe name, in execution order (the k-th run of
    a stack's sublayer kind is layer k's, so layers sharing weights are told apart);
    `attention`: write attention out (instead of SDPA), so that its probabilities are recorded
    too."""
    states: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}  # per probe kind: a stack's layers run in order, so the k-th
    # call is layer k (also when layers share their weights, `config.layer_groups`)
    handles = []
    attentions = ([m for m in model.modules() if isinstance(m, MultiHeadAttention)]
                  if attention else [])
    for module in attentions:
        module.written_out = True
    for path, module in model.named_modules():
        kind = probe_name(path, module)
        if kind is not None:
            def store(_module, _inputs, output, kind=kind):
                name = kind.format(calls.get(kind, 0))  # no `{}`: the name itself
                calls[kind] = calls.get(kind, 0) + 1
                states.pop(name, None)  # re-inserted: dict order is execution order
                states[name] = output

            handles.append(module.register_forward_hook(store))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
        for module in attentions:
            module.written_out = False


class ProbedGraph(nn.Module):
    """A graph wrapper (`ferry.model.graphs`) that also returns the probes `names` after its own
    outputs, each (B, T, D); `names=None`: every probe its forward records, in order (listed in
    `traced_names`)."""

    def __init__(self, graph: nn.Module, names: list[str] | None = None, *,
                 traced_names: list[str] | None = None) -> None:
        super().__init__()
        self.model = graph.model  # registered once, so weights keep the graph's names (model.…)
        object.__setattr__(self, "wrapped", graph)  # the graph wrapper, unregistered
        self.names = names
        # refilled by each call with the probes it returned; torch.export restores a module's
        # attributes after tracing, so an exporter passes (and keeps) a list of its own
        self.traced_names = [] if traced_names is None else traced_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attention = self.names is None or any(is_attention_map(n) for n in self.names)
        with recording(self.model, attention=attention) as states:
            outputs = self.wrapped(*inputs)
        names = list(states) if self.names is None else self.names
        self.traced_names.clear()
        self.traced_names.extend(names)
        missing = [n for n in names if n not in states]
        if missing:
            raise ValueError(f"graph {type(self.wrapped).__name__} records no probes {missing}; "
                             f"it records {list(states)}")
        return (*outputs, *(states[name] for name in names))
