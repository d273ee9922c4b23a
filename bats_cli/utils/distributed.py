"""Distributed plumbing for the long commands: process group, device, all-reduce, barrier.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank runs the same command; rank 0 alone logs and
writes files (see :mod:`bats_cli.training.runloop`). A single process is ``Dist()``: every helper here is
then a no-op, so callers need no special case.

``bats train`` averages gradients through DistributedDataParallel; ``bats search`` takes two
partial steps per step (α only, then the weights only), so it averages them itself
(:func:`average_gradients`) and checks that the ranks still hold one model
(:func:`rank_divergence`, :func:`rank_digests`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun describes (env vars) when WORLD_SIZE > 1.

    Backend: NCCL on CUDA, gloo on CPU. Already-initialised groups are reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def init_run_device(device_name: str, precision: str) -> tuple[Dist, torch.device]:
    """:func:`init_distributed`, then this process's device (its own GPU under torchrun), precision checked."""
    from bats_cli.utils.runtime import check_precision, select_device

    dist_info = init_distributed(device_name)
    device = select_device(device_name)
    if device.type == "cuda" and dist_info.enabled:
        device = torch.device("cuda", dist_info.local_rank)
    check_precision(device, precision)
    return dist_info, device


def all_sum(values: list[float], dist_info: Dist, device: torch.device) -> list[float]:
    """Element-wise sum over ranks (float64, so counts of images stay exact)."""
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_cat(local: torch.Tensor, dist_info: Dist, device: torch.device) -> torch.Tensor:
    """Every rank's 1-D ``local`` concatenated in rank order, on the CPU (lengths may differ)."""
    if not dist_info.enabled:
        return local.cpu()
    import torch.distributed as dist

    size = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist_info.world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    # all_gather needs one shape on every rank: pad each shard to the longest.
    padded = torch.zeros(max(counts), dtype=local.dtype, device=device)
    padded[: local.numel()] = local.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c].cpu() for p, c in zip(parts, counts)])


def broadcast_buffers(model: nn.Module, dist_info: Dist) -> None:
    """Rank 0's BatchNorm statistics everywhere (each rank updated its own in the last step)."""
    if not dist_info.enabled:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, 0)


def barrier(dist_info: Dist | None = None) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info is not None and not dist_info.enabled:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def agree(ok: bool, dist_info: Dist, device: torch.device) -> bool:
    """True on every rank only if ``ok`` is true on every rank."""
    if not dist_info.enabled:
        return ok
    return all_sum([0.0 if ok else 1.0], dist_info, device)[0] == 0


def average_gradients(params: Iterable[torch.Tensor], dist_info: Dist) -> None:
    """Replace every gradient by its mean over the ranks (one all-reduce per dtype).

    Parameters without a gradient are skipped; they must be the same on every rank (the same
    network and step), or the all-reduce sizes differ and the collective fails.
    """
    if not dist_info.enabled:
        return
    import torch.distributed as dist

    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist_info.world
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset:offset + n].view_as(g))
            offset += n


def rank_divergence(tensor: torch.Tensor, dist_info: Dist, device: torch.device) -> float:
    """The largest ``|tensor - rank 0's tensor|`` over every rank and element (0.0 in one
    process; ``inf`` if any rank holds a non-finite difference)."""
    if not dist_info.enabled:
        return 0.0
    import torch.distributed as dist

    mine = tensor.detach().reshape(-1).to(device=device, dtype=torch.float64)
    ref = mine.clone()
    dist.broadcast(ref, 0)
    diff = (mine - ref).abs().max() if mine.numel() else torch.zeros((), dtype=torch.float64, device=device)
    diff = torch.nan_to_num(diff, nan=float("inf")).reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def rank_digests(text: str, dist_info: Dist, device: torch.device) -> list[str]:
    """Every rank's SHA-256 prefix (15 hex digits) of ``text``, in rank order."""
    mine = hashlib.sha256(text.encode()).hexdigest()[:15]  # 60 bits: one int64
    if not dist_info.enabled:
        return [mine]
    import torch.distributed as dist

    local = torch.tensor([int(mine, 16)], dtype=torch.int64, device=device)
    parts = [torch.zeros_like(local) for _ in range(dist_info.world)]
    dist.all_gather(parts, local)
    return [f"{int(p.item()):015x}" for p in parts]


def broadcast_tensors(tensors: Iterable[torch.Tensor], dist_info: Dist) -> None:
    """Overwrite ``tensors`` (parameters, buffers) in place with rank 0's values."""
    if not dist_info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, 0)


__all__ = ["Dist", "agree", "all_gather_cat", "all_sum", "average_gradients", "barrier",
           "broadcast_buffers", "broadcast_tensors", "init_distributed", "init_run_device",
           "rank_digests", "rank_divergence"]
