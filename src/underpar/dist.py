"""The torchrun environment: one process or many, same code. Init/teardown, rank-0 printing,
and the collectives the tracks use (barrier, agreement, broadcast, a sharded map), each a
no-op on one process."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")
R = TypeVar("R")


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


def print0(*args: Any, **kwargs: Any) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def barrier(env: Env) -> None:
    """Wait for every rank."""
    if env.distributed:
        torch_dist.barrier()


@contextlib.contextmanager
def main_first(env: Env) -> Iterator[None]:
    """Rank 0 runs the block first (filling caches: downloads, converted models, generated
    data), then the other ranks run it and only read what rank 0 left. Each rank passes one
    barrier, before or after its turn."""
    if not env.is_main:
        barrier(env)
    yield
    if env.is_main:
        barrier(env)


def agree(env: Env, flag: bool) -> bool:
    """True on every rank if it is True on any rank (e.g. stop when any rank's clock says so)."""
    if not env.distributed:
        return flag
    tensor = torch.tensor(int(flag), device=env.device)
    all_reduce_(tensor, op="max")
    return bool(tensor.item())


def broadcast_object(env: Env, obj: T, src: int = 0) -> T:
    """Rank `src`'s `obj` (any picklable value) on every rank; other ranks may pass None."""
    if not env.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def sharded_map(env: Env, items: Sequence[T], fn: Callable[[T], R],
                on_round: Callable[[list[tuple[int, R]]], None] | None = None) -> list[R]:
    """[fn(item) for item in items], with item i computed on rank i % world_size. Work goes in
    rounds of world_size items; after each round every rank gathers that round's (index,
    result) pairs, so all ranks return the whole list, and `on_round(pairs)` sees each round
    as it completes (e.g. to append results to a file). The results must be picklable."""
    results: list[Any] = [None] * len(items)
    for start in range(0, len(items), env.world_size):
        i = start + env.rank
        mine = (i, fn(items[i])) if i < len(items) else None
        gathered = [mine]
        if env.distributed:
            gathered = [None] * env.world_size
            torch_dist.all_gather_object(gathered, mine)
        done = [pair for pair in gathered if pair is not None]
        for index, result in done:
            results[index] = result
        if on_round is not None:
            on_round(done)
    return results
