"""The parameter table: which optimizer and which learning rate each tensor gets.

An ordered list of rules, first match wins. Rules look at generic properties (ndim, being
inside `blocks.`) and name only the embedding, the head and the control tensors, so a
renamed module leaves a parameter unclaimed (an error) instead of silently moving it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from underpar.errors import ConfigError
from underpar.model import precision

@dataclass(frozen=True)
class Rule:
    name: str
    predicate: Callable[[str, nn.Parameter], bool]
    optimizer: Literal["muon", "adam"]
    lr_field: str  # an OptimConfig field holding the base learning rate


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def is_control(name: str, p: nn.Parameter) -> bool:
    """Small per-channel gains and mixes: Adam at scalar_lr even when 2-D (resid_mix is 2 x dim)."""
    return precision.is_control(name)


def is_embedding(name: str, p: nn.Parameter) -> bool:
    """The token embedding, and the BigramHash table (at the token lr, as the records)."""
    return _top(name) == "tok_emb" or name == "bigram.embed.weight"


def is_head(name: str, p: nn.Parameter) -> bool:
    return _top(name) == "lm_head"


def is_block_matrix(name: str, p: nn.Parameter) -> bool:
    return p.ndim == 2 and _top(name) == "blocks"


def is_adapter(name: str, p: nn.Parameter) -> bool:
    """Depth recurrence's per-layer LoRA adapters (model/recurrence.py): Adam, as PR #38."""
    return _top(name) == "adapters"


def is_input_matrix(name: str, p: nn.Parameter) -> bool:
    """The BigramHash projection: a matrix outside the blocks, Adam at scalar_lr (as the records)."""
    return name == "bigram.proj.weight"


def is_vector_or_scalar(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2


def param_rules(tie_embeddings: bool) -> list[Rule]:
    """The baseline's split, in priority order."""
    return [
        Rule("control", is_control, "adam", "scalar_lr"),
        Rule("embedding", is_embedding, "adam", "tied_embed_lr" if tie_embeddings else "embed_lr"),
        Rule("head", is_head, "adam", "head_lr"),
        Rule("block_matrix", is_block_matrix, "muon", "matrix_lr"),
        Rule("adapter", is_adapter, "adam", "scalar_lr"),
        Rule("input_matrix", is_input_matrix, "adam", "scalar_lr"),
        Rule("scalar", is_vector_or_scalar, "adam", "scalar_lr"),
    ]


@dataclass(frozen=True)
class Assignment:
    param_name: str
    param: nn.Parameter
    rule: Rule
    lr: float  # the rule's lr field times the model's `lr_scale(name)` (1 when it has none)


def assign_params(
    model: nn.Module, cfg: Any, tie_embeddings: bool, rules: list[Rule] | None = None
) -> list[Assignment]:
    """Each trainable parameter with the first rule that claims it and its base lr.

    Raises ConfigError naming every parameter no rule claims."""
    rules = param_rules(tie_embeddings) if rules is None else rules
    out, unclaimed = [], []
    for name, p in model.named_parameters():  # shared (tied) tensors appear once
        if not p.requires_grad:
            continue
        rule = next((r for r in rules if r.predicate(name, p)), None)
        if rule is None:
            unclaimed.append(f"{name} {tuple(p.shape)}")
            continue
        scale = model.lr_scale(name) if hasattr(model, "lr_scale") else 1.0
        out.append(Assignment(name, p, rule, float(getattr(cfg, rule.lr_field)) * scale))
    if unclaimed:
        raise ConfigError(
            "no optimizer rule claims these parameters: "
            + ", ".join(unclaimed)
            + f"; rules: {', '.join(r.name for r in rules)} (see underpar/optim/groups.py)"
        )
    assert len({id(a.param) for a in out}) == len(out), "a parameter was claimed twice"
    return out


def has_head(model: nn.Module) -> bool:
    return any(is_head(name, p) for name, p in model.named_parameters())


def describe_param_table(
    model: nn.Module, cfg: Any, tie_embeddings: bool | None = None
) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(param name, shape, optimizer, lr) for every parameter, in model order.

    tie_embeddings=None infers it: tied when the model has no lm_head parameter."""
    if tie_embeddings is None:
        tie_embeddings = not has_head(model)
    return [
        (a.param_name, tuple(a.param.shape), a.rule.optimizer, a.lr)
        for a in assign_params(model, cfg, tie_embeddings)
    ]


def format_param_table(model: nn.Module, cfg: Any, tie_embeddings: bool | None = None) -> str:
    rows = describe_param_table(model, cfg, tie_embeddings)
    width = max((len(r[0]) for r in rows), default=4)
    lines = [f"{'name':<{width}}  {'shape':<16} {'optimizer':<9} lr"]
    lines += [f"{n:<{width}}  {str(list(s)):<16} {o:<9} {lr:g}" for n, s, o, lr in rows]
    return "\n".join(lines)
