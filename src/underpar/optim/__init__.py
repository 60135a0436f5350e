"""Optimizers for underpar: Muon + Adam split by a parameter table, LR schedules (a registry
of functions of progress) and Muon's momentum warmup."""

from underpar.optim.build import (
    OptimConfig,
    build_optimizers,
    muon_momentum_at,
    set_lr,
    set_muon_momentum,
)
from underpar.optim.groups import describe_param_table, format_param_table, param_rules
from underpar.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz
from underpar.optim.schedule import SCHEDULES, Cosine, Schedule, Warmdown, muon_momentum

__all__ = [
    "NS_COEFFICIENTS",
    "SCHEDULES",
    "Cosine",
    "Muon",
    "OptimConfig",
    "Schedule",
    "Warmdown",
    "build_optimizers",
    "describe_param_table",
    "format_param_table",
    "muon_momentum",
    "muon_momentum_at",
    "newton_schulz",
    "param_rules",
    "set_lr",
    "set_muon_momentum",
]
