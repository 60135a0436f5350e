"""Deep Chaos scheduler statistics, layer hoisting and restore on tiny Llama/Qwen2 models,
mask-mode gradients, hoist == mask equivalence, checkpoints from the restored model, LISA."""

import copy
import itertools
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from underpar.config import validate  # noqa: E402
from underpar.errors import ConfigError  # noqa: E402
from underpar.model import surgery  # noqa: E402
from underpar.model.surgery import AttentionOnly, BiasStub, LayerDims, MlpOnly  # noqa: E402
from underpar.tracks.chaos import (  # noqa: E402
    BlockPlan,
    ChaosConfig,
    ChaosController,
    ChaosScheduler,
    save_pretrained_restored,
)
from underpar.tracks.lisa import LisaConfig, LisaController  # noqa: E402

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=10,
             num_attention_heads=4, num_key_value_heads=2)
DIMS = LayerDims(num_layers=10, hidden_size=64, intermediate_size=256, num_heads=4,
                 num_kv_heads=2, head_dim=16)
SMALL_GROUPS = dict(mlp_group_size=32, hidden_group_size=16)  # 8 channel groups, 4 hidden groups
ARCHS = ["llama", "qwen2"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only add contention


def tiny(arch: str, seed: int = 0, **changes):
    torch.manual_seed(seed)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, **changes)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, **changes)).eval()


def tokens(seed: int = 1, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def find_block(scheduler, wanted, limit=300):
    for b in range(limit):
        plan = scheduler.plan(b)
        if set(wanted) <= set(plan.modes):
            return plan
    raise AssertionError(f"no block with modes {wanted}")


def runs(flags):
    """Lengths of the runs of True and of False in a sequence."""
    on, off = [], []
    for value, group in itertools.groupby(flags):
        (on if value else off).append(len(list(group)))
    return on, off


# ----------------------------------------------------------------------------- config


def test_config_defaults_validate_and_errors_are_clear():
    validate(ChaosConfig())
    with pytest.raises(ConfigError, match=r"method.p_both \+ p_attn \+ p_mlp \+ p_identity = 1.2; they must sum to 1"):
        validate(ChaosConfig(p_both=0.5))
    with pytest.raises(ConfigError, match="method.hidden_keep_min = 0.9 is larger than method.hidden_keep_max = 0.8"):
        validate(ChaosConfig(hidden_keep_min=0.9, hidden_keep_max=0.8))
    with pytest.raises(ConfigError, match="choose one of: hoist, mask"):
        validate(ChaosConfig(strategy="prune"))
    with pytest.raises(ConfigError, match="optimizer_state"):
        validate(ChaosConfig(optimizer_state="drop"))
    with pytest.raises(ConfigError, match=r"method.sacred_layers: layer 12 does not exist in a model with 10 layers "
                                          r"\(0 to 9, or -1 to -10 from the end\)"):
        ChaosScheduler(10, ChaosConfig(sacred_layers=[0, 12]))
    assert ChaosScheduler(10, ChaosConfig()).sacred == [0, 1, 8, 9]


# ----------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("num_layers", [10, 30])
def test_schedule_statistics(num_layers):
    cfg = ChaosConfig(seed=3)
    sched = ChaosScheduler(num_layers, cfg)
    plans = [sched.plan(b) for b in range(300)]
    sacred = {0, 1, num_layers - 2, num_layers - 1}
    victims = [i for i in range(num_layers) if i not in sacred]
    lo, hi = sched.active_range  # ceil(n * 0.3), floor(n * 0.7)
    assert (lo, hi) == ((2, 4) if num_layers == 10 else (8, 18))
    counts = dict.fromkeys(("both", "attn", "mlp", "identity"), 0)
    for plan in plans:
        assert [plan.modes[i] for i in sorted(sacred)] == ["sacred"] * 4
        assert all(plan.modes[v] != "sacred" for v in victims)
        active = sum(plan.modes[v] != "dead" for v in victims)
        assert lo <= active <= hi
        assert 0.3 <= plan.active_fraction <= 0.7
        for v in victims:
            if plan.modes[v] != "dead":
                counts[plan.modes[v]] += 1
    max_on = max_off = 0
    for v in victims:
        on, off = runs([plan.modes[v] != "dead" for plan in plans])
        max_on, max_off = max([max_on, *on]), max([max_off, *off])
    assert max_on <= cfg.force_off_after and max_off <= cfg.force_on_after
    if num_layers == 30:  # enough samples that the forced rules actually bind
        assert max_on == cfg.force_off_after and max_off == cfg.force_on_after
    total = sum(counts.values())
    chi2 = sum((counts[m] - total * p) ** 2 / (total * p) for m, p in cfg.mode_probabilities().items())
    assert chi2 < 16.27, (counts, chi2)  # 3 degrees of freedom, p = 0.001


def test_schedule_is_deterministic_and_seeded():
    a, b = ChaosScheduler(30, ChaosConfig(seed=5)), ChaosScheduler(30, ChaosConfig(seed=5))
    late = b.plan(250)  # random access computes the history in order
    assert [a.plan(i).modes for i in range(251)] == [b.plan(i).modes for i in range(251)]
    assert late is b.plan(250)
    other = ChaosScheduler(30, ChaosConfig(seed=6))
    assert [a.plan(i).modes for i in range(20)] != [other.plan(i).modes for i in range(20)]
    # the strategy does not change which layers are picked
    masked = ChaosScheduler(30, ChaosConfig(seed=5, strategy="mask"),
                            dims=LayerDims(30, 64, 256, 4, 2, 16))
    assert [masked.plan(i).modes for i in range(50)] == [a.plan(i).modes for i in range(50)]


def test_mask_plans_are_gqa_aware_and_within_bounds():
    cfg = ChaosConfig(strategy="mask", seed=1, **SMALL_GROUPS)
    sched = ChaosScheduler(10, cfg, dims=DIMS)
    for b in range(100):
        plan = sched.plan(b)
        attn_layers, mlp_layers = plan.layers("both", "attn"), plan.layers("both", "mlp")
        assert sorted(plan.kv_heads) == sorted(plan.attn_hidden_groups) == attn_layers
        assert sorted(plan.mlp_groups) == sorted(plan.mlp_hidden_groups) == mlp_layers
        for i in attn_layers:
            assert len(plan.kv_heads[i]) == 1  # round(2 * U(0.3, 0.7)) == 1
            assert 2 <= len(plan.attn_hidden_groups[i]) <= 4  # round(4 * U(0.6, 0.95))
        for i in mlp_layers:
            assert 1 <= len(plan.mlp_groups[i]) <= 5  # round(c * U(0.35, 0.8)) of c = round(8 * U(0.3, 0.7))
            assert all(0 <= g < 8 for g in plan.mlp_groups[i])
    with pytest.raises(ConfigError, match="layer dims"):
        ChaosScheduler(10, cfg).plan(0)


# ----------------------------------------------------------------------------- hoist

PLAN = BlockPlan(0, ["sacred", "sacred", "dead", "identity", "attn", "dead", "mlp", "both",
                     "sacred", "sacred"])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("skip_identity", [False, True])
def test_hoist_and_restore(arch, skip_identity):
    model = tiny(arch)
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    dec = model.model
    layers, types = dec.layers, getattr(model.config, "layer_types", None)

    new = surgery.hoist(model, PLAN, skip_identity=skip_identity, stub_std=0.01, seed=7)
    kinds = [type(m).__name__ if not isinstance(m, type(layers[0])) else list(layers).index(m) for m in new]
    if skip_identity:  # 2-3 is one removed run: one stub
        assert kinds == [0, 1, "BiasStub", "AttentionOnly", "BiasStub", "MlpOnly", 7, 8, 9]
    else:
        assert kinds == [0, 1, "BiasStub", 3, "AttentionOnly", "BiasStub", "MlpOnly", 7, 8, 9]
    assert new[kinds.index("AttentionOnly")].self_attn is layers[4].self_attn
    assert new[kinds.index("MlpOnly")].mlp is layers[6].mlp
    assert dec.layers is not layers and list(dec.layers) == new and surgery.is_hoisted(model)
    stub = new[2]
    assert 0.002 < stub.bias.std().item() < 0.03 and "bias" not in stub.state_dict()
    assert torch.equal(stub.bias, BiasStub(64, 0.01, surgery.stub_seed(7, 2), torch.float32, "cpu").bias)
    # transformers' view of the pruned list
    assert model.config.num_hidden_layers == len(new)
    if types is not None:
        assert len(model.config.layer_types) == len(new)
    attn_positions = [p for p, m in enumerate(new) if hasattr(m, "self_attn")]
    assert [new[p].self_attn.layer_idx for p in attn_positions] == attn_positions

    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == len(new) + 1  # one per element of the pruned list
    hs = out.hidden_states
    assert torch.equal(hs[3], hs[2] + stub.bias)  # the stub at position 2
    assert not torch.allclose(out.logits, ref)

    assert surgery.restore(model) and not surgery.restore(model)
    assert dec.layers is layers and model.config.num_hidden_layers == 10
    assert getattr(model.config, "layer_types", None) is types
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(10))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
        assert len(model(x, output_hidden_states=True).hidden_states) == 11


def test_hidden_state_hooks_cover_layers_hoisted_at_first_use():
    """transformers installs its hidden-state hooks once, on first use: a first use while
    hoisted must not leave the removed layers without hooks after restore."""
    model = tiny("llama")
    surgery.hoist(model, PLAN)
    with torch.no_grad():
        model(tokens(), output_hidden_states=True)
    surgery.restore(model)
    with torch.no_grad():
        assert len(model(tokens(), output_hidden_states=True).hidden_states) == 11


@pytest.mark.parametrize("arch", ARCHS)
def test_hoisted_params_get_no_gradient_and_do_not_move(arch):
    model = tiny(arch).train()
    ctl = ChaosController(model, ChaosConfig(seed=2))
    plan = find_block(ctl.scheduler, ["dead", "attn", "mlp", "identity"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert ctl.begin_block(plan.block) is plan
    layers = surgery.original_layers(model)
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-2, weight_decay=0.1)
    model(tokens(), labels=tokens()).loss.backward()

    def grads(module):
        return [p.grad for p in module.parameters()]

    for i, mode in enumerate(plan.modes):
        layer = layers[i]
        if mode == "dead":
            assert all(g is None for g in grads(layer)) and not any(p.requires_grad for p in layer.parameters())
        elif mode == "attn":
            assert all(g is None for g in grads(layer.mlp) + grads(layer.post_attention_layernorm))
            assert all(g is not None for g in grads(layer.self_attn) + grads(layer.input_layernorm))
        elif mode == "mlp":
            assert all(g is None for g in grads(layer.self_attn) + grads(layer.input_layernorm))
            assert all(g is not None for g in grads(layer.mlp) + grads(layer.post_attention_layernorm))
        else:  # sacred, both, identity (runs and trains, as in the published code)
            assert all(g is not None for g in grads(layer))
    assert model.model.embed_tokens.weight.grad is not None and model.lm_head.weight.grad is not None
    opt.step()
    ctl.end()
    for name, p in model.named_parameters():
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        frozen = i is not None and (plan.modes[i] == "dead"
                                    or (plan.modes[i] == "attn" and (".mlp." in name or "post_attention" in name))
                                    or (plan.modes[i] == "mlp" and ("self_attn" in name or "input_layernorm" in name)))
        assert torch.equal(p, before[name]) == frozen, name
    assert all(p.requires_grad for p in model.parameters())


def test_identity_switches():
    model = tiny("llama")
    ctl = ChaosController(model, ChaosConfig(seed=2, train_identity=False))
    plan = find_block(ctl.scheduler, ["identity"])
    ctl.begin_block(plan.block)
    i = plan.layers("identity")[0]
    layer = surgery.original_layers(model)[i]
    assert layer in list(model.model.layers) and not any(p.requires_grad for p in layer.parameters())
    ctl.end()
    ctl = ChaosController(model, ChaosConfig(seed=2, hoist_identity=True))
    ctl.begin_block(plan.block)
    assert layer not in list(model.model.layers) and not any(p.requires_grad for p in layer.parameters())
    ctl.end()
    ctl = ChaosController(model, ChaosConfig(seed=2, train_embeddings=False))
    ctl.begin_block(plan.block)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    assert not model.model.norm.weight.requires_grad
    ctl.end()


def test_gradient_checkpointing_through_wrappers():
    model = tiny("qwen2").train()
    with warnings.catch_warnings():  # renamed activation_checkpointing_enable in 5.23
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    surgery.hoist(model, PLAN)
    assert all(m.gradient_checkpointing for m in model.model.layers if isinstance(m, (AttentionOnly, MlpOnly)))
    model(tokens(), labels=tokens()).loss.backward()
    assert surgery.original_layers(model)[4].self_attn.q_proj.weight.grad is not None
    assert surgery.original_layers(model)[6].mlp.up_proj.weight.grad is not None


# ----------------------------------------------------------------------------- masks


def rows_zero(grad, size, keep, block):
    """(kept rows all have some nonzero gradient, dropped rows are exactly zero)"""
    r = grad.reshape(-1, block, *grad.shape[1:]) if grad.dim() > 0 else grad
    per_unit = r.abs().flatten(1).sum(1)
    kept = torch.zeros(size // block, dtype=torch.bool)
    kept[list(keep)] = True
    return bool((per_unit[kept] > 0).all()), bool((per_unit[~kept] == 0).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_mask_mode_zeroes_gradients_of_masked_units(arch):
    model = tiny(arch).train()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    ctl = ChaosController(model, ChaosConfig(strategy="mask", seed=4, **SMALL_GROUPS))
    plan = find_block(ctl.scheduler, ["both", "attn", "mlp", "dead"])
    ctl.begin_block(plan.block)
    assert len(model.model.layers) == 10  # masks keep the structure
    model(x, labels=x).loss.backward()
    layers = surgery.original_layers(model)
    for i in plan.layers("both", "attn"):
        attn, kv = layers[i].self_attn, plan.kv_heads[i]
        q = [h * 2 + j for h in kv for j in range(2)]  # 4 query heads over 2 KV heads
        assert rows_zero(attn.q_proj.weight.grad, 64, q, 16) == (True, True)
        assert rows_zero(attn.k_proj.weight.grad, 32, kv, 16) == (True, True)
        assert rows_zero(attn.v_proj.weight.grad, 32, kv, 16) == (True, True)
        assert rows_zero(attn.o_proj.weight.grad, 64, plan.attn_hidden_groups[i], 16) == (True, True)
        assert rows_zero(attn.o_proj.weight.grad.T, 64, q, 16)[1]  # inputs of masked heads
        if arch == "qwen2":
            assert rows_zero(attn.q_proj.bias.grad, 64, q, 16) == (True, True)
    for i in plan.layers("both", "mlp"):
        mlp, ch = layers[i].mlp, plan.mlp_groups[i]
        assert rows_zero(mlp.gate_proj.weight.grad, 256, ch, 32) == (True, True)
        assert rows_zero(mlp.up_proj.weight.grad, 256, ch, 32) == (True, True)
        assert rows_zero(mlp.down_proj.weight.grad.T, 256, ch, 32) == (True, True)
        assert rows_zero(mlp.down_proj.weight.grad, 64, plan.mlp_hidden_groups[i], 16)[1]
    for i in plan.layers("dead"):
        assert all(p.grad is None for p in layers[i].parameters())
    for i in plan.layers("attn"):
        assert all(p.grad is None for p in layers[i].mlp.parameters())
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, ref)
        with ctl.restored():
            assert torch.equal(model(x).logits, ref)
        ctl.end()
        assert torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_hoist_equals_masking_with_everything_kept(arch):
    """With full keep fractions and zero stubs, hoisting is an exact re-expression of the masked
    model: same logits every block, same updates after training through several blocks.
    Qwen2 uses sliding-window layers here, so a wrong per-position layer type would show."""
    changes = dict(use_sliding_window=True, sliding_window=4, max_window_layers=5) if arch == "qwen2" else {}
    base = tiny(arch, seed=3, **changes).train()
    if arch == "qwen2":
        assert "sliding_attention" in base.config.layer_types
    keep_all = dict(kv_heads_keep_min=1.0, kv_heads_keep_max=1.0, mlp_channels_keep_min=1.0,
                    mlp_channels_keep_max=1.0, mlp_core_keep_min=1.0, mlp_core_keep_max=1.0,
                    hidden_keep_min=1.0, hidden_keep_max=1.0)
    models, ctls, opts = [], [], []
    for strategy in ("hoist", "mask"):
        model = copy.deepcopy(base)
        cfg = ChaosConfig(strategy=strategy, stub_std=0.0, sticky_interval=1, seed=11, **keep_all)
        models.append(model)
        ctls.append(ChaosController(model, cfg))
        opts.append(torch.optim.AdamW(model.parameters(), lr=1e-2))
    seen = set()
    for step in range(6):
        x = tokens(seed=step, seq_len=12)
        losses = []
        for model, ctl, opt in zip(models, ctls, opts):
            assert ctl.begin(step, opt) == ctl.plan.modes  # sticky_interval 1: a block per step
            plan = ctl.plan
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        seen.update(plan.modes)
        assert torch.equal(losses[0], losses[1])
    assert {"dead", "attn", "mlp", "identity", "both"} <= seen
    for ctl in ctls:
        ctl.end()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), name  # bit for bit on CPU


# ----------------------------------------------------------------------------- optimizer state


def test_optimizer_state_reset_and_offload():
    for mode in ("reset", "offload"):
        model = tiny("llama").train()
        ctl = ChaosController(model, ChaosConfig(seed=2, sticky_interval=1, optimizer_state=mode))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for p in model.parameters():  # give every parameter some state
            p.grad = torch.ones_like(p)
        opt.step()
        saved = {p: opt.state[p]["exp_avg"].clone() for p in model.parameters()}
        params = list(saved)
        ctl.begin(0, opt)
        plan = ctl.plan
        frozen = [p for p in params if not p.requires_grad]
        assert frozen and plan.layers("dead") and len(list(model.parameters())) < len(params)
        for p in params:
            if mode == "reset":
                assert (p in opt.state) == p.requires_grad
            else:
                assert torch.equal(opt.state[p]["exp_avg"], saved[p])
                assert (p in ctl._offloaded) == (not p.requires_grad)
        ctl.end(opt)
        assert not ctl._offloaded


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_restored_round_trip(arch, tmp_path):
    model = tiny(arch).train()
    keys = set(model.state_dict())
    ctl = ChaosController(model, ChaosConfig(seed=2, sticky_interval=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        ctl.begin(step, opt)
        model(tokens(step), labels=tokens(step)).loss.backward()
        opt.step()
        opt.zero_grad()
    def layout():
        return [type(m).__name__ for m in model.model.layers]

    hoisted = layout()
    assert {"BiasStub", "AttentionOnly", "MlpOnly"} & set(hoisted)
    save_pretrained_restored(ctl, model, tmp_path)
    assert layout() == hoisted  # the block is re-applied
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 10
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert set(loaded.state_dict()) == keys
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "model.safetensors")) <= keys
    model.eval()
    x = tokens(9)
    with torch.no_grad(), ctl.restored():
        assert torch.equal(loaded(x).logits, model(x).logits)
    ctl.end()


# ----------------------------------------------------------------------------- LISA


def test_lisa_trains_n_layers_and_the_ends():
    model = tiny("qwen2")
    ctl = LisaController(model, LisaConfig(interval=20, n_layers=2, seed=1))
    layers = surgery.original_layers(model)
    picks = []
    for step in range(0, 200, 20):
        active = ctl.begin(step)
        assert ctl.begin(step + 1) is None  # same block
        trained = [i for i, layer in enumerate(layers) if all(p.requires_grad for p in layer.parameters())]
        frozen = [i for i, layer in enumerate(layers) if not any(p.requires_grad for p in layer.parameters())]
        assert trained == active and len(active) == 2 and len(frozen) == 8
        for p in (model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight):
            assert p.requires_grad
        picks.append(active)
    assert len({tuple(a) for a in picks}) > 3
    again = LisaController(model, LisaConfig(interval=20, n_layers=2, seed=1))
    assert [again.layers_of(b) for b in range(10)] == picks
    other = LisaController(model, LisaConfig(interval=20, n_layers=2, seed=2))
    assert [other.layers_of(b) for b in range(10)] != picks
    ctl.end()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="n_layers"):
        LisaController(model, LisaConfig(n_layers=11))
