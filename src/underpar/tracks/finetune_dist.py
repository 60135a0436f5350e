"""Fine-tuning on several processes (torchrun): data parallelism (DDP) or sharded parameters,
gradients and AdamW state (FSDP2), chosen by `train.parallel`. One process runs the plain loop
with no wrapper, so the same config runs on a CPU.

- Data: every global batch is the one a single process draws (grad_accum_steps micro-batches
  of micro_batch_size sequences); rank r takes micro-batches r, r + W, ... of it, so each rank
  accumulates grad_accum_steps / W whole micro-batches and the losses match one process.
- DDP: the wrapper is rebuilt at every block start (LISA, chaos: what trains changes), so its
  reducer holds exactly the parameters with `requires_grad` in that block and overlaps their
  all-reduce with the backward; parameters are broadcast from rank 0 only at the first wrap.
- At each block start every rank hashes its layout and the names and shapes of the parameters
  that train; the hashes are all-gathered and a mismatch stops the run on every rank (a chaos
  plan or a LISA draw that differs between ranks would silently train different networks).
- FSDP2 (`fully_shard` per decoder layer, then the root): full and LISA fine-tuning (FSDP2
  follows `requires_grad` at each unshard and reduce-scatters only the gradients that exist).
  Chaos is refused: hoisting and slicing replace layers and weights every block, which the
  per-layer sharded units cannot follow. The saved model is the gathered full state dict.
- The training loss logged is the mean over ranks; peak memory the maximum over ranks; only
  rank 0 writes the run directory, saves the model and evaluates after training.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
from torch import nn

from underpar import dist
from underpar.errors import ConfigError, TrainingError
from underpar.model.surgery import original_layers

if TYPE_CHECKING:
    from underpar.tracks.finetune import FinetuneConfig
    from underpar.tracks.finetune_methods import Controller

PARALLEL = ("ddp", "fsdp")


def check(cfg: FinetuneConfig, env: dist.Env, pretrained: bool) -> None:
    """What a multi-process run needs of the config (a no-op on one process)."""
    if not env.distributed:
        return
    accum, world = cfg.train.grad_accum_steps, env.world_size
    if accum % world:
        raise ConfigError(f"train.grad_accum_steps = {accum} is not a multiple of the {world} processes: each "
                          f"process takes whole micro-batches of every step; set it to a multiple of {world} "
                          f"(e.g. {world * max(1, accum // world)}, lowering train.micro_batch_size to keep the batch)")
    if cfg.train.parallel == "fsdp":
        if cfg.eval.before:
            raise ConfigError("eval.before = true with train.parallel = fsdp: no process holds the whole model to "
                              "generate with; evaluate the base model with `underpar eval task` instead")
        if pretrained and cfg.eval.tasks and not cfg.train.save:
            raise ConfigError("train.parallel = fsdp evaluates the saved model (rank 0 reloads it): set "
                              "train.save = true, or eval.tasks = []")


class Parallel:
    """The wrapper state of one run. `forward` is what the loop calls (the DDP wrapper or the
    model itself); the model keeps its own parameters for everything else (held-out loss,
    saving, evaluation)."""

    def __init__(self, cfg: FinetuneConfig, env: dist.Env, model: nn.Module):
        self.env, self.model = env, model
        self.kind = cfg.train.parallel if env.distributed else "none"
        self.accum = cfg.train.grad_accum_steps // env.world_size  # micro-batches per rank and step
        self.forward: nn.Module = model
        self.wrapped = 0  # DDP wraps so far
        self.checks = 0  # layout agreements so far
        if self.kind == "fsdp":
            shard(model)

    def micro_batches(self, stream: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's share of one process's micro-batch stream (micro-batch i on rank i % W)."""
        return itertools.islice(stream, self.env.rank, None, self.env.world_size)

    def begin_block(self, layout: Any, controller: Controller) -> None:
        """At the first step and at every block start: ranks agree on what trains; DDP rewraps."""
        if not self.env.distributed:
            return
        agree_on_layout(self.env, layout, self.model, self.checks)
        self.checks += 1
        if self.kind == "ddp":
            self.forward = self.model
            if self.wrapped == 0:
                gc.freeze()  # what exists now stays; the collections below only scan what is newer
            gc.collect()  # the old wrapper sits in a reference cycle: free its reducer, hooks and buckets now
            device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; 2.11 has only that name
                warnings.simplefilter("ignore", FutureWarning)
                # gradients live in DDP's buckets (no second copy of what trains)
                self.forward = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True,
                    init_sync=self.wrapped == 0)
            self.wrapped += 1
            reduced = {id(p) for p in self.forward.parameters() if p.requires_grad}
            trains = {id(p) for p in controller.trainable_parameters()}
            if reduced != trains:  # DDP registers what requires grad: never expected to differ
                raise TrainingError(f"DDP reduces {len(reduced)} parameters but {len(trains)} train in this block")

    def sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces at the last micro-batch of a step only (FSDP reduce-scatters each one)."""
        if self.kind == "ddp" and not last_micro:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def mean(self, value: float) -> float:
        """The mean of a per-rank value over ranks (the step's training loss)."""
        if not self.env.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.env.device)
        return float(dist.all_reduce_(tensor)) / self.env.world_size

    def max(self, value: int | None) -> int | None:
        """The maximum over ranks (peak memory)."""
        if value is None or not self.env.distributed:
            return value
        return int(dist.all_reduce_(torch.tensor([value], device=self.env.device), op="max"))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """FSDP: the full (gathered, on CPU) state dict on rank 0 (every rank must call it);
        otherwise None (the model's own parameters are whole)."""
        if self.kind != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.forward = None
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def release(self) -> None:
        """Drop the DDP wrapper (its buckets) after training."""
        if self.kind == "ddp":
            self.forward = self.model
            gc.collect()
            gc.unfreeze()


def shard(model: nn.Module) -> None:
    """FSDP2: each decoder layer is one sharded unit, the root (embeddings, norm, head) another."""
    from torch.distributed.fsdp import fully_shard

    for layer in original_layers(model):
        fully_shard(layer)
    fully_shard(model)


def layout_hash(layout: Any, model: nn.Module) -> str:
    """sha256 of the block's layout and the names and shapes of the parameters that train."""
    trains = [(name, list(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
    text = json.dumps({"layout": layout, "trains": trains}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def agree_on_layout(env: dist.Env, layout: Any, model: nn.Module, block: int) -> None:
    """Every rank must train the same network in this block: all-gather the layout hashes."""
    mine = layout_hash(layout, model)
    hashes: list[Any] = [None] * env.world_size
    torch_dist.all_gather_object(hashes, mine)
    if len(set(hashes)) > 1:
        differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise TrainingError(f"block {block}: ranks {differ} would train a different network than rank 0 (layout "
                            f"or trainable parameters differ; is the method's seed the same on every rank?)")
