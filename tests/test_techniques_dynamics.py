"""The 131-run log's training dynamics (issue 13): controlled burn zeroes exactly the smallest
fraction, mutation noise (period, decay, seed), synaptic scaling back to the initial norms,
metamorphosis (model.dropout's rate over progress, dropout itself, no recompiles),
the gradient tricks' arithmetic (canopy light, mycorrhizal, thermal vent), the LR and
weight-decay multipliers (punctuated equilibrium, predator-prey, the weight-decay ramp), the
defaults changing nothing, and a micro run with two of them killed and resumed exactly."""

from __future__ import annotations

import math

import pytest
import torch

from underpar import config as cfglib
from underpar import dist
from underpar.config import from_dict
from underpar.data.dataset import PreparedData
from underpar.errors import ConfigError, UnderparError
from underpar.model.config import GPTConfig
from underpar.model.gpt import build
from underpar.optim import OptimConfig, build_dynamics, build_optimizers, set_weight_decay
from underpar.optim.dynamics import ControlledBurn, Metamorphosis, Mutation, RampWeightDecay, SynapticScaling, block_matrices
from underpar.optim.gradient_tricks import CanopyLight, Mycorrhizal, PredatorPrey, PunctuatedEquilibrium, ThermalVent
from underpar.stages import compiled_graphs
from underpar.tracks import pretrain as track

from test_pretrain import data_dir, final_losses, micro_config, run_killed_at_step  # noqa: F401  (data_dir is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(layers: int = 4, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(from_dict(GPTConfig, {"vocab_size": 64, "num_layers": layers, "model_dim": 32, "dropout": dropout,
                                       "attention": {"num_heads": 2, "num_kv_heads": 1}}))


def dynamics(model, seed: int = 0, **optim):
    return build_dynamics(model, OptimConfig(**optim), seed)


def randomize(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def block_of(name: str) -> int | None:
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


# ---- weight dynamics


def test_controlled_burn_zeroes_exactly_the_smallest_fraction_every_k_steps():
    model = tiny()
    randomize(model)
    before = weights(model)
    dyn = dynamics(model, weight_dynamics=ControlledBurn(fraction=0.05, every_steps=3))
    for step in (1, 2):
        dyn.after_step(step / 10)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), step
    dyn.after_step(0.3)
    matrices = dict(block_matrices(model))
    assert len(matrices) == 4 * 6
    for name, p in model.named_parameters():
        if name not in matrices:
            assert torch.equal(p, before[name]), f"{name} is no block matrix and must not burn"
            continue
        count = int(0.05 * p.numel())
        smallest = torch.argsort(before[name].abs().flatten())[:count]
        zeroed = (p.flatten() == 0).nonzero().flatten()
        assert count > 0 and torch.equal(zeroed.sort().values, smallest.sort().values), name
        kept = p.flatten() != 0
        assert torch.equal(p.flatten()[kept], before[name].flatten()[kept]), name


def test_mutation_adds_seeded_noise_every_k_steps_with_its_decay():
    def deltas(seed: int) -> list[torch.Tensor]:
        model = tiny()
        randomize(model)
        before = weights(model)
        dyn = dynamics(model, seed, weight_dynamics=Mutation(std=0.01, every_steps=2, decay=math.log(4)))
        out = []
        for progress in (0.0, 0.0, 0.5, 1.0):  # steps 1..4: noise at 2 (progress 0) and 4 (progress 1)
            dyn.after_step(progress)
            out.append(torch.cat([(p - before[n]).flatten() for n, p in block_matrices(model)]))
        return out

    d = deltas(seed=7)
    assert torch.count_nonzero(d[0]) == 0 and torch.equal(d[1], d[2])
    assert d[1].std().item() == pytest.approx(0.01, rel=0.03)
    assert (d[3] - d[2]).std().item() == pytest.approx(0.01 / 4, rel=0.03)  # decayed by exp(-ln 4)
    again, other = deltas(seed=7), deltas(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(d, again)), "the same seed must draw the same noise"
    assert not torch.equal(d[1], other[1])


def test_synaptic_scaling_restores_initial_norms_and_leaves_zero_init_matrices():
    model = tiny()
    initial = weights(model)
    dyn = dynamics(model, weight_dynamics=SynapticScaling())
    zero_init = [n for n, _ in block_matrices(model) if initial[n].abs().sum() == 0]
    assert zero_init, "the output projections start at zero"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.mul_(3.0).add_(torch.randn(p.shape, generator=g))
    moved = weights(model)
    dyn.after_step(0.1)
    for name, p in block_matrices(model):
        if name in zero_init:
            assert torch.equal(p, moved[name]), name
        else:
            torch.testing.assert_close(p.norm(), initial[name].norm(), rtol=1e-5, atol=0)
            torch.testing.assert_close(p / p.norm(), moved[name] / moved[name].norm())  # only the scale changed
    assert torch.equal(dict(model.named_parameters())["tok_emb.weight"], moved["tok_emb.weight"])


def rates(model) -> list[float]:
    return [float(block.dropout_rate) for block in model.blocks]


def test_metamorphosis_decays_the_dropout_rate_to_zero_over_the_first_half():
    meta = Metamorphosis()
    assert [meta.rate(0.1, p) for p in (0.0, 0.25, 0.4, 0.5, 0.75, 1.0)] == pytest.approx([0.1, 0.05, 0.02, 0, 0, 0])
    assert Metamorphosis(until=0.2).rate(0.3, 0.1) == pytest.approx(0.15)
    model = tiny(layers=2, dropout=0.1)
    dyn = dynamics(model, weight_dynamics=meta)
    assert rates(model) == pytest.approx([0.1, 0.1])  # the first step runs at p0
    dyn.after_step(0.25)
    assert rates(model) == pytest.approx([0.05, 0.05])
    saved = dyn.state_dict()
    dyn.after_step(0.6)
    assert rates(model) == [0.0, 0.0]
    dyn.load_state_dict(saved)  # a resumed run (or the warmup undone) continues at the saved rate
    assert rates(model) == pytest.approx([0.05, 0.05]) and dyn.steps == 1
    with pytest.raises(ConfigError, match="decays model.dropout, which is 0 here: set model.dropout"):
        dynamics(tiny(layers=2), weight_dynamics=meta)
    with pytest.raises(ConfigError, match="decays model.dropout, which is 0 here"):  # refused with the config
        cfglib.resolve("pretrain", "tiny-cpu", ["optim.weight_dynamics=metamorphosis"])
    cfglib.resolve("pretrain", "tiny-cpu", ["optim.weight_dynamics=metamorphosis", "model.dropout=0.1"])
    with pytest.raises(ConfigError, match="dropout = 1.0 is out of range"):
        cfglib.validate(from_dict(GPTConfig, {"dropout": 1.0}))


def test_dropout_zeroes_about_p_of_the_branch_outputs_in_training_only():
    block = tiny(layers=1, dropout=0.3).blocks[0]
    ones = torch.ones(200_000)
    torch.manual_seed(0)
    out = block._drop(ones)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.005
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))
    block.dropout_rate.fill_(0.0)
    assert torch.equal(block._drop(ones), ones)  # rate 0: exactly the identity
    block.dropout_rate.fill_(0.3)
    assert torch.equal(block.eval()._drop(ones), ones)  # eval: off
    # a model with dropout: the same weights as one without (the rate buffer is not saved), the
    # same eval logits, different training losses; without model.dropout set_dropout is refused
    with_dropout, without = tiny(layers=2, dropout=0.3), tiny(layers=2)
    randomize(with_dropout), randomize(without)
    assert with_dropout.state_dict().keys() == without.state_dict().keys()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    assert torch.equal(with_dropout.eval()(ids), without.eval()(ids))
    assert not torch.equal(with_dropout.train()(ids[:, :-1], ids[:, 1:]), without.train()(ids[:, :-1], ids[:, 1:]))
    with pytest.raises(ConfigError, match="this model has no dropout"):
        without.set_dropout(0.1)


def test_a_compiled_model_changes_its_dropout_rate_without_recompiling():
    torch._dynamo.reset()
    model = tiny(layers=1, dropout=0.2)
    randomize(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    before, losses = compiled_graphs(), []
    for rate in (0.2, 0.1, 0.0):
        model.set_dropout(rate)
        loss = compiled(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert compiled_graphs() - before == 1
    plain = model.eval()(ids[:, :-1], ids[:, 1:]).item()  # eval: no dropout, as at rate 0
    assert losses[2] == pytest.approx(plain, rel=1e-5) and losses[0] != pytest.approx(plain, rel=1e-3)


# ---- gradient tricks


def set_grads(model, value=lambda name: 1.0) -> None:
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, value(name))


def test_canopy_light_scales_gradients_linearly_by_depth():
    model = tiny(layers=4)
    set_grads(model)
    dynamics(model, gradient_trick=CanopyLight()).after_backward()
    for name, p in model.named_parameters():
        block = block_of(name)
        expected = 1.0 if block is None else 0.3 + 0.7 * block / 3
        torch.testing.assert_close(p.grad, torch.full_like(p, expected), msg=name)


def test_mycorrhizal_blends_each_block_with_the_blocks_distance_apart():
    model = tiny(layers=3)
    set_grads(model, lambda name: 1.0 + (block_of(name) or 0) if block_of(name) is not None else 7.0)
    dynamics(model, gradient_trick=Mycorrhizal(distance=1, blend=0.25)).after_backward()
    expected = {0: 0.75 * 1 + 0.25 * 2, 1: 0.75 * 2 + 0.25 * (1 + 3) / 2, 2: 0.75 * 3 + 0.25 * 2}
    for name, p in model.named_parameters():
        block = block_of(name)
        torch.testing.assert_close(p.grad, torch.full_like(p, 7.0 if block is None else expected[block]), msg=name)
    with pytest.raises(ConfigError, match="distance = 3 needs at least 4 blocks"):
        dynamics(tiny(layers=3), gradient_trick=Mycorrhizal(distance=3))


def test_thermal_vent_boosts_k_random_blocks_by_seeded_draws():
    def boosted(seed: int, steps: int = 20) -> list[dict[int, float]]:
        model = tiny(layers=4)
        dyn = dynamics(model, seed, gradient_trick=ThermalVent())
        out = []
        for _ in range(steps):
            set_grads(model)
            dyn.after_backward()
            dyn.after_step(0.0)
            scales = {}
            for name, p in model.named_parameters():
                assert torch.all(p.grad == p.grad.flatten()[0]), name  # one factor per block
                if block_of(name) is None:
                    assert torch.all(p.grad == 1.0), name
                elif p.grad.flatten()[0] != 1.0:
                    scales.setdefault(block_of(name), p.grad.flatten()[0].item())
            out.append(scales)
        return out

    draws = boosted(seed=5)
    assert all(len(s) == 2 and all(2.0 <= f <= 3.0 for f in s.values()) for s in draws), draws
    assert len({tuple(sorted(s)) for s in draws}) > 1, "the boosted blocks must change between steps"
    assert boosted(seed=5) == draws and boosted(seed=6) != draws


def test_lr_and_weight_decay_multipliers():
    model = tiny(layers=2)
    bursts = dynamics(model, gradient_trick=PunctuatedEquilibrium())
    assert [bursts.lr_multiplier(p) for p in (0.25, 0.5, 0.75)] == [1.0, 1.0, 1.0]
    assert bursts.lr_multiplier(0.0) == pytest.approx(0.3) and bursts.lr_multiplier(1.0) == pytest.approx(0.3)
    assert 0.3 < bursts.lr_multiplier(0.27) < 1.0 and bursts.wd_multiplier(0.1) == 1.0

    prey = dynamics(model, gradient_trick=PredatorPrey(amplitude=0.5, cycles=3))
    grid = [i / 100 for i in range(101)]
    assert all(prey.lr_multiplier(p) + prey.wd_multiplier(p) == pytest.approx(2.0) for p in grid)  # in opposition
    assert prey.lr_multiplier(1 / 12) == pytest.approx(1.5) and prey.wd_multiplier(1 / 12) == pytest.approx(0.5)

    ramp = dynamics(model, weight_decay_schedule=RampWeightDecay())
    assert [ramp.wd_multiplier(p) for p in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0] and ramp.lr_multiplier(0.5) == 1.0


def test_weight_decay_ramp_sets_each_groups_decay_from_its_configured_value():
    cfg = cfglib.from_dict(OptimConfig, {"muon_weight_decay": 0.04, "adam_weight_decay": 0.02, "weight_decay_schedule": "ramp"})
    cfglib.validate(cfg)
    optimizers = build_optimizers(tiny(layers=2), cfg, tie_embeddings=True)
    for multiplier in (0.25, 0.0, 1.0):
        set_weight_decay(optimizers, multiplier)
        decays = [g["weight_decay"] for opt in optimizers for g in opt.param_groups]
        assert decays == [0.04 * multiplier] + [0.02 * multiplier] * (len(decays) - 1), decays
    with pytest.raises(ConfigError, match="optim.weight_decay_schedule = 'ramp' has no weight decay to scale"):
        cfglib.validate(cfglib.from_dict(OptimConfig, {"weight_decay_schedule": "ramp"}))
    with pytest.raises(ConfigError, match="choose one of: none, controlled_burn, mutation, synaptic_scaling, metamorphosis"):
        cfglib.from_dict(OptimConfig, {"weight_dynamics": "chrysalis"})


def test_defaults_change_nothing_and_stateful_dynamics_refuse_an_old_checkpoint():
    model = tiny(layers=2)
    randomize(model)
    set_grads(model, lambda name: 0.5)
    before = weights(model)
    dyn = dynamics(model)
    dyn.after_backward()
    dyn.after_step(0.5)
    assert dyn.lr_multiplier(0.3) == 1.0 and dyn.wd_multiplier(0.3) == 1.0
    assert all(torch.equal(p, before[n]) and torch.all(p.grad == 0.5) for n, p in model.named_parameters())
    dyn.load_state_dict(None)  # a checkpoint written before dynamics were saved
    assert dyn.state_dict() == {"steps": 1, "weight_dynamics": {}, "gradient_trick": {}}
    with pytest.raises(UnderparError, match="holds no optim.weight_dynamics / gradient_trick state"):
        dynamics(model, gradient_trick=ThermalVent()).load_state_dict(None)


# ---- in a run


DYNAMIC = ["optim.weight_dynamics=mutation", "optim.weight_dynamics.std=0.01", "optim.weight_dynamics.every_steps=3",
           "optim.gradient_trick=thermal_vent", "optim.gradient_trick.layers=1"]


def test_warmup_puts_the_dynamics_back(data_dir):  # noqa: F811
    cfg = micro_config(data_dir, "unused", *DYNAMIC, "train.warmup_steps=3")
    trainer = track.Trainer(cfg, dist.setup("cpu"), PreparedData.open(cfg.data))
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.warm_up()
    assert trainer.dynamics.steps == 0
    assert all(torch.equal(v, fresh[k]) for k, v in trainer.model.state_dict().items())


def test_kill_and_resume_with_dynamics_is_exact(data_dir, tmp_path, monkeypatch):  # noqa: F811
    plain = track.run(micro_config(data_dir, tmp_path / "plain"))
    uninterrupted = track.run(micro_config(data_dir, tmp_path / "a", *DYNAMIC))
    assert final_losses(uninterrupted.run_dir)[3:] != final_losses(plain.run_dir)[3:], "the switches changed nothing"
    killed_dir = run_killed_at_step(micro_config(data_dir, tmp_path / "b", *DYNAMIC), 5, monkeypatch)
    resumed = track.run(cfglib.load_json(killed_dir / "config.json"), resume=killed_dir)
    assert final_losses(killed_dir) == final_losses(uninterrupted.run_dir)
    assert resumed.val_bpb_pre_quant == uninterrupted.val_bpb_pre_quant and resumed.val_bpb == uninterrupted.val_bpb


def test_the_logged_lr_includes_the_logs_lr_tricks(data_dir, tmp_path):  # noqa: F811
    """The lr column of a run is the multiplier the optimizers got: the schedule's times the
    trick's (here a burst at progress 0 over a floor of 0.3 elsewhere)."""
    from underpar.runs.rundir import RunDir

    def logged_lr(*sets):
        summary = track.run(micro_config(data_dir, tmp_path / str(len(sets)), *sets))
        return [r["lr"] for r in RunDir(summary.run_dir).metrics() if "train_loss" in r]

    plain = logged_lr()
    bursts = logged_lr("optim.gradient_trick=punctuated_equilibrium", "optim.gradient_trick.centres=[0.0]",
                       "optim.gradient_trick.width=0.01")
    assert bursts == pytest.approx([plain[0]] + [0.3 * lr for lr in plain[1:]])
