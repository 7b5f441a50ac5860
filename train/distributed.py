"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node N -m ferry train …`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them training runs as one process. NCCL on
GPUs, gloo on CPUs. Only rank 0 writes files; every rank reads its own slice of each global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ferry.errors import FerryError


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (identity in one process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: str) -> Distributed:
    """Join the torchrun process group if there is one; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise FerryError(f"device {device!r} requested but CUDA is not available; set device: cpu")
    if world_size > 1:
        if wants_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
        chosen = torch.device(f"cuda:{local_rank}") if wants_cuda else torch.device("cpu")
    else:
        chosen = torch.device(device)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)
