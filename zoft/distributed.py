"""Data-parallel ZO on torch.distributed: a step needs only a few scalars from each worker.

Every rank draws the same global batch and the same direction seeds, evaluates its shard
(``indices[rank::world]``), and all-reduces the per-row loss *sums* and the example count; every rank
then holds the same L₊/L₋, computes the same g and applies the identical update. Rank 0 logs,
evaluates and saves. Started by torchrun (gloo on CPU, NCCL on GPU); a plain process is world size 1.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process, initialising the process group on first use under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(spec: str) -> str:
    """Under torchrun with CUDA, each rank takes the GPU of its LOCAL_RANK."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and spec in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return spec


def shard(indices: list[int], rank: int, size: int) -> list[int]:
    return indices[rank::size]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (float64 on the CPU for gloo, on the device for NCCL); identity when alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = t.detach().to(dev, torch.float64).clone()
    dist.all_reduce(x)
    return x.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (e.g. of a flag every rank must agree on); identity when alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = t.detach().to(dev, torch.float64).clone()
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.to(t.device)


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list (all the same length), in rank order; [values] when alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    x = torch.tensor(values, dtype=torch.float64, device=dev)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return [o.tolist() for o in out]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def stop_flag(signum: int | None, device) -> list[torch.Tensor]:
    """Data parallel: the largest signal number any rank got, as a max over ranks queued with the step, so
    that every rank learns of a SIGINT/SIGTERM at the same step and they all stop together (a rank that
    stopped alone would leave the others waiting in the next all-reduce). One process: nothing."""
    if world()[1] == 1:
        return []
    return [all_reduce_max(torch.full((1,), float(signum or 0), dtype=torch.float64, device=device))]
