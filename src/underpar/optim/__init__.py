"""Optimizers for underpar: Muon + Adam split by a parameter table, LR schedules (a registry
of functions of progress), Muon's momentum warmup and weight averaging (EMA, SWA, LAWA)."""

from underpar.optim.averaging import AVERAGING, EMA, LAWA, SWA, Averager, NoAveraging
from underpar.optim.build import (
    OptimConfig,
    build_averager,
    build_optimizers,
    muon_momentum_at,
    set_lr,
    set_muon_momentum,
    set_muon_progress,
)
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
    "LAWA",
    "NS_COEFFICIENTS",
    "SCHEDULES",
    "SWA",
    "Averager",
    "Breathing",
    "Cosine",
    "Muon",
    "NoAveraging",
    "OptimConfig",
    "Schedule",
    "Tidal",
    "Warmdown",
    "build_averager",
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
]
