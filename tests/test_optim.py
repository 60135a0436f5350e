"""Muon + Newton-Schulz, the parameter table, schedules, and the sharded distributed step."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from underpar.config import override, validate
from underpar.errors import ConfigError
from underpar.optim import (
    Muon,
    OptimConfig,
    build_optimizers,
    Cosine,
    Warmdown,
    describe_param_table,
    muon_momentum,
    muon_momentum_at,
    newton_schulz,
    set_lr,
    set_muon_momentum,
)
from underpar.optim.muon import BASELINE_NS, NS_COEFFICIENTS, POLAR_EXPRESS_NS, muon_scale


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conditioned_square(n: int, seed: int = 0) -> torch.Tensor:
    # A square Gaussian has singular values near 0 that 5 iterations cannot lift (each
    # step grows a small one by ~a); use a matrix with condition number 10 instead.
    u, _ = torch.linalg.qr(_randn(n, n, seed=seed))
    v, _ = torch.linalg.qr(_randn(n, n, seed=seed + 1))
    return u @ torch.diag(torch.logspace(-1, 0, n)) @ v.T


MATRICES = {
    "tall": lambda: _randn(64, 32, seed=1),
    "wide": lambda: _randn(32, 64, seed=2),
    "square": lambda: _conditioned_square(128, seed=3),
}


# ---------------------------------------------------------------------------------------
# Newton-Schulz


@pytest.mark.parametrize("kind", MATRICES)
@pytest.mark.parametrize(
    "ns, band", [("baseline", (0.6, 1.25)), ("polar_express", (0.82, 1.18))]
)
def test_newton_schulz_near_orthogonal(kind: str, ns: str, band: tuple[float, float]) -> None:
    G = MATRICES[kind]()
    X = newton_schulz(G, 5, NS_COEFFICIENTS[ns])
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    sv = torch.linalg.svdvals(X.double())
    # Measured on these inputs: baseline 0.68..1.14, polar express 0.86..1.15.
    assert band[0] < sv.min() and sv.max() < band[1], (sv.min(), sv.max())


@pytest.mark.parametrize("kind", MATRICES)
@pytest.mark.parametrize("ns", ["baseline", "polar_express"])
def test_newton_schulz_matches_float64_iteration(kind: str, ns: str) -> None:
    G = MATRICES[kind]()
    coeffs = NS_COEFFICIENTS[ns]

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x.double() - ref).norm() / ref.norm())

    ref = newton_schulz(G.double(), 5, coeffs, dtype=torch.float64)
    # Same iteration: float32 agrees with float64 almost to float32 precision.
    assert rel(newton_schulz(G, 5, coeffs, dtype=torch.float32), ref) < 1e-5
    # bf16 (the real path): ~4e-3 after one step, accumulating to 2.5-5% after five.
    assert rel(newton_schulz(G, 5, coeffs), ref) < 0.08
    if ns == "baseline":
        ref1 = newton_schulz(G.double(), 1, coeffs, dtype=torch.float64)
        assert rel(newton_schulz(G, 1, coeffs), ref1) < 1e-2


@pytest.mark.slow
def test_compiled_muon_stays_within_bf16_of_the_float64_step() -> None:
    """Muon(compile=True) (the CUDA default) on the CPU: each update is the float64 iteration's
    to bf16 accuracy, like the eager path's (measured: compiled 1.6-2.4%, eager 2.4-3.2%)."""
    params = [nn.Parameter(_randn(*s, seed=70 + i)) for i, s in enumerate([(24, 16), (16, 40), (24, 16)])]
    start = [p.detach().clone() for p in params]
    grads = [_randn(*p.shape, seed=80 + i) for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Muon(params, lr=1.0, momentum=0.0, nesterov=False, compile=True).step()
    for p, p0, g in zip(params, start, grads):
        ref = newton_schulz(g.double(), 5, BASELINE_NS, dtype=torch.float64) * muon_scale(*g.shape)
        update = (p0 - p.detach()).double()
        assert float((update - ref).norm() / ref.norm()) < 0.05


def test_newton_schulz_baseline_by_hand() -> None:
    # The baseline's own formulation, written out: normalize, transpose tall, iterate.
    G = _randn(48, 16, seed=4)
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.double() / (G.double().norm() + 1e-7)
    X = X.T
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    ours = newton_schulz(G, 5, (a, b, c), dtype=torch.float64)
    torch.testing.assert_close(ours, X.T, rtol=1e-6, atol=1e-9)
    assert newton_schulz(G, 5, BASELINE_NS, dtype=torch.float64).allclose(ours)


def test_newton_schulz_per_iteration_schedule_length() -> None:
    with pytest.raises(ValueError, match="5-step"):
        newton_schulz(_randn(8, 8), 4, POLAR_EXPRESS_NS)


# ---------------------------------------------------------------------------------------
# Muon


def test_muon_scale() -> None:
    assert muon_scale(64, 32) == pytest.approx(math.sqrt(2))
    assert muon_scale(32, 64) == 1.0
    assert muon_scale(16, 16) == 1.0


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_two_steps_by_hand(shape: tuple[int, int]) -> None:
    lr, m = 0.05, 0.9
    p = nn.Parameter(_randn(*shape, seed=5))
    p0 = p.detach().clone()
    g1, g2 = _randn(*shape, seed=6), _randn(*shape, seed=7)
    opt = Muon([p], lr=lr, momentum=m)

    def expected_update(nesterov_grad: torch.Tensor) -> torch.Tensor:
        u = newton_schulz(nesterov_grad, 5, BASELINE_NS) * math.sqrt(max(1, shape[0] / shape[1]))
        return u.float()

    # torch.add(x, y, alpha=k) is x + k * y in one rounding, as the optimizer computes it.
    p.grad = g1.clone()
    opt.step()
    buf = g1  # 0 * m + g1
    p1 = torch.add(p0, expected_update(torch.add(g1, buf, alpha=m)), alpha=-lr)
    assert torch.equal(p.detach(), p1)

    p.grad = g2.clone()
    opt.step()
    buf = m * buf + g2
    p2 = torch.add(p1, expected_update(torch.add(g2, buf, alpha=m)), alpha=-lr)
    assert torch.equal(p.detach(), p2)


@pytest.mark.parametrize("shape", [(24, 16), (16, 40)])
def test_newton_schulz_on_a_stack_is_the_per_matrix_iteration(shape: tuple[int, int]) -> None:
    stack = torch.stack([_randn(*shape, seed=40 + k) for k in range(3)])
    batched = newton_schulz(stack, 5, BASELINE_NS)
    for k in range(3):
        assert torch.equal(batched[k], newton_schulz(stack[k], 5, BASELINE_NS))


def test_muon_stack_skips_a_parameter_without_grad() -> None:
    """Three same-shape matrices, the middle one without a grad: it stays as it was, and the
    others move exactly as they would alone."""
    params = [nn.Parameter(_randn(16, 24, seed=50 + k)) for k in range(3)]
    alone = [nn.Parameter(p.detach().clone()) for p in params]
    grads = [_randn(16, 24, seed=60 + k) for k in range(3)]
    opt = Muon(params, lr=0.05, momentum=0.9)
    for k in (0, 2):
        params[k].grad = grads[k].clone()
        alone[k].grad = grads[k].clone()
        Muon([alone[k]], lr=0.05, momentum=0.9).step()
    opt.step()
    assert torch.equal(params[1].detach(), _randn(16, 24, seed=51))
    assert torch.equal(params[0].detach(), alone[0].detach()) and torch.equal(params[2].detach(), alone[2].detach())
    assert params[1] not in opt.state


def test_muon_without_nesterov_uses_buffer() -> None:
    p = nn.Parameter(_randn(16, 16, seed=8))
    p0 = p.detach().clone()
    g = _randn(16, 16, seed=9)
    opt = Muon([p], lr=0.1, momentum=0.5, nesterov=False)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.detach(), torch.add(p0, newton_schulz(g, 5).float(), alpha=-0.1))


def test_muon_rejects_vectors_and_unknown_ns() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([nn.Parameter(torch.ones(4))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="baseline"):
        Muon([nn.Parameter(torch.ones(4, 4))], lr=0.1, momentum=0.9, ns="nope")


@pytest.mark.parametrize("ns", ["baseline", "polar_express"])
def test_muon_reduces_a_regression_loss(ns: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=False)
    target = _randn(24, 16, seed=10) * 0.5
    x = _randn(256, 16, seed=11)
    opt = Muon(layer.parameters(), lr=0.1, momentum=0.9, ns=ns)

    def loss_fn() -> torch.Tensor:
        return ((layer(x) - x @ target.T) ** 2).mean()

    start, steps = loss_fn().item(), 100
    for step in range(steps):
        # Muon's step has a fixed spectral size, so it needs the warmdown to settle.
        set_lr([opt], Warmdown(warmdown_fraction=0.5)(step / steps))
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert loss_fn().item() < 1e-3 * start  # measured ~1e-5 * start


# ---------------------------------------------------------------------------------------
# parameter table and builders


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_q = nn.Linear(dim, dim, bias=False)
        self.attn.q_gain = nn.Parameter(torch.ones(2))
        self.mlp = nn.Module()
        self.mlp.fc = nn.Linear(dim, 2 * dim, bias=False)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.ones(2, dim))  # 2-D, but a control tensor


class ToyGPT(nn.Module):
    def __init__(self, tie: bool, dim: int = 8, vocab: int = 32):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([ToyBlock(dim), ToyBlock(dim)])
        self.skip_weights = nn.Parameter(torch.ones(1, dim))
        self.lm_head = None if tie else nn.Linear(dim, vocab, bias=False)


def _table(model: nn.Module, tie: bool) -> dict[str, tuple[str, float]]:
    rows = describe_param_table(model, OptimConfig(), tie)
    return {name: (opt, lr) for name, _, opt, lr in rows}


@pytest.mark.parametrize("tie", [True, False])
def test_param_table(tie: bool) -> None:
    model = ToyGPT(tie)
    table = _table(model, tie)
    assert table["tok_emb.weight"] == ("adam", 0.05 if tie else 0.6)
    assert table["blocks.0.attn.c_q.weight"] == ("muon", 0.04)
    assert table["blocks.1.mlp.fc.weight"] == ("muon", 0.04)
    assert table["blocks.0.attn_scale"] == ("adam", 0.04)
    assert table["blocks.0.attn.q_gain"] == ("adam", 0.04)
    assert table["blocks.0.resid_mix"] == ("adam", 0.04)
    assert table["skip_weights"] == ("adam", 0.04)
    assert ("lm_head.weight" in table) == (not tie)
    if not tie:
        assert table["lm_head.weight"] == ("adam", 0.008)
    assert len(table) == len(list(model.parameters()))
    # tie_embeddings inferred from the absence of an lm_head
    inferred = describe_param_table(model, OptimConfig())
    assert inferred == describe_param_table(model, OptimConfig(), tie)


@pytest.mark.parametrize("tie", [True, False])
def test_build_optimizers(tie: bool) -> None:
    model = ToyGPT(tie)
    cfg = OptimConfig()
    muon, adam = build_optimizers(model, cfg, tie)
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.Adam)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    expected = {id(m.weight) for b in model.blocks for m in (b.attn.c_q, b.mlp.fc)}
    assert muon_ids == expected
    claimed = [id(p) for opt in (muon, adam) for g in opt.param_groups for p in g["params"]]
    assert sorted(claimed) == sorted(id(p) for p in model.parameters())  # each exactly once
    lrs = {g["lr_field"]: g["base_lr"] for g in adam.param_groups}
    expected_lrs = {"scalar_lr": 0.04, "tied_embed_lr": 0.05} if tie else {
        "scalar_lr": 0.04, "embed_lr": 0.6, "head_lr": 0.008}
    assert lrs == expected_lrs
    assert adam.defaults["betas"] == (0.9, 0.95) and adam.defaults["eps"] == 1e-8
    assert muon.param_groups[0]["momentum"] == 0.95 and muon.param_groups[0]["ns"] == "baseline"

    set_lr([muon, adam], 0.5)
    assert all(g["lr"] == 0.5 * g["base_lr"] for o in (muon, adam) for g in o.param_groups)
    set_muon_momentum([muon, adam], 0.85)
    assert muon.param_groups[0]["momentum"] == 0.85
    assert "momentum" not in adam.param_groups[0]


def test_unclaimed_parameter_errors() -> None:
    model = ToyGPT(tie=True)
    model.bigram = nn.Linear(8, 8, bias=False)  # a matrix outside blocks: no rule
    with pytest.raises(ConfigError, match=r"bigram\.weight"):
        build_optimizers(model, OptimConfig(), True)

    renamed = nn.Module()
    renamed.layers = nn.ModuleList([ToyBlock(8)])  # `blocks` renamed: must not go silent
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.c_q\.weight"):
        describe_param_table(renamed, OptimConfig(), True)


def test_optim_config() -> None:
    cfg = OptimConfig()
    validate(cfg)
    validate(override(cfg, "ns_coefficients=polar_express"))
    with pytest.raises(ConfigError, match="polar_express"):
        validate(override(cfg, "ns_coefficients=nope"))
    with pytest.raises(ConfigError, match="muon_backend_steps = 5"):
        validate(override(override(cfg, "ns_coefficients=polar_express"), "muon_backend_steps=4"))
    with pytest.raises(ConfigError, match="choose one of: warmdown, cosine, tidal, breathing"):
        override(cfg, "schedule=nope")
    with pytest.raises(ConfigError, match="must not exceed 1"):
        validate(override(override(cfg, "schedule.warmup_fraction=0.5"), "schedule.warmdown_fraction=0.6"))
    with pytest.raises(ConfigError, match="optim.schedule.warmdown_fraction = 1.5 is out of range"):
        validate(override(cfg, "schedule.warmdown_fraction=1.5"), prefix="optim")
    with pytest.raises(ConfigError, match="'schedule.hold_fraction' is a setting of breathing, not of 'warmdown'"):
        override(cfg, "schedule.hold_fraction=0.1")
    with pytest.raises(ConfigError, match="unknown config key 'schedule.nope'"):
        override(cfg, "schedule.nope=0.1")
    cosine = override(override(cfg, "schedule=cosine"), "schedule.min_lr_ratio=0.1")
    validate(cosine)
    assert cosine.schedule == Cosine(min_lr_ratio=0.1)


# ---------------------------------------------------------------------------------------
# schedules


def test_warmdown_schedule() -> None:
    sched = Warmdown(warmdown_fraction=0.2)
    assert sched(0.0) == 1.0
    assert sched(0.8) == pytest.approx(1.0)
    assert sched(0.9) == pytest.approx(0.5)
    assert sched(0.95) == pytest.approx(0.25)
    assert sched(1.0) == 0.0
    flat = Warmdown(warmdown_fraction=0.0)
    assert flat(0.5) == 1.0 and flat(1.0) == 1.0  # no warmdown
    grid = [i / 200 for i in range(201)]
    values = [sched(p) for p in grid]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmdown_schedule_with_warmup() -> None:
    sched = Warmdown(warmdown_fraction=0.2, warmup_fraction=0.1)
    assert sched(0.0) == 0.0
    assert sched(0.05) == pytest.approx(0.5)
    assert sched(0.1) == pytest.approx(1.0)
    assert sched(0.5) == 1.0
    values = [sched(i / 200) for i in range(201)]
    peak = values.index(1.0)
    assert all(a <= b for a, b in zip(values[:peak], values[1 : peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :]))


def test_cosine_schedule() -> None:
    sched = Cosine(warmup_fraction=0.1, min_lr_ratio=0.2)
    assert sched(0.0) == 0.0 and sched(0.05) == pytest.approx(0.5) and sched(0.1) == 1.0
    assert sched(0.55) == pytest.approx(0.6)  # halfway down the cosine: (1 + 0.2) / 2
    assert sched(1.0) == pytest.approx(0.2) and sched(2.0) == sched(1.0) and sched(-1.0) == 0.0
    values = [sched(i / 200) for i in range(20, 201)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert Cosine(warmup_fraction=0.0)(0.0) == 1.0 and Cosine(warmup_fraction=1.0)(1.0) == 0.0


def test_schedule_from_config() -> None:
    sched = override(OptimConfig(), "schedule.warmdown_fraction=0.5").schedule
    assert sched(0.0) == 1.0 and sched(0.75) == pytest.approx(0.5) and sched(1.0) == 0.0


def test_muon_momentum_warmup() -> None:
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(250) == pytest.approx(0.90)
    assert muon_momentum(500) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
    assert muon_momentum(0, warmup_steps=0) == 0.95
    assert muon_momentum_at(OptimConfig(), 0) == pytest.approx(0.85)


# ---------------------------------------------------------------------------------------
# distributed: the sharded step equals the single-process step

# Stacks by shape over 2 ranks: three (24, 16) (rank 0 owns 2, rank 1 owns 1), one (16, 40)
# and one (32, 32) (rank 0 owns each, rank 1 none).
SHAPES = [(24, 16), (16, 40), (24, 16), (32, 32), (24, 16)]


def _params_and_grads() -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    params = [nn.Parameter(_randn(*s, seed=20 + i)) for i, s in enumerate(SHAPES)]
    grads = [
        [_randn(*s, seed=30 + 10 * step + i) for i, s in enumerate(SHAPES)] for step in range(2)
    ]
    return params, grads


def _run_muon(params: list[nn.Parameter], grads: list[list[torch.Tensor]], fused: bool = False) -> list[torch.Tensor]:
    opt = Muon(params, lr=0.04, momentum=0.95, fused=fused)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _dist_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for fused in (False, True):
            result = _run_muon(*_params_and_grads(), fused=fused)
            torch.save(result, os.path.join(out_dir, f"rank{rank}{'-fused' if fused else ''}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_muon_matches_single_process(tmp_path, one_thread) -> None:
    single = _run_muon(*_params_and_grads())
    # fork: the children inherit the imports and one_thread's single thread (no OpenMP pool)
    mp.start_processes(_dist_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for name in ("rank0", "rank1", "rank0-fused", "rank1-fused"):  # the fused step (eager) too
        sharded = torch.load(tmp_path / f"{name}.pt")
        for a, b in zip(single, sharded):
            assert torch.equal(a, b), name  # each slot is written by one rank; the sum is exact
