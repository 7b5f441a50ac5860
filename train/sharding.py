"""How the model is spread over ranks: DDP (a full replica per rank, gradients all-reduced) or
FSDP (PyTorch's `fully_shard`: parameters, gradients and optimizer states sharded over ranks,
gathered layer by layer for each forward and backward), for models whose training state does not
fit one device.

Under FSDP each encoder/decoder layer is its own shard group (its cross-attention another, since
its K/V projection also runs outside the layer's forward) and the root holds the rest
(embeddings, final norms, heads). Evaluation and checkpoints use the full weights: every rank
takes part in gathering them (`full_states`), rank 0 receives them on the CPU, loads them into a
plain copy of the model for evaluation and writes them in the same safetensors format as DDP
runs, so exports and fine-tuning read FSDP checkpoints like any other. The optimizer state is
saved in its full, parameter-name keyed form and re-sharded on resume.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from ferry.errors import FerryError
from ferry.model import Transformer
from ferry.train.distributed import Distributed

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: str, precision: str) -> None:
    if strategy not in STRATEGIES:
        raise FerryError(f"parallel must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "fsdp" and precision == "fp16":
        raise FerryError("parallel=fsdp trains in fp32 or bf16; fp16's gradient scaler is "
                         "not supported with sharded gradients: set precision=bf16")


def distribute(model: Transformer, strategy: str, ranks: Distributed) -> torch.nn.Module:
    """The module to train: `model` itself on one rank, else wrapped (DDP) or sharded in place
    (FSDP, which turns `model` into its own sharded version)."""
    if not ranks.enabled:
        return model
    if strategy == "ddp":
        return DistributedDataParallel(
            model, device_ids=[ranks.local_rank] if ranks.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for stack in (model.encoder, model.decoder):
        for layer in stack.layers if stack is not None else []:
            cross = getattr(layer, "cross_attn", None)
            if cross is not None:
                # the decoder projects the memory's K/V for every layer up front (`key_value`,
                # outside the layer's forward): its own unit, gathered for that call too
                fully_shard(cross)
                register_fsdp_forward_method(cross, "key_value")
            fully_shard(layer)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Synchronise gradients over ranks in this backward only if `enabled` (the last micro-step
    of an accumulated batch)."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile: the wrapped module
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def full_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state, optimizer state), full and on the CPU on rank 0 (empty elsewhere). A
    collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    """Restore an optimizer state saved by `full_states` (every rank holds the full state and
    keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
