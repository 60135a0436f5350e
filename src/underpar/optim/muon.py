"""Muon: momentum SGD whose update for each 2-D matrix is orthogonalized by a few
Newton-Schulz iterations in bf16, as in the Parameter Golf baseline (from modded-nanogpt).

Matrices of one shape are orthogonalized together, as one batched iteration (compiled on
CUDA): a handful of kernel launches per shape instead of per matrix. On one H100 the
baseline's 54 matrices took ~50 ms a step one at a time, more than a micro-step of compute,
and take ~5 ms batched (docs/BENCHMARKS.md).
Under torch.distributed each rank orthogonalizes its own contiguous slice of every shape's
stack, and one all_reduce of a flat bf16 buffer hands every rank all the updates.

Options next to the faithful step (each off by default): MuonEq-R row normalization before
the orthogonalization, NuMuon's rank-k update on a cosine rank schedule (PR #38), and PR #1584's
fused step (momentum + Nesterov + normalization + Newton-Schulz as one compiled function per
shape stack, over momentum buffers kept stacked).
"""

from __future__ import annotations

import functools
import math
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


def row_normalized(d: Tensor, eps: float = 1e-7) -> Tensor:
    """MuonEq-R (PR #1260; the records' MUON_ROW_NORMALIZE): every row of every matrix divided
    by its L2 norm (at least eps) before the orthogonalization, so each output unit's row of
    the update enters it with the same weight. float32."""
    d = d.float()
    return d / d.norm(dim=-1, keepdim=True).clamp_min(eps)


def numuon_rank(progress: float, min_rank: float, rows: int, cols: int) -> int:
    """NuMuon's k at a training progress in [0, 1]: the relative rank falls on a half cosine
    from 1 (full rank) to `min_rank`, and k = ceil(relative rank * min(rows, cols)), at least 1.

    `min_rank` is a fraction of the full rank, not a count: PR #38 names it NUMUON_R_MIN with no
    unit, and the NuMuon paper (arXiv 2603.03597) schedules a relative rank r(t) in (0, 1] with
    k = ceil(r * min(d_in, d_out)); a fraction also means one setting for every matrix shape.
    """
    full = min(rows, cols)
    progress = min(max(progress, 0.0), 1.0)
    relative = min_rank + (1.0 - min_rank) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(1, min(full, math.ceil(relative * full - 1e-9)))


def low_rank_orthogonal(d: Tensor, rank: int) -> Tensor:
    """NuMuon's update direction: U_k V_k^T from the SVD d = U S V^T (per matrix of a stack,
    float32), the top-`rank` singular directions with their singular values set to 1. At full
    rank it is the exact polar factor that Newton-Schulz approximates."""
    U, _, Vh = torch.linalg.svd(d.float(), full_matrices=False)
    return U[..., :rank] @ Vh[..., :rank, :]


def _nesterov(grad: Tensor, buf: Tensor, momentum: float | Tensor) -> Tensor:
    # A float: torch.add's alpha, the unfused step's very operation (so eager fused = unfused
    # bit for bit). A 0-D tensor, as the compiled step gets it so that the momentum warmup does
    # not recompile: the same sum, written out.
    return torch.add(grad, buf, alpha=momentum) if isinstance(momentum, float) else grad + momentum * buf


def fused_step(
    grads: list[Tensor],
    buf: Tensor,
    momentum: float | Tensor,
    nesterov: bool,
    row_normalize: bool,
    schedule: tuple[Coefficients, ...] | None,
    norm_margin: float,
    eps: float,
) -> Tensor:
    """PR #1584's fused Muon step for one stack of same-shape matrices: momentum update of the
    stacked buffer `buf` (in place), Nesterov extrapolation, optional row normalization and the
    Newton-Schulz iteration, in bf16. One graph under torch.compile. `schedule=None` stops
    before Newton-Schulz and returns the (float) direction, for NuMuon's SVD."""
    grad = torch.stack(grads)
    buf.mul_(momentum).add_(grad)
    d = _nesterov(grad, buf, momentum) if nesterov else buf
    if row_normalize:
        d = row_normalized(d)
    if schedule is None:
        return d
    return _iterate(d.to(torch.bfloat16), schedule, norm_margin, eps)


@functools.cache
def _compiled_fused_step():
    return torch.compile(fused_step, dynamic=False, fullgraph=True)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then Newton-Schulz orthogonalization, for 2-D parameters.

    Group values: lr, momentum (set by the trainer each step during the warmup), nesterov,
    backend_steps (Newton-Schulz iterations), ns (a name in NS_COEFFICIENTS), weight_decay
    (decoupled, as the records apply it: p *= 1 - lr * weight_decay before the update; 0 = off),
    row_normalize (MuonEq-R before the orthogonalization), numuon (orthogonalize by a rank-k SVD
    instead, k from `numuon_rank(progress, numuon_min_rank, ...)`) and progress (training
    progress in [0, 1], set by the trainer each step with set_muon_progress; NuMuon reads it).
    compile: run the iteration under torch.compile; None = when the parameters are on CUDA.
    fused: PR #1584's step, `fused_step` per shape stack over stacked momentum buffers (each
    parameter's state["momentum_buffer"] is a view of its stack, so checkpoints keep their form).
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
        row_normalize: bool = False,
        numuon: bool = False,
        numuon_min_rank: float = 0.25,
        fused: bool = False,
    ):
        self.compile = compile
        self.fused = fused
        if ns not in NS_COEFFICIENTS:
            raise ValueError(f"unknown ns '{ns}'; choose one of: {', '.join(NS_COEFFICIENTS)}")
        if not 0.0 < numuon_min_rank <= 1.0:
            raise ValueError(f"numuon_min_rank is a fraction of the full rank in (0, 1], got {numuon_min_rank}")
        defaults = dict(
            lr=lr, momentum=momentum, nesterov=nesterov, backend_steps=backend_steps, ns=ns,
            weight_decay=weight_decay, row_normalize=row_normalize, numuon=numuon,
            numuon_min_rank=numuon_min_rank, progress=0.0,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")
        # fused: (parameter ids) -> (stacked momentum, its per-parameter views), and the 0-D
        # momentum the compiled step reads (a tensor, so a new value does not recompile)
        self._stacked: dict[tuple[int, ...], tuple[Tensor, list[Tensor]]] = {}
        self._momentum_scalar = torch.zeros((), dtype=torch.float32)

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
        ns = NS_COEFFICIENTS[group["ns"]]
        schedule = ns.schedule(group["backend_steps"])
        compiled = params[0].is_cuda if self.compile is None else self.compile
        # absent from older checkpoints' groups
        row_normalize, numuon = group.get("row_normalize", False), group.get("numuon", False)
        if self.fused:
            step = _compiled_fused_step() if compiled else fused_step
            momentum = self._momentum_scalar.fill_(group["momentum"]) if compiled else float(group["momentum"])
            update = step([p.grad for p in params], self._momentum_stack(params), momentum, group["nesterov"],
                          row_normalize, None if numuon else schedule, ns.norm_margin, ns.eps)
        else:
            direction = self._direction(params, group)
            if row_normalize:
                direction = row_normalized(direction)
            update = None if numuon else (_compiled_iterate() if compiled else _iterate)(
                direction.to(torch.bfloat16), schedule, ns.norm_margin, ns.eps)
        if numuon:
            rank = numuon_rank(group.get("progress", 0.0), group["numuon_min_rank"], *params[0].shape)
            update = low_rank_orthogonal(update if self.fused else direction, rank).to(torch.bfloat16)
        return update * muon_scale(*params[0].shape)

    def _direction(self, params: list[Tensor], group: dict) -> Tensor:
        """The unfused momentum step: per-parameter buffers updated with foreach ops, then the
        (Nesterov) directions stacked."""
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
        return torch.stack(nesterov)

    def _momentum_stack(self, params: list[Tensor]) -> Tensor:
        """The stacked momentum buffer of these parameters. Built on first use, and again when
        a parameter's buffer is no longer a view of it (a load_state_dict, a first fused step
        after unfused ones), by copying the buffers in: no gather or scatter on other steps."""
        key = tuple(id(p) for p in params)
        stack, views = self._stacked.get(key, (None, []))
        if stack is None or any(self.state[p].get("momentum_buffer") is not v for p, v in zip(params, views)):
            stack = torch.stack([self.state[p].get("momentum_buffer", torch.zeros_like(p.grad)) for p in params])
            views = list(stack.unbind(0))
            mine = set(key)  # stacks these parameters were in before are stale now
            self._stacked = {k: v for k, v in self._stacked.items() if mine.isdisjoint(k)}
            for p, v in zip(params, views):
                self.state[p]["momentum_buffer"] = v
            self._stacked[key] = (stack, views)
        return stack


def _stacks(params: Sequence[Tensor]) -> list[tuple[torch.Size, list[int]]]:
    """(shape, parameter indices) per distinct shape, in first-seen order."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(p.shape, []).append(i)
    return list(by_shape.items())
