"""The pretraining track's trainer: the model, its optimizers and the compiled forward, with
one training step (over the global batch, all ranks), one validation pass, checkpoint
save/load, and the untimed compile warmup that visits every training stage and then puts
everything back. tracks/pretrain.py drives it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from underpar import dist, ui
from underpar.data.dataset import PreparedData
from underpar.errors import ConfigError
from underpar.eval.bpb import BpbMeter, evaluate_bpb
from underpar.model.attention import check_sdpa_backend
from underpar.model.gpt import build, num_params
from underpar.model.precision import cast_for_bf16_training
from underpar.optim import (build_averager, build_dynamics, build_optimizers, set_lr, set_muon_momentum, set_muon_progress,
                            set_weight_decay)
from underpar.runs import checkpoint
from underpar.quant.qat import qat_switches
from underpar.stages import Stages, Switch

if TYPE_CHECKING:
    from underpar.tracks.pretrain import PretrainConfig


@dataclasses.dataclass
class Progress:
    """Where the timed loop stands: saved in checkpoints, restored on resume."""

    step: int = 0
    elapsed: float = 0.0  # training seconds
    eval_seconds: float = 0.0
    checkpoint_step: int | None = None  # the step of the last checkpoint saved or resumed from


class Trainer:
    """The model, its optimizers and the compiled forward, with one training step and one
    validation pass over them."""

    def __init__(self, cfg: PretrainConfig, env: dist.Env, data: PreparedData):
        train = cfg.train
        self.cfg, self.env = cfg, env
        self.micro_steps = train.tokens_per_step // (env.world_size * train.micro_batch_tokens)
        if self.micro_steps * env.world_size * train.micro_batch_tokens != train.tokens_per_step:
            raise ConfigError(
                f"train.tokens_per_step = {train.tokens_per_step} is not divisible into "
                f"{env.world_size} ranks x micro-batches of train.micro_batch_tokens = {train.micro_batch_tokens}"
            )
        self.luts = data.byte_luts(cfg.model.vocab_size, env.device)
        self.val_tokens = data.val_tokens
        self.loader = data.train_loader(env.rank, env.world_size)
        torch.manual_seed(train.seed)
        self.model = build(cfg.model).to(env.device)
        use_bf16 = env.device.type == "cuda"
        if use_bf16:
            cast_for_bf16_training(self.model)
        check_sdpa_backend(cfg.model.attention, cfg.model.model_dim, env.device, torch.bfloat16 if use_bf16 else torch.float32)
        # train.compile=false is eager throughout: Muon's iteration too (its graphs would otherwise
        # compile inside the timed region, one per new shape)
        self.optimizers = build_optimizers(self.model, cfg.optim, cfg.model.embeddings.tied,
                                           compile=None if train.compile else False)
        self.averager = build_averager(self.model, cfg.optim)  # EMA/SWA/LAWA (optim.averaging); no-op by default
        # the log's weight dynamics, gradient tricks and weight-decay schedule; no-ops by default
        self.dynamics = build_dynamics(self.model, cfg.optim, train.seed)
        # structure and precision switched on during training: depth recurrence, QAT
        self.stages = Stages(self.model.stage_switches() + [Switch(*s) for s in qat_switches(self.model, cfg.quant)])
        self.stages.enter(0.0)
        # Compile the model, then wrap it, as the reference does: dynamo cannot trace DDP's own
        # forward under fullgraph=True. The compile happens on the first call, inside DDP's forward,
        # so dynamo's DDPOptimizer splits the graph at DDP's gradient buckets: each bucket's
        # all-reduce overlaps the rest of the backward (test_pretrain's compiled DDP test).
        # Inductor (torch 2.11, H200) asserts in its mix-order-reduction fusion on the two-lane
        # residual's backward; without that fusion it compiles (benchmarks/results/technique_speed-*).
        options = {"triton.mix_order_reduction": False} if cfg.model.residual.two_lane_start >= 0 else None
        self.forward = torch.compile(self.model, dynamic=False, fullgraph=True, options=options) if train.compile else self.model
        if env.distributed:
            device_ids = [env.local_rank] if use_bf16 else None
            self.forward = DistributedDataParallel(self.forward, device_ids=device_ids, broadcast_buffers=False,
                                                   find_unused_parameters=self.model.leaves_blocks_idle())
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext

    def describe(self) -> str:
        train, env = self.cfg.train, self.env
        return (f"model {num_params(self.model):,} parameters | {env.world_size} process(es) on {env.device} | "
                f"{self.micro_steps} micro-step(s) of {train.micro_batch_tokens:,} tokens per rank per step | "
                f"{self.stages.describe()}")

    def step(self, lr_multiplier: float, momentum: float, progress: float = 0.0) -> float:
        """One optimizer step over the global batch; the mean training loss of all ranks."""
        train, env = self.cfg.train, self.env
        # the schedule's multiplier times the log's LR tricks (bursts, predator-prey): what is logged
        self.lr_multiplier = lr_multiplier * self.dynamics.lr_multiplier(progress)
        set_lr(self.optimizers, self.lr_multiplier)
        set_weight_decay(self.optimizers, self.dynamics.wd_multiplier(progress))
        set_muon_momentum(self.optimizers, momentum)
        set_muon_progress(self.optimizers, progress)  # NuMuon's rank schedule
        self.model.begin_step(train.seed, self.dynamics.steps + 1)  # per-step draws (model.structure.layer_dropout)
        total = torch.zeros((), device=env.device)
        for micro in range(self.micro_steps):
            x, y = self.loader.next_batch(train.micro_batch_tokens, train.seq_len, device=env.device)
            sync = micro == self.micro_steps - 1
            with (self.forward.no_sync() if env.distributed and not sync else nullcontext()), self.autocast():
                loss = self.forward(x, y)
            (loss / self.micro_steps).backward()
            total += loss.detach()
        self.dynamics.after_backward()  # gradient tricks, on the complete (all-reduced) gradients
        if self.cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip_norm)
        for opt in self.optimizers:
            opt.step()
        self.dynamics.after_step(progress)  # weight dynamics
        self.model.zero_grad(set_to_none=True)
        total /= self.micro_steps
        dist.all_reduce_(total)
        return total.item() / env.world_size

    def validate(self, max_tokens: int = 0, label: str = "") -> BpbMeter:
        """val_bpb on the first `max_tokens` validation tokens (0: all of them), across ranks;
        with a `label`, a progress bar (rank 0's share of the windows)."""
        train, env = self.cfg.train, self.env
        tokens = self.val_tokens[: max_tokens + 1] if max_tokens else self.val_tokens
        windows = (len(tokens) - 1) // train.seq_len
        self.model.eval()
        with self.autocast(), ui.progress(disable=not label) as bar:
            task = bar.add_task(label, total=(windows // env.world_size) * train.seq_len, info="")
            meter = evaluate_bpb(self.model.logits, tokens, self.luts, train.seq_len, train.val_batch_tokens // train.seq_len,
                                 rank=env.rank, world_size=env.world_size, progress=lambda n: bar.update(task, advance=n))
        self.model.train()
        return meter

    def save(self, path: Path, state: Progress) -> None:
        """This rank's checkpoint: model, optimizers, loader position, RNG and `state`."""
        checkpoint.save(path, self.model, self.optimizers, self.loader.state_dict(), step=state.step,
                        elapsed=state.elapsed, eval_seconds=state.eval_seconds, world_size=self.env.world_size,
                        averaging=self.averager.state_dict(), dynamics=self.dynamics.state_dict())

    def load(self, path: Path) -> Progress:
        """Restore a checkpoint written by `save`; where the run stood."""
        saved = checkpoint.load(path, self.model, self.optimizers, self.env.world_size)
        self.averager.load_state_dict(saved.get("averaging"))
        self.dynamics.load_state_dict(saved.get("dynamics"))
        self.loader.load_state_dict(saved["loader"])
        checkpoint.set_rng_state(saved["rng"])
        return Progress(saved["step"], saved["elapsed"], saved["eval_seconds"], checkpoint_step=saved["step"])

    def warm_up(self) -> float:
        """train.warmup_steps real steps in each training stage, compiling every graph the loop
        will use; then model, optimizer state, loader, dynamics, RNG and stage are put back
        exactly: the warmup trains nothing. Returns its seconds."""
        started = time.perf_counter()
        self.stages.allow_their_graphs()
        if self.cfg.train.warmup_steps:
            model_state = copy.deepcopy(self.model.state_dict())
            optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
            loader_state = self.loader.state_dict()
            dynamics_state = copy.deepcopy(self.dynamics.state_dict())
            rng = checkpoint.rng_state()
            for start in self.stages.starts:
                self.stages.enter(start)
                for _ in range(self.cfg.train.warmup_steps):
                    self.step(1.0, self.cfg.optim.muon_momentum_warmup_start)
            self.stages.enter(0.0)
            self.model.load_state_dict(model_state)
            for opt, state in zip(self.optimizers, optimizer_states):
                opt.load_state_dict(state)
            self.loader.load_state_dict(loader_state)
            self.dynamics.load_state_dict(dynamics_state)
            checkpoint.set_rng_state(rng)
        return time.perf_counter() - started
