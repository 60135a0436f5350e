"""OptimConfig and the optimizers it builds: Muon for block matrices, Adam for the rest,
one param group per learning-rate field, each group carrying its `base_lr`.

Per step the trainer calls set_lr(opts, cfg.schedule(progress)),
set_muon_momentum(opts, muon_momentum_at(cfg, step)) and set_muon_progress(opts, progress)
(NuMuon's rank schedule reads it), and after it the averager's update(step, progress)
(build_averager; a no-op unless optim.averaging is set). The log's training dynamics
(build_dynamics: optim.weight_dynamics, gradient_trick, weight_decay_schedule) scale the LR
and the weight decays (set_weight_decay) and edit gradients and weights around the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from underpar.config import bounded, choice, variant
from underpar.errors import ConfigError
from underpar.optim import gradient_tricks  # noqa: F401  (registers the gradient tricks)
from underpar.optim.averaging import AVERAGING, Averager, AveragingConfig
from underpar.optim.dynamics import GRADIENT_TRICKS, WEIGHT_DECAY_SCHEDULES, WEIGHT_DYNAMICS, Dynamics, HooksConfig
from underpar.optim.groups import assign_params
from underpar.optim.muon import NS_COEFFICIENTS, Muon
from underpar.optim.schedule import SCHEDULES, Schedule, muon_momentum


@dataclass
class OptimConfig:
    # Learning rates, one per parameter group (baseline values). Which tensor gets which is the
    # table in optim/groups.py (`describe_param_table`); tied embeddings use tied_embed_lr, untied
    # ones embed_lr and head_lr. Each is scaled by the schedule's multiplier every step.
    matrix_lr: float = bounded(0.04, 0.0)  # Muon, 2-D matrices inside blocks
    scalar_lr: float = bounded(0.04, 0.0)  # Adam, vectors, scalars and control tensors
    tied_embed_lr: float = bounded(0.05, 0.0)  # Adam, embedding shared with the head
    embed_lr: float = bounded(0.6, 0.0)  # Adam, untied embedding
    head_lr: float = bounded(0.008, 0.0)  # Adam, untied lm head
    # Muon
    muon_momentum: float = bounded(0.95, 0.0, 1.0)
    muon_momentum_warmup_start: float = bounded(0.85, 0.0, 1.0)
    muon_momentum_warmup_steps: int = bounded(500, 0)
    muon_backend_steps: int = bounded(5, 1)
    muon_nesterov: bool = True
    ns_coefficients: str = choice("baseline", NS_COEFFICIENTS)
    # decoupled, on Muon's matrices: p *= 1 - lr * wd before each update (records: 0.04)
    muon_weight_decay: float = bounded(0.0, 0.0)
    # MuonEq-R (PR #1260, on in the records as MUON_ROW_NORMALIZE=1): each row of the update
    # divided by its L2 norm before Newton-Schulz
    muon_row_normalize: bool = False
    # PR #1584's fused step: momentum + Nesterov + normalization + Newton-Schulz as one compiled
    # function per shape stack, momentum buffers kept stacked; the same math (systems only)
    muon_fused: bool = False
    # NuMuon (PR #38): the update is U_k V_k^T of the top-k SVD of the momentum direction, k on a
    # cosine schedule over progress from full rank down to numuon_min_rank, a fraction of the
    # full rank min(rows, cols) (optim/muon.py: numuon_rank). Eager (an SVD per stack)
    numuon: bool = False
    numuon_min_rank: float = bounded(0.25, 0.0, 1.0)
    # Adam
    beta1: float = bounded(0.9, 0.0, 1.0)
    beta2: float = bounded(0.95, 0.0, 1.0)
    adam_eps: float = bounded(1e-8, 0.0)
    # decoupled (AdamW) on every Adam group; 0 = plain Adam, as the baseline (records: 0.04)
    adam_weight_decay: float = bounded(0.0, 0.0)
    # LR multiplier over progress in [0, 1], with its own parameters ([optim.schedule])
    schedule: Schedule = variant(SCHEDULES, "warmdown")
    grad_clip_norm: float = bounded(0.0, 0.0)  # 0 = off
    # weights averaged over training, exported and scored in place of the last ones ([optim.averaging])
    averaging: AveragingConfig = variant(AVERAGING, "none")
    # the 131-run log's training dynamics (optim/dynamics.py, optim/gradient_tricks.py)
    weight_dynamics: HooksConfig = variant(WEIGHT_DYNAMICS, "none")  # on weights after each step
    gradient_trick: HooksConfig = variant(GRADIENT_TRICKS, "none")  # on gradients before the step
    # a multiplier of muon_weight_decay and adam_weight_decay over progress
    weight_decay_schedule: Schedule = variant(WEIGHT_DECAY_SCHEDULES, "constant")

    def check(self) -> None:
        wd_schedule = WEIGHT_DECAY_SCHEDULES.name_of(self.weight_decay_schedule)
        if wd_schedule != "constant" and self.muon_weight_decay == 0 and self.adam_weight_decay == 0:
            raise ConfigError(
                f"optim.weight_decay_schedule = {wd_schedule!r} has no weight decay to scale: set "
                "optim.muon_weight_decay and/or optim.adam_weight_decay (the log's ramps end at 0.01 or 0.04)"
            )
        if self.numuon_min_rank <= 0:
            raise ConfigError(
                f"optim.numuon_min_rank = {self.numuon_min_rank} must be above 0: it is the fraction "
                "of the full rank NuMuon's update keeps at the end of training, in (0, 1]"
            )
        abc = NS_COEFFICIENTS[self.ns_coefficients].abc
        if len(abc) > 1 and self.muon_backend_steps != len(abc):
            raise ConfigError(
                f"optim.ns_coefficients = {self.ns_coefficients!r} is a {len(abc)}-step schedule; "
                f"set optim.muon_backend_steps = {len(abc)} (got {self.muon_backend_steps})"
            )


def build_optimizers(
    model: nn.Module, cfg: OptimConfig, tie_embeddings: bool, compile: bool | None = None
) -> list[torch.optim.Optimizer]:
    """[Muon, Adam] (either left out when it has no parameters), following the param table.
    compile: Muon's Newton-Schulz under torch.compile (None: when the parameters are on CUDA)."""
    groups: dict[tuple[str, str, float], list[nn.Parameter]] = {}
    for a in assign_params(model, cfg, tie_embeddings):
        groups.setdefault((a.rule.optimizer, a.rule.lr_field, a.lr), []).append(a.param)

    def param_groups(kind: str) -> list[dict]:
        return [{"params": ps, "lr": lr, "base_lr": lr, "lr_field": field}
                for (opt, field, lr), ps in groups.items() if opt == kind]

    optimizers: list[torch.optim.Optimizer] = []
    muon_groups = param_groups("muon")
    if muon_groups:
        optimizers.append(
            Muon(
                muon_groups,
                lr=cfg.matrix_lr,
                momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov,
                backend_steps=cfg.muon_backend_steps,
                ns=cfg.ns_coefficients,
                weight_decay=cfg.muon_weight_decay,
                row_normalize=cfg.muon_row_normalize,
                numuon=cfg.numuon,
                numuon_min_rank=cfg.numuon_min_rank,
                fused=cfg.muon_fused,
                compile=compile,
            )
        )
    adam_groups = param_groups("adam")
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        decay = {"weight_decay": cfg.adam_weight_decay} if cfg.adam_weight_decay > 0 else {}
        optimizers.append(
            (torch.optim.AdamW if decay else torch.optim.Adam)(
                adam_groups,
                betas=(cfg.beta1, cfg.beta2),
                eps=cfg.adam_eps,
                **decay,
                **({"fused": True} if on_cuda else {}),
            )
        )
    return optimizers


def build_averager(model: nn.Module, cfg: OptimConfig) -> Averager:
    """The averager `cfg.averaging` names, over every parameter of `model` (its LAWA window
    follows `cfg.schedule`). Call `update(step, progress)` after each optimizer step and
    `apply()` after training."""
    return cfg.averaging.build(list(model.parameters()), cfg.schedule)


def build_dynamics(model: nn.Module, cfg: OptimConfig, seed: int) -> Dynamics:
    """The hooks `cfg.weight_dynamics`, `cfg.gradient_trick` and `cfg.weight_decay_schedule`
    name, over `model`'s parameters as they are now (synaptic scaling keeps these norms), their
    random draws seeded by `seed`. Builds use no global RNG, so the defaults change nothing."""
    return Dynamics(cfg.weight_dynamics.build(model, seed), cfg.gradient_trick.build(model, seed),
                    cfg.weight_decay_schedule)


def set_weight_decay(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """weight_decay = base_weight_decay * multiplier in every group that has a weight decay
    (the configured one is kept as base_weight_decay the first time), as set_lr does the LR."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "weight_decay" in group:
                group["weight_decay"] = group.setdefault("base_weight_decay", group["weight_decay"]) * multiplier


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """lr = base_lr * multiplier in every group (a group without base_lr keeps its first lr)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * multiplier


def set_muon_momentum(optimizers: list[torch.optim.Optimizer], value: float) -> None:
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["momentum"] = value


def set_muon_progress(optimizers: list[torch.optim.Optimizer], progress: float) -> None:
    """Training progress in [0, 1] into every Muon group, for NuMuon's rank schedule (no
    effect on the other Muon variants). Call it every step, as set_muon_momentum."""
    for opt in optimizers:
        if isinstance(opt, Muon):
            for group in opt.param_groups:
                group["progress"] = progress


def muon_momentum_at(cfg: OptimConfig, step: int) -> float:
    return muon_momentum(
        step, cfg.muon_momentum_warmup_steps, cfg.muon_momentum_warmup_start, cfg.muon_momentum
    )
