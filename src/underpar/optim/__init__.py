"""Optimizers for underpar: Muon + Adam split by a parameter table, LR schedules (a registry
of functions of progress), Muon's momentum warmup, weight averaging (EMA, SWA, LAWA) and the
131-run log's training dynamics (weight dynamics, gradient tricks, weight-decay schedule)."""

from underpar.optim.averaging import AVERAGING, EMA, LAWA, SWA, Averager, NoAveraging
from underpar.optim.build import (
    OptimConfig,
    build_averager,
    build_dynamics,
    build_optimizers,
    muon_momentum_at,
    set_lr,
    set_muon_momentum,
    set_muon_progress,
    set_weight_decay,
)
from underpar.optim.dynamics import GRADIENT_TRICKS, WEIGHT_DECAY_SCHEDULES, WEIGHT_DYNAMICS, Dynamics, Hooks
from underpar.optim.groups import describe_param_table, format_param_table, param_rules
from underpar.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz, numuon_rank
from underpar.optim.schedule import (
    SCHEDULES,
    Breathing,
    Cosine,
    Schedule,
    Tidal,
    Warmdown,
    decay_start,
    muon_momentum,
)

__all__ = [
    "AVERAGING",
    "EMA",
    "GRADIENT_TRICKS",
    "LAWA",
    "NS_COEFFICIENTS",
    "SCHEDULES",
    "SWA",
    "WEIGHT_DECAY_SCHEDULES",
    "WEIGHT_DYNAMICS",
    "Averager",
    "Breathing",
    "Cosine",
    "Dynamics",
    "Hooks",
    "Muon",
    "NoAveraging",
    "OptimConfig",
    "Schedule",
    "Tidal",
    "Warmdown",
    "build_averager",
    "build_dynamics",
    "build_optimizers",
    "decay_start",
    "describe_param_table",
    "format_param_table",
    "muon_momentum",
    "muon_momentum_at",
    "newton_schulz",
    "numuon_rank",
    "param_rules",
    "set_lr",
    "set_muon_momentum",
    "set_muon_progress",
    "set_weight_decay",
]
