"""The torchrun environment: one process or many, same code. Init/teardown and rank-0 printing."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as torch_dist


@dataclasses.dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Env:
    """Read torchrun's variables; initialize the process group when there is more than one rank.

    device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return Env(rank, world_size, local_rank, dev)


def resolve_device(device: str = "auto", index: int = 0) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cpu" or "cuda"."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    return torch.device("cuda", index) if use_cuda else torch.device("cpu")


def teardown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce when distributed; a no-op on one process."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op={"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}[op])
    return tensor


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)
