"""DistributedDataParallel on the engine torch already ships: `torchrun --nproc_per_node N -m ifnet train`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything here is a no-op, so the trainer
has one code path. Backend: nccl on CUDA, gloo on CPU (what CI tests with 2 processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and os.environ.get("IFNET_DDP_CPU") != "1"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(True, rank, world, local_rank, device)


def wrap(model: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around ``model``; ``find_unused_parameters`` when some trainable weights get no gradient in
    a step (e.g. the CNN when training on cached features)."""
    if not info.enabled:
        return model
    ids = [info.local_rank] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_float(value: float, info: DistInfo, src: int = 0) -> float:
    """Rank ``src``'s value on every rank (e.g. the validation score that decides early stopping)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.broadcast(t, src)
    return float(t.item())


def gather_floats(value: float, info: DistInfo) -> list[float]:
    """``value`` from every rank, in rank order (a single-element list without DDP)."""
    if not info.enabled:
        return [value]
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    out = [torch.zeros_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if ``flag`` holds on every rank (a skipped step must be skipped everywhere)."""
    if not info.enabled:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
