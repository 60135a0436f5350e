"""Deep Chaos opt-in repairs: mean stubs carry each removed run's measured mean contribution,
and change nothing else."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from underpar.config import validate  # noqa: E402
from underpar.errors import ConfigError  # noqa: E402
from underpar.model import surgery  # noqa: E402
from underpar.model.surgery import AttentionOnly, BiasStub, MlpOnly  # noqa: E402
from underpar.tracks.chaos import ChaosConfig, ChaosController  # noqa: E402
from underpar.tracks.chaos_repairs import removed_runs  # noqa: E402
from test_chaos import find_block, tiny, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration():
    """Two batches, the second with padding that must not count."""
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    return [{"input_ids": tokens(5), "attention_mask": torch.ones(2, 16, dtype=torch.long)},
            {"input_ids": tokens(6), "attention_mask": mask}]


def test_removed_runs():
    modes = ["sacred", "dead", "dead", "both", "identity", "dead", "attn", "dead", "sacred"]
    assert removed_runs(modes, skip_identity=False) == [(1, 2), (5, 5), (7, 7)]
    assert removed_runs(modes, skip_identity=True) == [(1, 2), (4, 5), (7, 7)]


@pytest.mark.parametrize("strategy", ["hoist", "slice"])
def test_mean_stubs_carry_the_measured_mean_contribution(strategy):
    model = tiny("llama").train()
    batches = calibration()
    # what each run adds, measured independently through the hidden states of the full model
    with torch.no_grad():
        states = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    groups = dict(mlp_group_size=32, hidden_group_size=16)
    ctl = ChaosController(model, ChaosConfig(seed=2, strategy=strategy, stub="mean", **groups))
    ctl.use_calibration(batches)
    plan = find_block(ctl.scheduler, ["dead"])
    ctl.begin_block(plan.block)
    stubs = [m for m in model.model.layers if isinstance(m, BiasStub)]
    runs = removed_runs(plan.modes, skip_identity=False)
    assert len(stubs) == len(runs) > 0
    for stub, (first, last) in zip(stubs, runs):
        deltas = [(hs[last + 1] - hs[first])[b["attention_mask"].bool()] for hs, b in zip(states, batches)]
        torch.testing.assert_close(stub.bias, torch.cat(deltas).mean(0), rtol=1e-5, atol=1e-6)
    layout = [type(m).__name__ for m in model.model.layers]
    trainable = [p.requires_grad for p in ctl.params]
    ctl.end()
    # the opt-in changes the stubs only: same layout, same trainable parameters as "random"
    ctl = ChaosController(model, ChaosConfig(seed=2, strategy=strategy, **groups))
    ctl.begin_block(plan.block)
    assert [type(m).__name__ for m in model.model.layers] == layout
    assert [p.requires_grad for p in ctl.params] == trainable
    assert all(m.bias.norm() < 0.1 for m in model.model.layers if isinstance(m, BiasStub))
    ctl.end()
    assert not surgery.is_hoisted(model)


def test_mean_stubs_need_calibration_batches():
    ctl = ChaosController(tiny("llama"), ChaosConfig(seed=2, stub="mean"))
    with pytest.raises(ConfigError, match="method.stub = 'mean' needs training batches"):
        ctl.begin_block(0)
    with pytest.raises(ConfigError, match="method.stub = 'mean' applies to strategies that remove layers"):
        validate(ChaosConfig(stub="mean", strategy="mask"))


def test_mean_halves_stand_in_for_the_skipped_half():
    """stub="mean_halves": an attn layer adds its MLP's mean output after attention, an mlp layer
    adds its attention's mean output before the MLP; the run stubs are those of stub="mean"."""
    model = tiny("qwen2").train()
    batches = calibration()
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            outputs.setdefault(name, []).append(output[0] if isinstance(output, tuple) else output)
        return hook

    layers = surgery.original_layers(model)
    handles = [layers[i].mlp.register_forward_hook(keep(("mlp", i))) for i in range(10)]
    handles += [layers[i].self_attn.register_forward_hook(keep(("attn", i))) for i in range(10)]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()

    def mean_of(name):
        return torch.cat([o[b["attention_mask"].bool()] for o, b in zip(outputs[name], batches)]).mean(0)

    stubs = {}
    for stub in ("mean", "mean_halves"):
        ctl = ChaosController(model, ChaosConfig(seed=2, stub=stub))
        ctl.use_calibration(batches)
        plan = find_block(ctl.scheduler, ["attn", "mlp", "dead"])
        ctl.begin_block(plan.block)
        halves = {i: m for i, m in enumerate(plan.modes) if m in ("attn", "mlp")}
        for module in model.model.layers:
            if isinstance(module, (AttentionOnly, MlpOnly)):
                i = next(j for j, layer in enumerate(layers) if layer.self_attn is getattr(module, "self_attn", None)
                         or layer.mlp is getattr(module, "mlp", None))
                if stub == "mean":
                    assert module.skipped is None
                else:
                    skipped = "mlp" if halves[i] == "attn" else "attn"
                    torch.testing.assert_close(module.skipped, mean_of((skipped, i)), rtol=1e-5, atol=1e-6)
        stubs[stub] = [m.bias for m in model.model.layers if isinstance(m, BiasStub)]
        if stub == "mean_halves":  # the forward of a hoisted attn layer: x + attn(norm(x)) + mean MLP output
            module = next(m for m in model.model.layers if isinstance(m, AttentionOnly))
            plain = AttentionOnly(next(layer for layer in layers if layer.self_attn is module.self_attn))
            x = torch.randn(1, 4, 64)
            cos_sin = model.model.rotary_emb(x, torch.arange(4)[None])
            with torch.no_grad():
                torch.testing.assert_close(module(x, position_embeddings=cos_sin, attention_mask=None),
                                           plain(x, position_embeddings=cos_sin, attention_mask=None) + module.skipped)
        ctl.end()
    assert len(stubs["mean"]) == len(stubs["mean_halves"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(stubs["mean"], stubs["mean_halves"]))
