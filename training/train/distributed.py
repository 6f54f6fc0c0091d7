"""Data-parallel training under torchrun: joining the process group, DDP, and keeping replicas
identical (rank 0's BatchNorm statistics everywhere, a weight checksum at the end)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("atop.train")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(threads: int | None = None) -> DistInfo:
    """Join the process group if started by torchrun (gloo on CPU, nccl on GPU)."""
    if threads:
        torch.set_num_threads(threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return DistInfo(0, 1, device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) everywhere, so replicas end identical."""
    if info.world_size > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def check_replicas(model: nn.Module, info: DistInfo) -> None:
    """Fail loudly if the replicas' weights differ (they must not, after DDP + sync_buffers)."""
    if info.world_size == 1:
        return
    flat = torch.cat([t.detach().flatten().double() for t in model.state_dict().values()])
    mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), dtype=torch.float64)).sum()])
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    if any(not torch.equal(e, every[0]) for e in every):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {[e.tolist() for e in every]}")
    if info.main:
        log.info("replica check: %d tensors identical on %d ranks", len(model.state_dict()), info.world_size)


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if info.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(values, t, strict=True)}


def rank0_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (a decision only rank 0 can take, such as stopping when its
    robust check sees a collapse: every rank must leave the loop at the same step)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(t, 0)
    return bool(t.item())


def finish_distributed(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
