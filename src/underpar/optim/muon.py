"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalized by a few
Newton-Schulz iterations in bf16, as in the Parameter Golf baseline (from modded-nanogpt).

Matrices of one shape are orthogonalized together, as one batched iteration (compiled on
CUDA): a handful of kernel launches per shape instead of per matrix. On one H100 the
baseline's 54 matrices took ~50 ms a step one at a time, more than a micro-step of compute,
and take ~5 ms batched (docs/BENCHMARKS.md).
Under torch.distributed each rank orthogonalizes its own contiguous slice of every shape's
stack, and one all_reduce of a flat bf16 buffer hands every rank all the updates.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from underpar.registry import Registry

Coefficients = tuple[float, float, float]


@dataclass(frozen=True)
class NSCoefficients:
    """One Newton-Schulz recipe: (a, b, c) per iteration and how X is normalized first.

    A single (a, b, c) is reused for every iteration; a longer list is a per-iteration
    schedule whose length must equal the number of steps.
    X starts as G / (||G||_F * (1 + norm_margin) + eps).
    """

    abc: tuple[Coefficients, ...]
    norm_margin: float = 0.0
    eps: float = 1e-7

    def schedule(self, steps: int) -> tuple[Coefficients, ...]:
        if len(self.abc) == 1:
            return self.abc * steps
        if steps != len(self.abc):
            raise ValueError(
                f"these Newton-Schulz coefficients are a {len(self.abc)}-step schedule; "
                f"got steps={steps}"
            )
        return self.abc


# Named recipes; `OptimConfig.ns_coefficients` picks one. A new recipe is one registration
# (tests/test_registries.py checks that it orthogonalizes).
NS_COEFFICIENTS: Registry[NSCoefficients] = Registry("ns_coefficients")

# The baseline's quintic iteration (3.4445, -4.7750, 2.0315), repeated each step.
BASELINE_NS = NS_COEFFICIENTS.register("baseline")(
    NSCoefficients(abc=((3.4445, -4.7750, 2.0315),), norm_margin=0.0, eps=1e-7)
)

# Polar Express: one tuple per iteration; the 2% margin keeps the top singular value < 1.
POLAR_EXPRESS_NS = NS_COEFFICIENTS.register("polar_express")(NSCoefficients(
    abc=(
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
    norm_margin=2e-2,
    eps=1e-6,
))


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    coefficients: NSCoefficients | Coefficients | Sequence[Coefficients] = BASELINE_NS,
    eps: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Approximately orthogonalize a matrix, or each matrix of a (batch, rows, cols) stack
    (push its singular values towards 1).

    `coefficients` is an NSCoefficients recipe, one (a, b, c) tuple, or a per-iteration
    list of tuples (the latter two use the baseline normalization). `eps` overrides the
    recipe's. `dtype` is bf16 as in the baseline; tests pass float64 for a reference.
    The result is in `dtype`.
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    if not isinstance(coefficients, NSCoefficients):
        abc = (coefficients,) if isinstance(coefficients[0], (int, float)) else coefficients
        coefficients = NSCoefficients(abc=tuple(tuple(t) for t in abc))
    eps = coefficients.eps if eps is None else eps
    return _iterate(G.to(dtype), coefficients.schedule(steps), coefficients.norm_margin, eps)


def _iterate(X: Tensor, schedule: tuple[Coefficients, ...], norm_margin: float, eps: float) -> Tensor:
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + norm_margin) + eps)
    # Iterate on the wide orientation so X @ X.T is the smaller Gram matrix.
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if transposed else X


@functools.cache
def _compiled_iterate():
    """The iteration under torch.compile, as the reference runs its Newton-Schulz: the
    elementwise terms fuse into few kernels (one graph per stack shape)."""
    return torch.compile(_iterate, dynamic=False, fullgraph=True)


def muon_scale(rows: int, cols: int) -> float:
    """The baseline's shape correction: tall matrices get sqrt(rows / cols)."""
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz orthogonalization, for 2-D parameters.

    Group values: lr, momentum (set by the trainer each step during the warmup), nesterov,
    backend_steps (Newton-Schulz iterations), ns (a name in NS_COEFFICIENTS), weight_decay
    (decoupled, as the records apply it: p *= 1 - lr * weight_decay before the update; 0 = off).
    compile: run the iteration under torch.compile; None = when the parameters are on CUDA.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float,
        nesterov: bool = True,
        backend_steps: int = 5,
        ns: str = "baseline",
        compile: bool | None = None,
        weight_decay: float = 0.0,
    ):
        self.compile = compile
        if ns not in NS_COEFFICIENTS:
            raise ValueError(f"unknown ns '{ns}'; choose one of: {', '.join(NS_COEFFICIENTS)}")
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, backend_steps=backend_steps, ns=ns,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0

        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            # The flat buffer holds one stack per shape. Every rank fills only its own slice
            # of each stack; the all_reduce (a sum with zeros elsewhere, so exact) gives each
            # rank the whole set of updates.
            stacks = _stacks(params)
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.bfloat16)
            offset = 0
            for shape, members in stacks:
                size = len(members) * shape.numel()
                region = flat[offset : offset + size].view(len(members), *shape)
                offset += size
                chunk = -(-len(members) // world_size)
                first = rank * chunk
                mine = [(k, params[i]) for k, i in enumerate(members[first : first + chunk], first)
                        if params[i].grad is not None]
                if mine:
                    positions, owned = zip(*mine)
                    update = self._updates(list(owned), group)
                    lo, hi = positions[0], positions[-1] + 1
                    if hi - lo == len(positions):  # no parameter without a grad in between
                        region[lo:hi] = update
                    else:
                        for k, u in zip(positions, update):
                            region[k] = u
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            in_order = [params[i] for _, members in stacks for i in members]
            sizes = [p.numel() for p in in_order]
            by_dtype = {dtype: flat.to(dtype).split(sizes) for dtype in {p.dtype for p in in_order}}
            updates = [by_dtype[p.dtype][j].view_as(p) for j, p in enumerate(in_order)]
            weight_decay = group.get("weight_decay", 0.0)  # absent from older checkpoints
            if weight_decay:
                torch._foreach_mul_(in_order, 1.0 - group["lr"] * weight_decay)
            torch._foreach_add_(in_order, updates, alpha=-group["lr"])
        return loss

    def _updates(self, params: list[Tensor], group: dict) -> Tensor:
        """Orthogonalized updates (bf16, stacked) for same-shape parameters that have grads."""
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        nesterov = torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs
        stack = torch.stack(nesterov).to(torch.bfloat16)
        ns = NS_COEFFICIENTS[group["ns"]]
        compiled = stack.is_cuda if self.compile is None else self.compile
        update = (_compiled_iterate() if compiled else _iterate)(stack, ns.schedule(group["backend_steps"]), ns.norm_margin, ns.eps)
        return update * muon_scale(*params[0].shape)


def _stacks(params: Sequence[Tensor]) -> list[tuple[torch.Size, list[int]]]:
    """(shape, parameter indices) per distinct shape, in first-seen order."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(p.shape, []).append(i)
    return list(by_shape.items())
