"""Optimizers for underpar: Muon + Adam split by a parameter table, LR/momentum schedules."""

from underpar.optim.build import (
    OptimConfig,
    build_optimizers,
    lr_schedule,
    muon_momentum_at,
    set_lr,
    set_muon_momentum,
)
from underpar.optim.groups import describe_param_table, format_param_table, param_rules
from underpar.optim.muon import NS_COEFFICIENTS, Muon, newton_schulz
from underpar.optim.schedule import SCHEDULES, lr_multiplier, muon_momentum

__all__ = [
    "NS_COEFFICIENTS",
    "SCHEDULES",
    "Muon",
    "OptimConfig",
    "build_optimizers",
    "describe_param_table",
    "format_param_table",
    "lr_multiplier",
    "lr_schedule",
    "muon_momentum",
    "muon_momentum_at",
    "newton_schulz",
    "param_rules",
    "set_lr",
    "set_muon_momentum",
]
