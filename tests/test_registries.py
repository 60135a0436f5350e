"""Every entry of every registry, checked by what its kind requires (shapes, finiteness,
determinism, round trips). A new entry is covered without editing this file; a new kind of
registry needs one check function below."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

import underpar.tracks.finetune  # noqa: F401  (importing the tracks registers every entry)
import underpar.tracks.pretrain  # noqa: F401
import underpar.tracks.randopt  # noqa: F401
from underpar.registry import Registry

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models and tensors: threads only add contention

CHECKS: dict[str, Callable[[str, Any], None]] = {}


def check(kind: str):
    def add(fn):
        CHECKS[kind] = fn
        return fn
    return add


# ---- model and quantization checks


@check("activation")
def check_activation(name: str, fn: Any) -> None:
    """Elementwise on any shape, finite, deterministic, and passes gradients (negatives too)."""
    import torch

    x = torch.linspace(-4.0, 4.0, 96).reshape(2, 3, 16).requires_grad_()
    y = fn(x)
    assert y.shape == x.shape and y.dtype == x.dtype, name
    assert torch.isfinite(y).all(), name
    assert torch.equal(fn(x), y), f"{name} is not deterministic"
    # Elementwise: a slice alone gives the same values (up to vectorized-kernel rounding).
    part = fn(x.detach().reshape(-1)[:40])
    torch.testing.assert_close(
        part, y.detach().reshape(-1)[:40], rtol=1e-6, atol=1e-7, msg=f"{name} is not elementwise"
    )
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), name
    assert x.grad.abs().sum() > 0, f"{name} passes no gradient"


@check("quantizer")
def check_quantizer(name: str, quantizer: Any) -> None:
    """A state dict survives quantize -> torch.save -> torch.load(weights_only) -> dequantize:
    same names, shapes and dtypes, ints exact, floats within a bounded error."""
    import io

    import torch

    from underpar.quant.config import QuantConfig

    g = torch.Generator().manual_seed(0)
    state = {
        "blocks.0.mlp.fc.weight": torch.randn(64, 80, generator=g),  # over the threshold below
        "blocks.0.attn_scale": torch.rand(16, generator=g) + 0.5,  # control vector
        "norm.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "step": torch.tensor([3, 5, 7], dtype=torch.int64),
    }
    obj, stats = quantizer.quantize(state, ("attn_scale",), QuantConfig(keep_float_max_numel=1024))
    assert all(isinstance(v, int) for v in stats.values()), name
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    out = quantizer.dequantize(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert set(out) == set(state), name
    for key, t in state.items():
        assert out[key].shape == t.shape and out[key].dtype == t.dtype, f"{name}: {key}"
    assert torch.equal(out["step"], state["step"]), name
    w, w_hat = state["blocks.0.mlp.fc.weight"], out["blocks.0.mlp.fc.weight"]
    assert torch.isfinite(w_hat).all() and not torch.equal(w_hat, torch.zeros_like(w)), name
    # int6 on the records' 12.85-sigma clip leaves ~0.12 of a Gaussian matrix's norm
    assert (w_hat - w).norm() / w.norm() < 0.15, f"{name}: matrix error too large"
    for key in ("blocks.0.attn_scale", "norm.weight"):
        torch.testing.assert_close(out[key].float(), state[key].float(), rtol=1e-2, atol=1e-3)


@check("clip")
def check_clip(name: str, cls: Any) -> None:
    """The default parameters validate and survive a config round trip; the clip is one finite,
    non-negative value per row, within the row's max |w| times 20 (embeddings' widest SDClip),
    zero for a zero row, deterministic, and it scales with the weights."""
    import dataclasses

    import torch

    from underpar import config as cfglib

    assert dataclasses.is_dataclass(cls), f"clip {name} must be a parameter dataclass"
    clip = cls()
    cfglib.validate(clip)
    assert cfglib.from_dict(cls, cfglib.to_dict(clip)) == clip, name
    w = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0
    for embedding in (False, True):
        c = clip(w, 31, embedding)
        assert c.shape == (6,) and torch.isfinite(c).all() and (c >= 0).all(), name
        assert (c <= 20 * w.abs().amax(dim=1) + 1e-6).all() and c[5] == 0, name
        assert torch.equal(clip(w, 31, embedding), c), f"{name} is not deterministic"
        torch.testing.assert_close(clip(w * 4, 31, embedding), c * 4, msg=f"{name} does not scale")


@check("compressor")
def check_compressor(name: str, compressor: Any) -> None:
    """Bytes come back exactly (empty, incompressible, repetitive); repetition compresses."""
    import random

    repetitive = b"underpar artifact " * 2000
    noise = random.Random(0).randbytes(4096)
    for data in (b"", noise, repetitive, noise + repetitive):
        blob = compressor.compress(data)
        assert isinstance(blob, bytes), name
        assert compressor.decompress(blob) == data, f"{name} does not round-trip {len(data)} bytes"
    assert len(compressor.compress(repetitive)) < len(repetitive) // 10, f"{name} does not compress"


@check("rope_scaling")
def check_rope_scaling(name: str, cls: Any) -> None:
    """Default parameters validate and survive a config round trip; at the training length the
    frequencies are plain RoPE's; at 4x they stay positive, finite and decreasing, never
    rise and fall by at most the factor; the logit factor is 1 at the training length and
    finite, >= 1 beyond; the same call gives the same answer."""
    import dataclasses
    import math

    import torch

    from underpar import config as cfglib
    from underpar.model.rope_scaling import rope_inv_freq

    assert dataclasses.is_dataclass(cls), f"rope scaling {name} must be a parameter dataclass"
    scaling = cls()
    cfglib.validate(scaling)
    assert cfglib.from_dict(cls, cfglib.to_dict(scaling)) == scaling, name
    train_len = getattr(scaling, "train_seq_len", 1024)
    plain = rope_inv_freq(10000.0, 16)
    assert torch.equal(scaling.inv_freq(10000.0, 16, train_len), plain), name
    assert scaling.logit_scale(train_len) == 1.0, name
    long = scaling.inv_freq(10000.0, 16, 4 * train_len)
    assert long.shape == plain.shape and long.dtype == torch.float32, name
    assert torch.isfinite(long).all() and (long > 0).all() and (long[1:] < long[:-1]).all(), name
    assert torch.equal(scaling.inv_freq(10000.0, 16, 4 * train_len), long), f"{name} is not deterministic"
    assert (long <= plain * (1 + 1e-6)).all() and (long >= plain / 4 * (1 - 1e-6)).all(), (name, long / plain)
    scale = scaling.logit_scale(4 * train_len)
    assert isinstance(scale, float) and math.isfinite(scale) and scale >= 1.0, name


@check("attention_gate")
def check_attention_gate(name: str, cls: Any) -> None:
    """Default parameters validate and survive a config round trip; in a tiny attention the gate
    reads at most model_dim inputs, adds heads * inputs parameters (a control tensor), gives
    finite outputs and passes gradients to its weight."""
    import dataclasses

    import torch

    from underpar import config as cfglib
    from underpar.model.attention import AttentionConfig, CausalSelfAttention
    from underpar.model.precision import is_control

    assert dataclasses.is_dataclass(cls), f"attention gate {name} must be a parameter dataclass"
    gate = cls()
    cfglib.validate(gate)
    assert cfglib.from_dict(cls, cfglib.to_dict(gate)) == gate, name
    dim, heads = 32, 4
    inputs = gate.inputs(dim)
    assert 0 <= inputs <= dim, name
    torch.manual_seed(0)
    attn = CausalSelfAttention(dim, AttentionConfig(num_heads=heads, num_kv_heads=2, gate=gate))
    plain = CausalSelfAttention(dim, AttentionConfig(num_heads=heads, num_kv_heads=2))
    extra = {n: p for n, p in attn.named_parameters()}.keys() - {n for n, _ in plain.named_parameters()}
    assert sum(dict(attn.named_parameters())[n].numel() for n in extra) == heads * inputs, name
    assert all(is_control(n) for n in extra), f"{name}: gate parameters {extra} are not control tensors"
    torch.nn.init.normal_(attn.proj.weight, std=0.1)  # the zero-init projection passes no gradient
    x = torch.randn(2, 8, dim, generator=torch.Generator().manual_seed(1))
    y = attn(x)
    assert y.shape == x.shape and torch.isfinite(y).all(), name
    y.square().sum().backward()
    for n in extra:
        grad = dict(attn.named_parameters())[n].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (name, n)

# ---- optimizer, schedule and finetune checks


@check("recurrence")
def check_recurrence(name: str, cls: Any) -> None:
    """Its default order runs every block at least once, only real blocks, and a model built
    with it runs (every stage) with finite output of the right shape."""
    import torch

    from underpar.config import from_dict
    from underpar.model.config import GPTConfig
    from underpar.model.gpt import build

    rec = cls()
    order = rec.order(6)
    assert set(order) == set(range(6)), f"{name}: order {order} must run each of the 6 blocks"
    assert rec.lr_scale() > 0, name
    cfg = from_dict(GPTConfig, {"vocab_size": 64, "num_layers": 6, "model_dim": 32, "recurrence": {"name": name},
                                "attention": {"num_heads": 2, "num_kv_heads": 1}, "residual": {"encoder_layers": 0}})
    model = build(cfg)
    tokens = torch.randint(0, 64, (1, 8))
    for on in (False, True):
        for switch in model.stage_switches():
            switch.set(on)
        with torch.no_grad():
            out = model(tokens)
        assert out.shape == (1, 8, 64) and torch.isfinite(out).all(), name


@check("growth")
def check_growth(name: str, cls: Any) -> None:
    """The default parameters validate and survive a config round trip; with 6 layers the
    schedule adds exactly the missing layers at increasing progresses in (0, 1), and a model
    grown with it runs at every depth, the first `depth` blocks each once."""
    import dataclasses

    import torch

    from underpar.config import from_dict, to_dict, validate
    from underpar.model.config import GPTConfig
    from underpar.model.gpt import build
    from underpar.stages import Stages

    assert dataclasses.is_dataclass(cls), f"growth {name} must be a parameter dataclass"
    growth = cls()
    validate(growth)
    assert from_dict(cls, to_dict(growth)) == growth, name
    start, points = growth.start_depth(6), growth.schedule(6)
    assert 1 <= start <= 6 and len(points) == 6 - start, name
    assert all(0 < a < 1 for a in points) and points == sorted(set(points)), f"{name}: schedule {points}"
    cfg = from_dict(GPTConfig, {"vocab_size": 64, "num_layers": 6, "model_dim": 32, "attention": {"num_heads": 2, "num_kv_heads": 1},
                                "structure": {"grow": to_dict(growth) | {"name": name}}})
    model = build(cfg)
    stages = Stages(model.stage_switches())
    tokens = torch.randint(0, 64, (1, 8))
    for depth, progress in enumerate([0.0, *points], start):
        stages.enter(progress)
        calls: list[int] = []
        hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
        with torch.no_grad():
            out = model(tokens)
        for hook in hooks:
            hook.remove()
        assert calls == list(range(depth)), f"{name}: at progress {progress} ran {calls}"
        assert out.shape == (1, 8, 64) and torch.isfinite(out).all(), name


@check("ns_coefficients")
def check_ns_coefficients(name: str, ns: Any) -> None:
    """In bf16, as Muon runs it, the iteration maps random matrices (tall, wide, any scale, and
    a batched stack) to near-orthogonal ones: every singular value in [0.5, 1.3] (the shipped
    recipes measure about 0.7..1.15), deterministically, the stack equal to its matrices."""
    import torch

    from underpar.optim.muon import NSCoefficients, newton_schulz

    assert isinstance(ns, NSCoefficients) and ns.abc and all(len(t) == 3 for t in ns.abc), name
    steps = len(ns.abc) if len(ns.abc) > 1 else 5
    g = torch.Generator().manual_seed(0)
    # Singular values 0.1..1 (condition number 10): a square Gaussian has values near 0 that
    # no handful of iterations lifts.
    u, _ = torch.linalg.qr(torch.randn(48, 32, generator=g))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    tall = u @ torch.diag(torch.logspace(-1, 0, 32)) @ v.T
    for G in (tall * 30.0, tall.T * 0.01, torch.stack([tall, tall.flip(0)])):
        X = newton_schulz(G, steps, ns)
        assert X.shape == G.shape and X.dtype == torch.bfloat16 and torch.isfinite(X).all(), name
        assert torch.equal(newton_schulz(G, steps, ns), X), f"{name} is not deterministic"
        sv = torch.linalg.svdvals(X.double())
        assert 0.5 < sv.min() and sv.max() < 1.3, (name, sv.min().item(), sv.max().item())
    stack = newton_schulz(torch.stack([tall, tall.flip(0)]), steps, ns)
    torch.testing.assert_close(stack[1].float(), newton_schulz(tall.flip(0), steps, ns).float(), atol=2e-2, rtol=0)


@check("schedule")
def check_schedule(name: str, cls: Any) -> None:
    """The default parameters validate and survive a config round trip; the instance is a pure
    function of progress: finite multipliers in [0, 1] (the configured learning rates are the
    peak) over a grid, the same in any call order and on a copy, clamped outside [0, 1]."""
    import copy
    import dataclasses
    import math

    from underpar import config as cfglib

    assert dataclasses.is_dataclass(cls), f"schedule {name} must be a parameter dataclass"
    schedule = cls()
    cfglib.validate(schedule)
    assert cfglib.from_dict(cls, cfglib.to_dict(schedule)) == schedule, name
    grid = [i / 200 for i in range(201)]
    values = [schedule(p) for p in grid]
    assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (name, values)
    assert max(values) > 0, f"{name} never trains"
    assert [schedule(p) for p in reversed(grid)] == values[::-1], f"{name} keeps state between calls"
    assert [copy.deepcopy(schedule)(p) for p in grid] == values, name
    assert schedule(-0.5) == values[0] and schedule(1.5) == values[-1], f"{name} does not clamp progress"


@check("averaging")
def check_averaging(name: str, cls: Any) -> None:
    """The default parameters validate and survive a config round trip; over a short run on
    fp32 and bf16 parameters the averager's state survives torch.save/load into a fresh one
    (both then end on the same weights, bit for bit), and apply() leaves finite weights of
    the same shapes and dtypes (the "none" entry: the last weights, untouched)."""
    import dataclasses
    import io

    import torch

    from underpar import config as cfglib
    from underpar.optim.schedule import Warmdown

    assert dataclasses.is_dataclass(cls), f"averaging {name} must be a parameter dataclass"
    cfg = cls()
    cfglib.validate(cfg)
    assert cfglib.from_dict(cls, cfglib.to_dict(cfg)) == cfg, name

    def params():
        return [torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(1))),
                torch.nn.Parameter(torch.randn(5, generator=torch.Generator().manual_seed(2)).bfloat16())]

    a, b = params(), params()
    averager_a = cfg.build(a, Warmdown(warmdown_fraction=0.5))
    steps = 120  # past any default every_steps, into any default start

    def train(ps, averager, step):
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(p.dtype))
        averager.update(step, (step - 1) / steps)

    for step in range(1, steps // 2 + 1):
        train(a, averager_a, step)
    buffer = io.BytesIO()
    torch.save(averager_a.state_dict(), buffer)
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    averager_b = cfg.build(b, Warmdown(warmdown_fraction=0.5))
    averager_b.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    for step in range(steps // 2 + 1, steps + 1):
        train(a, averager_a, step)
        train(b, averager_b, step)
    last = [p.detach().clone() for p in a]
    assert isinstance(averager_a.apply(), str) and isinstance(averager_b.apply(), str), name
    for p, q, before in zip(a, b, last):
        assert torch.equal(p, q), f"{name}: a resumed averager ends elsewhere"
        assert p.shape == before.shape and p.dtype == before.dtype and torch.isfinite(p).all(), name
    if name == "none":
        assert all(torch.equal(p, before) for p, before in zip(a, last))


def _check_hooks(name: str, cls: Any, slot: str) -> None:
    """Shared by the weight_dynamics and gradient_trick checks: default parameters validate and
    survive a config round trip; over 100 steps of a fake SGD on a tiny GPT (past every default
    period) the weights stay finite, keep shapes and dtypes, two builds with one seed end
    bit-identical, a run resumed from the state saved at step 50 (torch.save/load) ends on the
    same weights, and the multipliers are finite and positive; "none" is plain SGD."""
    import dataclasses
    import io

    import torch

    from underpar import config as cfglib
    from underpar.config import from_dict
    from underpar.model.config import GPTConfig
    from underpar.model.gpt import build
    from underpar.optim import OptimConfig, build_dynamics

    assert dataclasses.is_dataclass(cls), f"{slot} {name} must be a parameter dataclass"
    entry = cls()
    cfglib.validate(entry)
    assert cfglib.from_dict(cls, cfglib.to_dict(entry)) == entry, name
    torch.manual_seed(0)
    model = build(from_dict(GPTConfig, {"vocab_size": 64, "num_layers": 4, "model_dim": 32, "dropout": 0.1,  # metamorphosis decays it
                                        "attention": {"num_heads": 2, "num_kv_heads": 1}}))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    steps = 100

    def train(dynamics, first: int, last: int) -> None:
        for step in range(first, last + 1):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i))
            dynamics.after_backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(0.01 * dynamics.lr_multiplier(step / steps) * p.grad)
            dynamics.after_step(step / steps)

    def fresh():
        model.load_state_dict(start)
        return build_dynamics(model, OptimConfig(**{slot: entry}), seed=3)

    dynamics = fresh()
    train(dynamics, 1, steps)
    ends = [{k: v.clone() for k, v in model.state_dict().items()}]
    dynamics = fresh()
    train(dynamics, 1, steps // 2)
    buffer = io.BytesIO()
    torch.save(dynamics.state_dict(), buffer)
    middle = {k: v.clone() for k, v in model.state_dict().items()}
    dynamics = fresh()
    model.load_state_dict(middle)
    dynamics.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    train(dynamics, steps // 2 + 1, steps)
    ends.append(model.state_dict())
    for key, value in start.items():
        assert ends[0][key].shape == value.shape and ends[0][key].dtype == value.dtype, (name, key)
        assert torch.isfinite(ends[0][key]).all(), (name, key)
        assert torch.equal(ends[0][key], ends[1][key]), f"{name}: a resumed run ends elsewhere ({key})"
    for progress in (i / 20 for i in range(21)):
        for value in (dynamics.lr_multiplier(progress), dynamics.wd_multiplier(progress)):
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, progress, value)
    if name == "none":
        plain = fresh()
        model.load_state_dict(start)
        with torch.no_grad():
            for step in range(1, steps + 1):
                for i, p in enumerate(model.parameters()):
                    p.sub_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 * step + i)))
        assert all(torch.equal(v, ends[0][k]) for k, v in model.state_dict().items()), "none changed the weights"
        assert plain.state_dict() == {"steps": 0, "weight_dynamics": {}, "gradient_trick": {}}


@check("weight_dynamics")
def check_weight_dynamics(name: str, cls: Any) -> None:
    _check_hooks(name, cls, "weight_dynamics")


@check("gradient_trick")
def check_gradient_trick(name: str, cls: Any) -> None:
    _check_hooks(name, cls, "gradient_trick")


@check("weight_decay_schedule")
def check_weight_decay_schedule(name: str, cls: Any) -> None:
    """The default parameters validate and survive a config round trip; a pure function of
    progress with finite multipliers in [0, 1] that ends at 1 (the configured weight decay),
    clamped outside [0, 1]."""
    import dataclasses

    from underpar import config as cfglib

    assert dataclasses.is_dataclass(cls), f"weight-decay schedule {name} must be a parameter dataclass"
    schedule = cls()
    cfglib.validate(schedule)
    assert cfglib.from_dict(cls, cfglib.to_dict(schedule)) == schedule, name
    grid = [i / 100 for i in range(101)]
    values = [schedule(p) for p in grid]
    assert all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), (name, values)
    assert values[-1] == 1.0, f"{name} must end at the configured weight decay"
    assert [schedule(p) for p in reversed(grid)] == values[::-1], f"{name} keeps state between calls"
    assert schedule(-0.5) == values[0] and schedule(1.5) == values[-1], f"{name} does not clamp progress"


def _tiny_llama():
    import torch

    from underpar.model import hf

    model = hf.random_model("tiny-llama", seed=0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, tokens


def _snapshot(model: Any) -> list[tuple[str, Any, bool]]:
    return [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]


def _same(a: list[tuple[str, Any, bool]], b: list[tuple[str, Any, bool]]) -> bool:
    import torch

    return [(n, g) for n, _, g in a] == [(n, g) for n, _, g in b] and all(
        torch.equal(x, y) for (_, x, _), (_, y, _) in zip(a, b))


@check("finetune_method")
def check_finetune_method(name: str, cls: Any) -> None:
    """On a tiny random Llama with default settings: a block begins at step 0 (its layout is
    JSON), what trains gets finite gradients, the same step starts nothing new, and after
    `end` the parameters (names, values, requires_grad), the layer list and the forward are
    exactly as before."""
    import json

    import torch

    from underpar import config as cfglib
    from underpar.tracks.finetune_methods import Controller, MethodConfig

    cfg = cls()
    assert isinstance(cfg, MethodConfig), name
    cfglib.validate(cfg)
    model, x = _tiny_llama()
    with torch.no_grad():
        ref = model(x).logits
    before, layers = _snapshot(model), list(model.model.layers)
    controller = cfg.controller(model)
    assert isinstance(controller, Controller), name
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=1e-3)
    json.dumps(controller.begin(0, optimizer))
    trainable = controller.trainable_parameters()
    assert trainable and all(p.requires_grad for p in trainable), name
    model(x, labels=x).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable), name
    assert controller.begin(0, optimizer) is None, f"{name} started a second block on one step"
    optimizer.zero_grad(set_to_none=True)
    controller.end(optimizer)
    assert _same(_snapshot(model), before), f"{name}: parameters not restored"
    assert list(model.model.layers) == layers, name
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref), f"{name}: forward not restored"


@check("chaos_strategy")
def check_chaos_strategy(name: str, strategy: Any) -> None:
    """On a tiny random Llama, over blocks that between them hold every layer mode: apply
    changes the forward, the same plan applied again gives the same outputs, and undo brings
    back the outputs, the parameters and the layer list exactly (undo with nothing applied
    changes nothing)."""
    import torch

    from underpar.model import surgery
    from underpar.tracks.chaos import ChaosConfig, ChaosScheduler
    from underpar.tracks.chaos_strategies import Strategy

    assert isinstance(strategy, Strategy), name
    cfg = ChaosConfig(strategy=name, seed=1, sacred_layers=[0, -1], mlp_group_size=32, hidden_group_size=16)
    model, x = _tiny_llama()
    scheduler = ChaosScheduler(len(model.model.layers), cfg, dims=surgery.layer_dims(model))
    with torch.no_grad():
        ref = model(x).logits
    before, layers = _snapshot(model), model.model.layers
    strategy.undo(model)
    seen: set[str] = set()
    for block in range(40):
        plan = scheduler.plan(block)
        if set(plan.modes) <= seen:
            continue
        seen |= set(plan.modes)
        with torch.no_grad():
            strategy.apply(model, plan, cfg)
            out = model(x).logits
            strategy.undo(model)
            assert torch.equal(model(x).logits, ref), f"{name}: undo did not restore block {block}"
            strategy.apply(model, plan, cfg)
            assert torch.equal(model(x).logits, out), f"{name} is not deterministic"
            strategy.undo(model)
        assert not torch.equal(out, ref), f"{name}: block {block} ({plan.modes}) changed nothing"
        assert model.model.layers is layers and _same(_snapshot(model), before), name
    assert {"dead", "attn", "mlp"} <= seen, seen

# ---- task, answer and randopt checks


@check("task")
def check_task(name: str, task: Any) -> None:
    """The task's sample records, written as a local file (no network), load the same way twice;
    every prompt is non-empty; an answer-scored task scores each gold answer, stated the way its
    answer kind states answers, as correct, another example's gold as wrong, and its own SFT
    response (where it has one) as correct; a task without gold answers has responses to train on."""
    import json
    import tempfile
    from pathlib import Path

    from underpar.data.answers import ANSWER_KINDS
    from underpar.data.tasks import Task

    assert isinstance(task, Task) and task.name == name and task.splits and task.sample_records
    split = task.splits[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{split}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in task.sample_records), encoding="utf-8")
        examples = task.load(split, path=str(path))
        assert examples == task.load(split, path=str(path)) and len(examples) == len(task.sample_records)
    for example in examples:
        prompt = task.prompt_messages(example)
        assert prompt and prompt[-1]["role"] == "user" and all(m["content"].strip() for m in prompt)
    if task.answer_kind is None:
        assert all(task.sft_response(e).strip() for e in examples)
        return
    kind = ANSWER_KINDS[task.answer_kind]
    assert len({e.answer for e in examples}) == len(examples) >= 2, "sample records need different gold answers"
    for example, other in zip(examples, examples[1:] + examples[:1]):
        assert task.reward(kind.completion(example.answer), example) == 1.0, example.answer
        assert task.reward(kind.completion(other.answer), example) == 0.0, (other.answer, example.answer)
        if example.response is not None:
            assert task.reward(example.response, example) == 1.0, example.response


@check("answer_kind")
def check_answer_kind(name: str, kind: Any) -> None:
    """Extraction from the canonical completion of each example answer gives it back (the
    canonical form exactly); vote keys are deterministic, equal answers share one and compare
    equal, different answers do not; no text gives no answer and no vote."""
    import itertools

    from underpar.data.answers import AnswerKind

    assert isinstance(kind, AnswerKind) and len(kind.examples) >= 2
    assert kind.extract(None) is None and kind.extract("") is None
    assert kind.vote_key(None) is None and kind.vote_key("  ") is None
    keys = []
    for group in kind.examples:
        canonical = group[0]
        assert kind.extract(kind.completion(canonical)) == canonical
        group_keys = {kind.vote_key(answer) for answer in group}
        assert len(group_keys) == 1 and kind.vote_key(canonical) == kind.vote_key(canonical), group
        for answer in group:
            assert kind.equal(kind.extract(kind.completion(answer)), canonical), answer
            assert kind.equal(answer, canonical) and kind.equal(canonical, answer), answer
        keys.append(group_keys.pop())
    assert len(set(keys)) == len(keys), keys
    for a, b in itertools.combinations(kind.examples, 2):
        assert not kind.equal(a[0], b[0]) and not kind.equal(b[0], a[0]), (a[0], b[0])


def _registries() -> dict[str, Registry]:
    return {kind: r for kind, r in Registry.all().items() if not kind.startswith("test-")}


def test_every_registry_kind_has_a_check():
    missing = sorted(set(_registries()) - set(CHECKS))
    assert not missing, f"registries without a check in tests/test_registries.py: {missing}"


@pytest.mark.parametrize("kind,name", [(k, n) for k, r in _registries().items() for n in r])
def test_registered_entry(kind: str, name: str):
    CHECKS[kind](name, _registries()[kind][name])
