"""Deep Chaos mask mode against the published hook path: the two-stage MLP keep distribution,
masks in training mode only, the published treatment of masked parameters (zero gradients that
AdamW still acts on) and the published active-count rounding, each an exact, checked change."""

import copy
import itertools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from underpar.config import validate  # noqa: E402
from underpar.errors import ConfigError  # noqa: E402
from underpar.model import surgery  # noqa: E402
from underpar.tracks.chaos import ChaosConfig, ChaosController, ChaosScheduler  # noqa: E402
from test_chaos import DIMS, SMALL_GROUPS, find_block, tiny, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def count_distribution(n: int, lo: float, hi: float, lo2: float, hi2: float, grid: int = 4000) -> dict[int, float]:
    """P(kept groups = k) of the published two-stage draw, integrated on a fine grid:
    c1 = clip(round(n * U(lo, hi)), 1, n), then c2 = clip(round(c1 * U(lo2, hi2)), 1, c1)."""
    def stage(m, a, b):
        out = {}
        for j in range(grid):
            k = min(m, max(1, round(m * (a + (b - a) * (j + 0.5) / grid))))
            out[k] = out.get(k, 0) + 1 / grid
        return out

    final: dict[int, float] = {}
    for c1, p1 in stage(n, lo, hi).items():
        for c2, p2 in stage(c1, lo2, hi2).items():
            final[c2] = final.get(c2, 0) + p1 * p2
    return final


def test_mlp_keep_counts_follow_the_published_two_stage_distribution():
    cfg = ChaosConfig(strategy="mask", seed=5, **SMALL_GROUPS)  # 8 channel groups of 32
    sched = ChaosScheduler(10, cfg, dims=DIMS)
    counts: dict[int, int] = {}
    for b in range(400):
        for groups in sched.plan(b).mlp_groups.values():
            assert groups == sorted(set(groups)) and all(0 <= g < 8 for g in groups)
            counts[len(groups)] = counts.get(len(groups), 0) + 1
    total = sum(counts.values())
    expected = count_distribution(8, 0.3, 0.7, 0.35, 0.8)
    assert set(counts) <= set(expected) and max(counts) <= 5  # at most round(6 * 0.8) = 5 of 8
    # pool the rare counts so every expected cell holds >= 5
    cells = {k: (counts.get(k, 0), total * p) for k, p in expected.items()}
    chi2 = sum((o - e) ** 2 / e for o, e in cells.values())
    assert chi2 < 20.5, (counts, {k: round(e) for k, (_, e) in cells.items()})  # <= 4 dof, p = 0.0004
    # one stage only when the second keeps everything: the first stage's own range
    one = ChaosScheduler(10, ChaosConfig(strategy="mask", seed=5, mlp_core_keep_min=1.0, mlp_core_keep_max=1.0,
                                         **SMALL_GROUPS), dims=DIMS)
    sizes = {len(g) for b in range(100) for g in one.plan(b).mlp_groups.values()}
    assert min(sizes) >= 2 and max(sizes) == 6  # round(8 * U(0.3, 0.7))
    with pytest.raises(ConfigError, match="method.mlp_core_keep_min = 0.9 is larger than method.mlp_core_keep_max = 0.5"):
        validate(ChaosConfig(mlp_core_keep_min=0.9, mlp_core_keep_max=0.5))


def test_masks_act_in_training_mode_only_unless_asked():
    x = tokens()
    for in_eval in (False, True):
        model = tiny("llama")
        with torch.no_grad():
            ref = model.eval()(x).logits
        ctl = ChaosController(model, ChaosConfig(strategy="mask", seed=4, mask_in_eval=in_eval, **SMALL_GROUPS))
        ctl.begin_block(find_block(ctl.scheduler, ["dead", "both"]).block)
        with torch.no_grad():
            assert not torch.allclose(model.train()(x).logits, ref)
            assert torch.equal(model.eval()(x).logits, ref) is not in_eval  # published: eval runs unmasked
        ctl.end()


def test_masked_params_zero_grad_is_the_published_behaviour():
    """Same plan, same step: the loss and every update of what runs are identical; what the masks
    zero is frozen under "freeze" and, under "zero_grad", gets exact zero gradients and moves only
    by AdamW's weight decay (and momentum, had it any)."""
    base = tiny("qwen2").train()
    x = tokens()
    results = {}
    for mode in ("freeze", "zero_grad"):
        model = copy.deepcopy(base)
        ctl = ChaosController(model, ChaosConfig(strategy="mask", seed=4, masked_params=mode, **SMALL_GROUPS))
        plan = find_block(ctl.scheduler, ["dead", "attn", "mlp"])
        ctl.begin_block(plan.block)
        opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)
        loss = model(x, labels=x).loss
        loss.backward()
        layers = surgery.original_layers(model)
        dead = [p for i in plan.layers("dead") for p in layers[i].parameters()]
        dead += [p for i in plan.layers("attn") for m in (layers[i].mlp, layers[i].post_attention_layernorm)
                 for p in m.parameters()]
        dead += [p for i in plan.layers("mlp") for m in (layers[i].self_attn, layers[i].input_layernorm)
                 for p in m.parameters()]
        if mode == "freeze":
            assert all(p.grad is None and not p.requires_grad for p in dead)
        else:
            assert all(p.requires_grad and p.grad is not None and not p.grad.any() for p in dead)
        opt.step()
        ctl.end()
        results[mode] = (loss.detach(), model, {id(p) for p in dead}, plan)
    (loss_f, frozen, _, plan), (loss_z, zero, dead_ids, _) = results["freeze"], results["zero_grad"]
    assert torch.equal(loss_f, loss_z)
    for (name, a), b, p0 in zip(frozen.named_parameters(), zero.parameters(), base.parameters()):
        if id(b) in dead_ids:
            assert torch.equal(a, p0), name  # frozen: untouched
            assert torch.equal(b, p0 * (1 - 1e-2 * 0.1)), name  # decoupled weight decay only
        else:
            assert torch.equal(a, b), name
    with pytest.raises(ConfigError, match="method.masked_params = 'zero_grad' applies to method.strategy = 'mask'"):
        validate(ChaosConfig(masked_params="zero_grad"))


def streaks_check(plans, victims, cfg):
    """Per block: (active count, forced-on layers, forced-off layers) from the preceding blocks."""
    on = dict.fromkeys(victims, 0)
    off = dict.fromkeys(victims, 0)
    out = []
    for plan in plans:
        active = {v for v in victims if plan.modes[v] != "dead"}
        forced_on = {v for v in victims if off[v] >= cfg.force_on_after}
        forced_off = {v for v in victims if on[v] >= cfg.force_off_after}
        out.append((len(active), forced_on <= active, not (forced_off & active), len(forced_on)))
        for v in victims:
            on[v], off[v] = (on[v] + 1, 0) if v in active else (0, off[v] + 1)
    return out


def test_active_count_round_is_the_published_rounding():
    # 11 layers: 7 victims; strict [ceil(2.1), floor(4.9)] = [3, 4], published [round(2.1), round(4.9)] = [2, 5]
    strict, rounded = (ChaosScheduler(11, ChaosConfig(seed=1, force_on_after=2, active_count=mode))
                       for mode in ("strict", "round"))
    assert strict.active_range == (3, 4) and rounded.active_range == (2, 5)
    victims = strict.victims
    for sched, mode in ((strict, "strict"), (rounded, "round")):
        rows = streaks_check([sched.plan(b) for b in range(300)], victims, sched.cfg)
        lo, hi = sched.active_range
        assert all(no_forced_off for _, _, no_forced_off, _ in rows)
        if mode == "round":  # every forced-on layer is on
            assert all(all_forced for _, all_forced, _, _ in rows)
            assert all(lo <= n <= hi or n == forced for n, _, _, forced in rows)
            assert {n for n, *_ in rows} >= {2, 5}
        else:
            assert all(lo <= n <= hi for n, *_ in rows)
    # few active layers and a short off-streak: published forced-on layers go past the maximum
    for mode in ("strict", "round"):
        sched = ChaosScheduler(11, ChaosConfig(seed=1, force_on_after=1, active_fraction_min=0.1,
                                               active_fraction_max=0.3, active_count=mode))
        assert sched.active_range == (1, 2)
        counts = [n for n, *_ in streaks_check([sched.plan(b) for b in range(100)], victims, sched.cfg)]
        assert (max(counts) > 2) == (mode == "round"), counts
    # the same seed draws the same layer modes whatever the strategy, in either rounding
    masked = ChaosScheduler(11, ChaosConfig(seed=1, force_on_after=2, active_count="round", strategy="mask"),
                            dims=DIMS)
    assert [masked.plan(b).modes for b in range(30)] == [rounded.plan(b).modes for b in range(30)]


def test_published_settings_train_end_to_end():
    """All published-fidelity switches at once on a few steps: finite, the model comes back whole."""
    model = tiny("llama").train()
    ref = copy.deepcopy(model)
    ctl = ChaosController(model, ChaosConfig(strategy="mask", seed=3, sticky_interval=2, masked_params="zero_grad",
                                             active_count="round", **SMALL_GROUPS))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(6):
        ctl.begin(step, opt)
        loss = model(tokens(step), labels=tokens(step)).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    ctl.end(opt)
    assert all(p.requires_grad for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in itertools.islice(zip(model.parameters(), ref.parameters()), 5, None))
