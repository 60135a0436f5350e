"""Optimizer techniques of issue 12: the tidal and breathing schedules and the LR floor at known
progress points, Muon and Adam weight decay, Muon's variants (the fused step equals the unfused
one, MuonEq-R, NuMuon's rank schedule and update), and weight averaging (EMA, SWA, LAWA): its math,
that it leaves compiled graphs alone, that the averaged weights are the exported ones, and
that a killed and resumed run averages exactly as an uninterrupted one."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from underpar import config as cfglib
from underpar.errors import ConfigError, UnderparError
from underpar.optim import (
    EMA,
    LAWA,
    SWA,
    Breathing,
    Muon,
    NoAveraging,
    OptimConfig,
    Tidal,
    Warmdown,
    build_averager,
    build_optimizers,
    decay_start,
    set_muon_progress,
)
from underpar.quant import artifact
from underpar.runs.rundir import RunDir
from underpar.tracks import pretrain as track

from test_pretrain import data_dir, final_losses, micro_config, run_killed_at_step  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------
# schedules


def _log_tidal(progress: float) -> float:
    """The 131-run log's lr_mul under TIDAL_LR=1, restated from its formula."""
    if progress < 0.382:
        return 0.1 + 0.9 * progress / 0.382
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (progress - 0.382) / 0.618))


def test_tidal_is_the_logs_golden_ratio_schedule() -> None:
    tidal = Tidal()
    assert tidal(0.0) == pytest.approx(0.1)
    assert tidal(0.191) == pytest.approx(0.55)  # half way up the warmup
    assert tidal(0.382) == 1.0
    assert tidal(0.691) == pytest.approx(0.55)  # half way down the cosine: (1 + 0.1) / 2
    assert tidal(1.0) == pytest.approx(0.1) and tidal(2.0) == tidal(1.0)
    for i in range(101):
        assert tidal(i / 100) == pytest.approx(_log_tidal(i / 100), abs=1e-12)
    # the log's F8: a 30% warmup; and no floor
    assert Tidal(warmup_fraction=0.3)(0.3) == 1.0 and Tidal(min_lr_ratio=0.0)(0.0) == 0.0
    assert Tidal(warmup_fraction=0.0)(0.0) == 1.0 and Tidal(warmup_fraction=1.0)(1.0) == 1.0


def test_breathing_inhales_holds_and_exhales() -> None:
    breathing = Breathing()
    assert breathing.inhale_fraction == pytest.approx(4 / 19) and breathing.hold_fraction == pytest.approx(7 / 19)
    assert breathing(0.0) == pytest.approx(0.1)
    assert breathing(2 / 19) == pytest.approx(0.55)
    assert breathing(4 / 19) == 1.0 and breathing(0.4) == 1.0 and breathing(11 / 19 - 1e-9) == 1.0
    assert breathing(15 / 19) == pytest.approx(0.55)  # half way through the exhale
    assert breathing(1.0) == pytest.approx(0.1)
    assert Breathing(inhale_fraction=0.5, hold_fraction=0.5)(1.0) == 1.0  # nothing left to exhale
    with pytest.raises(ConfigError, match="must not exceed 1"):
        cfglib.validate(Breathing(inhale_fraction=0.6, hold_fraction=0.6))


def test_warmdown_lr_floor_as_the_records_apply_it() -> None:
    floored = Warmdown(warmdown_fraction=0.2, min_lr_ratio=0.1)
    assert floored(0.5) == 1.0 and floored(0.9) == pytest.approx(0.5)
    assert floored(0.97) == pytest.approx(0.15)
    assert floored(0.99) == 0.1 and floored(1.0) == 0.1  # max((1 - p) / 0.2, 0.1)
    plain = Warmdown(warmdown_fraction=0.2)
    assert plain(1.0) == 0.0
    for i in range(201):  # a floor of 0 is the baseline's formula, bit for bit
        remaining = 1.0 - i / 200
        assert plain(i / 200) == (min(1.0, remaining / 0.2) if remaining < 0.2 else 1.0)


def test_schedules_from_config_and_their_decay_start() -> None:
    cfg = cfglib.resolve("pretrain", None, ["optim.schedule=tidal", "optim.schedule.min_lr_ratio=0.05"])
    assert cfg.optim.schedule == Tidal(min_lr_ratio=0.05)
    assert cfglib.from_dict(type(cfg), cfglib.to_dict(cfg)) == cfg
    cfg = cfglib.resolve("pretrain", None, ["optim.schedule=breathing", "optim.schedule.hold_fraction=0.2"])
    assert cfg.optim.schedule == Breathing(hold_fraction=0.2)
    assert decay_start(Warmdown(warmdown_fraction=0.25)) == pytest.approx(0.75, abs=1e-3)
    assert decay_start(Tidal()) == pytest.approx(0.382, abs=1e-4)
    assert decay_start(Breathing()) == pytest.approx(11 / 19, abs=1e-4)
    assert decay_start(Warmdown(warmdown_fraction=0.0)) == 1.0  # never decays


def test_cosine_cycles_restart_and_one_cycle_is_cosine() -> None:
    from underpar.optim.schedule import Cosine, CosineCycles

    two = CosineCycles(warmup_fraction=0.0)
    assert two(0.0) == 1.0 and two(0.25) == pytest.approx(0.5) and two(0.5 - 1e-9) == pytest.approx(0.0, abs=1e-9)
    assert two(0.5) == 1.0 and two(0.75) == pytest.approx(0.5) and two(1.0) == pytest.approx(0.0, abs=1e-12)
    default = CosineCycles()  # the cosine's 3% warmup first, then two cycles over the remaining 97%
    assert default(0.015) == pytest.approx(0.5) and default(0.515) == 1.0 and decay_start(default) == pytest.approx(0.515)
    for cosine in (Cosine(), Cosine(warmup_fraction=0.1, min_lr_ratio=0.2)):
        one = CosineCycles(cycles=1, warmup_fraction=cosine.warmup_fraction, min_lr_ratio=cosine.min_lr_ratio)
        assert all(one(i / 100) == cosine(i / 100) for i in range(101))


def test_golden_floor_is_the_cosine_with_a_0382_floor() -> None:
    from underpar.optim.schedule import SCHEDULES, Cosine, GoldenFloor

    golden = GoldenFloor()
    assert golden(1.0) == pytest.approx(0.382) and golden(0.03) == 1.0
    assert all(golden(i / 100) == Cosine(min_lr_ratio=0.382)(i / 100) for i in range(101))
    assert SCHEDULES.name_of(golden) == "golden_floor" and SCHEDULES.name_of(Cosine()) == "cosine"
    cfg = cfglib.resolve("pretrain", None, ["optim.schedule=golden_floor"])
    assert cfg.optim.schedule == golden and cfglib.from_dict(type(cfg), cfglib.to_dict(cfg)) == cfg


def test_whale_dive_dives_three_times_and_ends_on_the_floor() -> None:
    from underpar.optim.schedule import WhaleDive

    whale = WhaleDive()
    third = 1 / 3
    assert whale(0.0) == 1.0 and whale(0.9 * third / 2) == pytest.approx(0.55)  # half way down the first dive
    assert whale(0.9 * third) == pytest.approx(0.1)  # the bottom, then a sharp climb over 10% of the cycle
    assert whale(0.95 * third) == pytest.approx(0.55) and whale(third) == pytest.approx(1.0)
    assert whale(third + 0.45 * third) == pytest.approx(0.55)  # the second dive is the first one again
    assert whale(2 * third) == pytest.approx(1.0) and whale(2.5 * third) == pytest.approx(0.55)  # the last: no climb
    assert whale(1.0) == pytest.approx(0.1) and decay_start(whale) == pytest.approx(2 / 3)
    assert WhaleDive(dives=1)(0.5) == pytest.approx(0.55)  # one dive: tidal's cosine without its warmup
    no_climb = WhaleDive(recovery_fraction=0.0)  # warm restarts
    assert no_climb(third - 1e-9) == pytest.approx(0.1, abs=1e-6) and no_climb(third) == pytest.approx(1.0)


def test_circadian_is_cosine_times_day_and_night() -> None:
    from underpar.optim.schedule import Circadian, Cosine

    circadian, cosine = Circadian(), Cosine(min_lr_ratio=0.1)
    assert circadian(0.0) == 0.0 and circadian(0.015) == pytest.approx(0.5 * (1 - 0.15 * (1 - math.cos(0.12 * math.pi))))
    assert circadian(0.125) == pytest.approx(0.7 * cosine(0.125))  # the first midnight (4 days)
    assert circadian(0.25) == pytest.approx(cosine(0.25)) and circadian(0.5) == pytest.approx(cosine(0.5))
    assert circadian(1.0) == pytest.approx(0.1)
    assert all(Circadian(amplitude=0.0)(i / 100) == cosine(i / 100) for i in range(101))


def test_cosmological_cooling_is_one_over_sqrt_one_plus_alpha_t() -> None:
    from underpar.optim.schedule import CosmologicalCooling

    cooling = CosmologicalCooling()
    assert cooling(0.0) == 1.0 and cooling(1.0) == pytest.approx(0.1)  # alpha 99: the log's 0.1 floor at the end
    assert cooling(3 / 99) == pytest.approx(0.5)  # 1 / sqrt(4)
    assert CosmologicalCooling(alpha=3.0)(1.0) == pytest.approx(0.5) and CosmologicalCooling(alpha=0.0)(0.7) == 1.0
    values = [cooling(i / 100) for i in range(101)]
    assert all(a > b for a, b in zip(values, values[1:]))  # it only cools


# ---------------------------------------------------------------------------------------
# weight decay


def _muon_step(weight_decay: float, lr: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    p = nn.Parameter(start.clone())
    p.grad = grad.clone()
    Muon([p], lr=lr, momentum=0.95, weight_decay=weight_decay).step()
    return start, p.detach()


def test_muon_weight_decay_is_decoupled_before_the_update() -> None:
    start, plain = _muon_step(0.0)
    _, decayed = _muon_step(0.5)
    update = plain - start  # -lr * orthogonalized step
    torch.testing.assert_close(decayed, start * (1 - 0.05 * 0.5) + update, rtol=0, atol=1e-6)
    assert torch.equal(_muon_step(0.0)[1], plain)  # off: the baseline step


def test_weight_decay_fields_reach_the_optimizers() -> None:
    model = nn.Module()
    model.tok_emb = nn.Embedding(8, 4)
    model.blocks = nn.ModuleList([nn.Linear(4, 4, bias=False)])
    muon, adam = build_optimizers(model, OptimConfig(), tie_embeddings=True)
    assert muon.param_groups[0]["weight_decay"] == 0.0 and type(adam) is torch.optim.Adam
    cfg = cfglib.override(cfglib.override(OptimConfig(), "muon_weight_decay=0.04"), "adam_weight_decay=0.04")
    muon, adam = build_optimizers(model, cfg, tie_embeddings=True)
    assert muon.param_groups[0]["weight_decay"] == 0.04
    assert type(adam) is torch.optim.AdamW and adam.param_groups[0]["weight_decay"] == 0.04
    # a Muon state saved before weight decay existed still steps (as no decay)
    state = muon.state_dict()
    for group in state["param_groups"]:
        del group["weight_decay"]
    muon.load_state_dict(state)
    model.blocks[0].weight.grad = torch.ones(4, 4)
    muon.step()


def test_every_parameter_group_has_its_own_lr_field() -> None:
    import dataclasses

    from underpar.optim import param_rules

    fields = {f.name: f for f in dataclasses.fields(OptimConfig)}
    used = {rule.lr_field for tie in (True, False) for rule in param_rules(tie)}
    assert used == {"matrix_lr", "scalar_lr", "tied_embed_lr", "embed_lr", "head_lr"}
    for name in used:
        assert fields[name].metadata["range"] == (0.0, None), name
    cfg = cfglib.resolve("pretrain", None, ["optim.matrix_lr=0.11", "optim.embed_lr=0.8", "optim.head_lr=0.01"])
    assert (cfg.optim.matrix_lr, cfg.optim.embed_lr, cfg.optim.head_lr) == (0.11, 0.8, 0.01)


# ---------------------------------------------------------------------------------------
# Muon variants: the fused step (PR #1584), MuonEq-R row normalization, NuMuon (PR #38)

# Same-shape stacks of three and of one, sizes with and without a multiple of the SIMD width.
_VARIANT_SHAPES = [(24, 16), (16, 40), (24, 16), (7, 5), (24, 16)]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _conditioned(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Singular values 0.1..1 (condition number 10), so the Newton-Schulz iteration converges."""
    n = min(rows, cols)
    u, _ = torch.linalg.qr(_randn(rows, n, seed=seed))
    v, _ = torch.linalg.qr(_randn(cols, n, seed=seed + 1))
    return u @ torch.diag(torch.logspace(-1, 0, n)) @ v.T


def _run_pair(steps: int, between=None, **muon) -> tuple[list[nn.Parameter], list[nn.Parameter], Muon, Muon]:
    """The unfused and the fused Muon over copies of the same weights and grads for `steps`
    steps, the momentum changing each step (the warmup); `between(step, fused_opt)` may
    meddle with the fused optimizer before a step."""
    plain = [nn.Parameter(_randn(*s, seed=i)) for i, s in enumerate(_VARIANT_SHAPES)]
    fused = [nn.Parameter(p.detach().clone()) for p in plain]
    a = Muon(plain, lr=0.04, momentum=0.85, weight_decay=0.1, **muon)
    b = Muon(fused, lr=0.04, momentum=0.85, weight_decay=0.1, fused=True, **muon)
    for step in range(steps):
        if between is not None:
            b = between(step, b) or b
        for opt, params in ((a, plain), (b, fused)):
            opt.param_groups[0]["momentum"] = 0.85 + 0.02 * step
            for i, p in enumerate(params):
                # step 1: the middle one of the three (24, 16) matrices has no grad
                p.grad = None if (step == 1 and i == 2) else _randn(*p.shape, seed=100 + 10 * step + i)
            opt.step()
    return plain, fused, a, b


@pytest.mark.parametrize("nesterov, row_normalize", [(True, False), (False, True)])
def test_fused_muon_step_equals_the_unfused_step_bit_for_bit(nesterov: bool, row_normalize: bool) -> None:
    """Eager fp32, as on a CPU: the same weights and momentum buffers, exactly, over steps with a
    changing momentum, weight decay, and a step where one matrix of a stack has no grad."""
    plain, fused, a, b = _run_pair(4, nesterov=nesterov, row_normalize=row_normalize)
    assert all(torch.equal(p, q) for p, q in zip(plain, fused))
    assert all(torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"]) for p, q in zip(plain, fused))


def test_fused_muon_keeps_its_momentum_stacked() -> None:
    """Each matrix's momentum buffer is a view of its shape's stack, and the stack stays the
    same tensor from step to step (no gather or scatter); a loaded state (new tensors) is
    copied into a new stack once, and the run goes on exactly as the unfused one."""
    stacks = []

    def watch(step: int, opt: Muon) -> Muon | None:
        stacks.append({key: stack.data_ptr() for key, (stack, _) in opt._stacked.items()})
        if step == 4:  # a round trip through a state dict, as warmup's restore or a resume
            fresh = Muon(opt.param_groups[0]["params"], lr=0.04, momentum=0.85, fused=True)
            fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
            return fresh

    plain, fused, a, b = _run_pair(6, between=watch)
    assert all(torch.equal(p, q) for p, q in zip(plain, fused))
    three = tuple(id(fused[i]) for i in (0, 2, 4))
    # built at step 0; one without a grad at step 1 stacks the other two; built again at step 2,
    # then the same stack through step 3
    assert three not in stacks[2] and stacks[3][three] == stacks[4][three]
    stack, views = b._stacked[three]
    for k, i in enumerate((0, 2, 4)):
        buf = b.state[fused[i]]["momentum_buffer"]
        assert buf is views[k] and buf.data_ptr() == stack[k].data_ptr()


def test_compiled_fused_step_is_one_graph_that_the_momentum_does_not_recompile() -> None:
    """The compiled step traces whole (fullgraph) and compiles once while the momentum warmup
    changes its value every step (a 0-D tensor, not a constant); it matches the eager step.
    aot_eager keeps this test fast: inductor's code is checked on the GPU (benchmarks/optimizer_step.py)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from underpar.optim.muon import BASELINE_NS, fused_step

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fused_step, backend=counter, fullgraph=True, dynamic=False)
    buf, ref_buf, momentum = torch.zeros(3, 24, 16), torch.zeros(3, 24, 16), torch.zeros(())
    for step in range(4):
        grads = [_randn(24, 16, seed=10 * step + i) for i in range(3)]
        m = 0.85 + 0.03 * step
        update = compiled(grads, buf, momentum.fill_(m), True, True, BASELINE_NS.schedule(5), 0.0, 1e-7)
        ref = fused_step(grads, ref_buf, m, True, True, BASELINE_NS.schedule(5), 0.0, 1e-7)
        assert torch.equal(buf, ref_buf)
        assert float((update.float() - ref.float()).norm() / ref.float().norm()) < 1e-2  # measured 0
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_muon_on_cuda_stays_within_bf16_of_the_unfused_step() -> None:
    """On CUDA both steps are compiled (inductor): the fused one writes `grad + m * buf` where
    the unfused one uses add's alpha, and inductor may contract a multiply-add, so they agree to
    bf16 precision, not bit for bit; the fp32 momentum buffers to fp32 rounding."""
    plain = [nn.Parameter(_randn(*s, seed=i).cuda()) for i, s in enumerate([(256, 512), (512, 512), (256, 512)])]
    fused = [nn.Parameter(p.detach().clone()) for p in plain]
    a, b = Muon(plain, lr=0.04, momentum=0.85), Muon(fused, lr=0.04, momentum=0.85, fused=True)
    for step in range(3):
        for opt, params in ((a, plain), (b, fused)):
            opt.param_groups[0]["momentum"] = 0.85 + 0.05 * step
            for i, p in enumerate(params):
                p.grad = _randn(*p.shape, seed=100 + 10 * step + i).cuda()
            opt.step()
    for p, q, p0 in zip(plain, fused, [_randn(*p.shape, seed=i).cuda() for i, p in enumerate(plain)]):
        assert float(((q - p0) - (p - p0)).norm() / (p - p0).norm()) < 0.02
        torch.testing.assert_close(b.state[q]["momentum_buffer"], a.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_row_normalize_is_muoneq_r_before_newton_schulz() -> None:
    from underpar.optim.muon import BASELINE_NS, muon_scale, newton_schulz, row_normalized

    g = _randn(24, 16, seed=3) * torch.linspace(0.1, 10.0, 24)[:, None]  # rows of very different size
    unit = row_normalized(g)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(24), rtol=1e-6, atol=0)
    assert torch.equal(row_normalized(torch.zeros(2, 3)), torch.zeros(2, 3))  # eps: no 0 / 0

    def one_step(**muon) -> torch.Tensor:
        p = nn.Parameter(torch.zeros(24, 16))
        p.grad = g.clone()
        Muon([p], lr=1.0, momentum=0.0, nesterov=False, **muon).step()
        return -p.detach()

    expected = (newton_schulz(unit, 5, BASELINE_NS) * muon_scale(24, 16)).float()  # scaled in bf16, as Muon
    assert torch.equal(one_step(row_normalize=True), expected)
    assert float((one_step() - expected).norm() / expected.norm()) > 0.1  # a different step


def test_numuon_rank_schedule() -> None:
    from underpar.optim.muon import numuon_rank

    # relative rank 0.25 + 0.75 * (1 + cos(pi p)) / 2 of min(rows, cols) = 32, rounded up
    assert numuon_rank(0.0, 0.25, 64, 32) == 32
    assert numuon_rank(0.5, 0.25, 64, 32) == 20  # ceil(0.625 * 32)
    assert numuon_rank(1.0, 0.25, 32, 64) == 8
    assert numuon_rank(0.25, 0.25, 32, 64) == math.ceil((0.25 + 0.75 * (1 + math.cos(math.pi / 4)) / 2) * 32)
    assert numuon_rank(2.0, 0.25, 64, 32) == 8 and numuon_rank(-1.0, 0.25, 64, 32) == 32  # clamped
    assert numuon_rank(1.0, 0.001, 64, 32) == 1 and numuon_rank(1.0, 1.0, 64, 32) == 32
    ranks = [numuon_rank(i / 100, 0.1, 512, 512) for i in range(101)]
    assert ranks[0] == 512 and ranks[-1] == 52 and all(x >= y for x, y in zip(ranks, ranks[1:]))


def _numuon_update(g: torch.Tensor, progress: float, **muon) -> torch.Tensor:
    p = nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, **muon)
    set_muon_progress([opt], progress)
    opt.step()
    return -p.detach().double()


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("progress, rank", [(0.0, 32), (0.5, 20), (1.0, 8)])
def test_numuon_update_is_the_top_k_polar_factor(shape: tuple[int, int], progress: float, rank: int) -> None:
    """k singular values of the update are 1 (times Muon's shape scale), the rest ~0, and the
    update is U_k V_k^T of the gradient's float64 SVD to bf16 precision (measured 0.2%)."""
    from underpar.optim.muon import muon_scale

    g = _conditioned(*shape, seed=5)
    update = _numuon_update(g, progress, numuon=True) / muon_scale(*shape)
    sv = torch.linalg.svdvals(update)
    assert int((sv > 0.5).sum()) == rank and sv[:rank].sub(1).abs().max() < 1e-2 and (sv[rank:] < 1e-2).all()
    U, _, Vh = torch.linalg.svd(g.double(), full_matrices=False)
    ref = U[:, :rank] @ Vh[:rank]
    assert float((update - ref).norm() / ref.norm()) < 1e-2


def test_numuon_at_full_rank_is_muons_direction() -> None:
    """At progress 0 NuMuon's update is the exact polar factor U V^T that Muon's Newton-Schulz
    approximates. What differs is only that approximation: Muon's Polar Express update is within
    15% of it (measured 10%) and 0.99 in cosine (measured 0.995)."""
    g = _conditioned(48, 32, seed=7)
    numuon = _numuon_update(g, 0.0, numuon=True)
    muon = _numuon_update(g, 0.0, ns="polar_express")
    assert float((muon - numuon).norm() / numuon.norm()) < 0.15
    assert float((muon * numuon).sum() / (muon.norm() * numuon.norm())) > 0.99


def test_fused_numuon_equals_unfused_numuon() -> None:
    plain, fused, _, _ = _run_pair(3, numuon=True, numuon_min_rank=0.5, row_normalize=True)
    assert all(torch.equal(p, q) for p, q in zip(plain, fused))


def test_muon_variant_fields_reach_the_optimizer() -> None:
    model = nn.Module()
    model.tok_emb = nn.Embedding(8, 4)
    model.blocks = nn.ModuleList([nn.Linear(4, 4, bias=False)])
    muon, adam = build_optimizers(model, OptimConfig(), tie_embeddings=True)
    group = muon.param_groups[0]
    assert not muon.fused and not group["row_normalize"] and not group["numuon"] and group["progress"] == 0.0
    cfg = OptimConfig()
    for setting in ("muon_fused=true", "muon_row_normalize=true", "numuon=true", "numuon_min_rank=0.1"):
        cfg = cfglib.override(cfg, setting)
    cfglib.validate(cfg)
    muon, adam = build_optimizers(model, cfg, tie_embeddings=True)
    group = muon.param_groups[0]
    assert muon.fused and group["row_normalize"] and group["numuon"] and group["numuon_min_rank"] == 0.1
    set_muon_progress([muon, adam], 0.7)
    assert group["progress"] == 0.7 and "progress" not in adam.param_groups[0]
    with pytest.raises(ConfigError, match=r"optim.numuon_min_rank = 0.0 must be above 0.*\(0, 1\]"):
        cfglib.validate(cfglib.override(OptimConfig(), "numuon_min_rank=0"), prefix="optim")
    with pytest.raises(ConfigError, match="numuon_min_rank"):
        cfglib.validate(cfglib.override(OptimConfig(), "numuon_min_rank=1.5"), prefix="optim")


# ---------------------------------------------------------------------------------------
# averaging math


def _param(*values: float, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    return nn.Parameter(torch.tensor(values, dtype=dtype))


def _set(p: nn.Parameter, value: torch.Tensor | float) -> None:
    with torch.no_grad():
        p.fill_(value) if isinstance(value, float) else p.copy_(value)


def test_ema_of_a_known_sequence() -> None:
    decay, xs = 0.75, [1.0, 2.0, 4.0, 8.0]
    p, h = _param(0.0, 0.0), _param(0.0, dtype=torch.bfloat16)
    averager = EMA(decay=decay).build([p, h], Warmdown())
    for step, x in enumerate(xs, 1):
        _set(p, x), _set(h, x)
        averager.update(step, step / 10)
    expected = sum((1 - decay) * decay ** (len(xs) - k) * x for k, x in enumerate(xs, 1))  # from 0
    assert "EMA (decay 0.75) over 4 steps" in averager.apply()
    torch.testing.assert_close(p.detach(), torch.full((2,), expected), rtol=1e-6, atol=0)
    assert h.dtype == torch.bfloat16 and h.item() == pytest.approx(expected, rel=1e-2)
    assert averager.average.values[1].dtype == torch.float32  # the bf16 parameter is averaged in fp32


def test_swa_is_the_mean_from_its_start() -> None:
    p = _param(0.0)
    averager = SWA(start_fraction=0.5, every_steps=2).build([p], Warmdown())
    for step in range(1, 11):
        _set(p, float(step))
        averager.update(step, (step - 1) / 10)
    assert averager.steps == [6, 8, 10]  # progress 0.5, 0.7, 0.9
    assert "mean replaces" in averager.apply() and p.item() == pytest.approx(8.0)


@pytest.mark.parametrize("window, snapshots", [(0, [16, 18, 20]), (2, [18, 20])])
def test_lawa_snapshots_every_k_steps_during_the_warmdown(window: int, snapshots: list[int]) -> None:
    p = _param(0.0, 0.0)
    averager = LAWA(every_steps=2, window=window).build([p], Warmdown(warmdown_fraction=0.3))
    assert averager.start == pytest.approx(0.7, abs=1e-3)  # the warmdown's start, from the schedule
    for step in range(1, 21):
        _set(p, torch.tensor([step, -step], dtype=torch.float32))
        averager.update(step, (step - 1) / 20)  # progress 0.7 is step 15
    assert averager.steps == snapshots
    note = averager.apply()
    assert f"{len(snapshots)} snapshot(s)" in note and f"steps {snapshots[0]}..20" in note
    mean = sum(snapshots) / len(snapshots)
    assert p.tolist() == pytest.approx([mean, -mean])
    # start_fraction, when set, overrides the schedule
    assert LAWA(start_fraction=0.25).build([p], Warmdown()).start == 0.25


def test_fewer_than_two_snapshots_keep_the_last_weights() -> None:
    p = _param(3.0)
    averager = LAWA(every_steps=5).build([p], Warmdown(warmdown_fraction=0.1))
    for step in range(1, 11):
        averager.update(step, (step - 1) / 10)  # only step 10 is in the warmdown and on the beat
    _set(p, 7.0)
    assert "fewer than 2, so the last weights stay" in averager.apply() and p.item() == 7.0


def test_none_is_the_default_and_changes_nothing() -> None:
    assert OptimConfig().averaging == NoAveraging()
    model = nn.Linear(3, 3)
    averager = build_averager(model, OptimConfig())
    before = model.weight.detach().clone()
    averager.update(1, 0.5)
    assert averager.apply() == "" and torch.equal(model.weight, before) and averager.state_dict() == {}
    with pytest.raises(UnderparError, match="holds no EMA state"):
        EMA().build(list(model.parameters()), Warmdown()).load_state_dict(None)


@pytest.mark.parametrize("cfg", [EMA(decay=0.9), SWA(start_fraction=0.2), LAWA(every_steps=3, window=2)],
                         ids=["ema", "swa", "lawa-window"])
def test_averager_state_round_trips_exactly(cfg) -> None:
    """Saved mid-run and loaded into a fresh averager over a copy of the weights, it continues
    bit for bit (the registry check does the same with the defaults)."""
    def weights():
        return [nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(3))]

    a, b = weights(), weights()
    first = cfg.build(a, Warmdown(warmdown_fraction=0.5))
    for step in range(1, 13):
        for p in a:
            _set(p, torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        first.update(step, (step - 1) / 20)
        if step == 8:
            buffer = io.BytesIO()
            torch.save(first.state_dict(), buffer)
            second = cfg.build(b, Warmdown(warmdown_fraction=0.5))
            second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
        if step > 8:
            for p, q in zip(a, b):
                _set(q, p.detach())
            second.update(step, (step - 1) / 20)
    first.apply(), second.apply()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_averaging_does_not_recompile_the_model() -> None:
    """The update reads the parameters and apply() writes them in place, outside the
    compiled graph: the forward compiles once."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    forward = torch.compile(model, backend=counting_backend, fullgraph=True, dynamic=False)
    averager = EMA(decay=0.5).build(list(model.parameters()), Warmdown())
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 4):
        forward(x).square().sum().backward()
        opt.step(), opt.zero_grad()
        averager.update(step, step / 4)
    averager.apply()
    out = forward(x)  # grad mode as in training: a no_grad call would be a new graph anyway
    assert len(graphs) == 1 and torch.equal(out, model(x))


# ---------------------------------------------------------------------------------------
# in the pretraining track


def _record_steps(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every parameter after each Trainer.step (warmup steps included)."""
    after: list[dict[str, torch.Tensor]] = []
    real_step = track.Trainer.step

    def step(self, *args, **kwargs):
        if not after:
            after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})  # the init
        loss = real_step(self, *args, **kwargs)
        after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return loss

    monkeypatch.setattr(track.Trainer, "step", step)
    return after


def test_the_averaged_weights_are_exported_and_scored(data_dir, tmp_path, monkeypatch):  # noqa: F811
    states = _record_steps(monkeypatch)
    exported = {}
    real_export = artifact.export

    def export(state_dict, *args, **kwargs):
        exported.update({k: v.detach().clone() for k, v in state_dict.items()})
        return real_export(state_dict, *args, **kwargs)

    monkeypatch.setattr(artifact, "export", export)
    cfg = micro_config(data_dir, tmp_path, "optim.averaging=ema", "optim.averaging.decay=0.5")
    summary = track.run(cfg)
    warmup = cfg.train.warmup_steps
    init, trained = states[0], states[1 + warmup:]  # warmup steps are undone
    assert len(trained) == summary.steps == 6
    for name, value in init.items():
        ema = value.clone()
        for state in trained:
            ema = torch.lerp(ema, state[name], 0.5)
        assert torch.equal(exported[name], ema), name
    assert not torch.equal(exported["blocks.0.attn.proj.weight"], trained[-1]["blocks.0.attn.proj.weight"])
    assert "the EMA (decay 0.5) over 6 steps replaces the last weights" in RunDir(summary.run_dir).file("train.log").read_text()


@pytest.mark.parametrize("averaging", [
    ["optim.averaging=ema", "optim.averaging.decay=0.5"],
    ["optim.averaging=lawa", "optim.averaging.every_steps=1", "optim.averaging.window=2", "optim.averaging.start_fraction=0.3"],
], ids=["ema", "lawa"])
def test_kill_and_resume_with_averaging_is_exact(data_dir, tmp_path, monkeypatch, averaging):  # noqa: F811
    uninterrupted = track.run(micro_config(data_dir, tmp_path / "a", *averaging))
    killed_dir = run_killed_at_step(micro_config(data_dir, tmp_path / "b", *averaging), 5, monkeypatch)
    resumed = track.run(cfglib.load_json(killed_dir / "config.json"), resume=killed_dir)
    assert final_losses(killed_dir) == final_losses(uninterrupted.run_dir)
    assert resumed.val_bpb_pre_quant == uninterrupted.val_bpb_pre_quant and resumed.val_bpb == uninterrupted.val_bpb
