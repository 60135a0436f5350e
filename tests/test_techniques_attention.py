"""The attention techniques of issue 12, each off by default: partial RoPE, NTK-aware and YaRN
scaling, the sparse/dense output gate, XSA, the QK-gain and softcap bounds, and GQA down to
MQA; where their parameters go (optimizer, precision); the speed switches (SDPA kernel,
expanded K/V, one QKV matmul), which compute the same attention; and combined configs under
fullgraph compile."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from underpar.config import from_dict, override, validate
from underpar.errors import ConfigError
from underpar.model.attention import AttentionConfig, CausalSelfAttention, check_sdpa_backend, remove_self_value
from underpar.model.attention_gates import head_gates
from underpar.model.config import GPTConfig
from underpar.model.gpt import build, num_params
from underpar.model.precision import cast_for_bf16_training, is_control
from underpar.model.rope import Rotary, apply_rotary
from underpar.model.rope_scaling import (
    NTKScaling,
    YaRNScaling,
    ntk_base,
    rope_inv_freq,
    yarn_inv_freq,
    yarn_logit_scale,
    yarn_ramp,
)
from underpar.optim import OptimConfig, describe_param_table

from test_model import TINY, tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tables(rotary: Rotary, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    return rotary(seq_len, CPU, torch.float32)


def attention(**fields) -> CausalSelfAttention:
    """A 32-wide attention (4 heads of 8, 2 KV heads) with a non-zero output projection."""
    cfg = from_dict(AttentionConfig, {"num_heads": 4, "num_kv_heads": 2, **fields})
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, cfg)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    return attn


def proj_input(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """What the output projection receives: the heads' outputs [B, T, heads * head_dim]."""
    seen = []
    handle = attn.proj.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        attn(x)
    finally:
        handle.remove()
    return seen[0]


def inputs(batch: int = 2, seq_len: int = 12, dim: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq_len, dim, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------
# partial RoPE


def test_partial_rope_leaves_the_dims_beyond_rotary_dims_position_independent():
    rotary = Rotary(16, 10000.0, rotary_dims=4)
    cos, sin = tables(rotary, 10)
    assert cos.shape == (1, 1, 10, 2)
    x = torch.randn(16).expand(1, 1, 10, 16)  # one vector at every position
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 4:], x[..., 4:])  # no position in dims 4..15
    assert not torch.allclose(out[0, 0, 1, :4], out[0, 0, 2, :4])  # positions in dims 0..3
    # The rotated dims are a 4-dim RoPE (its frequencies span those dims).
    full = Rotary(4, 10000.0)
    torch.testing.assert_close(out[..., :4], apply_rotary(x[..., :4], *tables(full, 10)), rtol=0, atol=0)


def test_partial_rope_scores_of_the_unrotated_dims_do_not_depend_on_distance():
    rotary = Rotary(8, 10000.0, rotary_dims=2)
    cos, sin = tables(rotary, 6)
    q = apply_rotary(torch.randn(8).expand(1, 1, 6, 8), cos, sin)
    k = apply_rotary(torch.randn(8).expand(1, 1, 6, 8), cos, sin)
    scores = q[0, 0, :, 2:] @ k[0, 0, :, 2:].T
    torch.testing.assert_close(scores, torch.full_like(scores, scores[0, 0].item()))
    rotated = q[0, 0, :, :2] @ k[0, 0, :, :2].T
    assert not torch.allclose(rotated, torch.full_like(rotated, rotated[0, 0].item()))


def test_all_dims_is_the_default_and_rotary_dims_equal_to_head_dim_is_the_same_model():
    default, explicit = tiny(), tiny("attention.rotary_dims=16")
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for a, b in zip(default.parameters(), explicit.parameters()):
        torch.nn.init.normal_(a, std=0.1, generator=torch.Generator().manual_seed(a.numel()))
        b.data.copy_(a.data)
    assert torch.equal(default(x), explicit(x))
    assert default.blocks[0].attn.rotary.rotary_dims == 16


@pytest.mark.parametrize("dims", [3, 18, 1])
def test_rotary_dims_must_be_even_and_within_the_head(dims):
    cfg = from_dict(GPTConfig, TINY)
    with pytest.raises(ConfigError, match="attention.rotary_dims"):
        validate(override(cfg, f"attention.rotary_dims={dims}"))


# ---------------------------------------------------------------------------------------
# NTK-aware and YaRN scaling


@pytest.mark.parametrize("kind", ["ntk", "yarn"])
def test_factor_one_is_plain_rope_at_every_length(kind):
    plain = Rotary(16, 10000.0, rotary_dims=8)
    for scaling in ({"factor": 1.0}, {"factor": 0.0, "train_seq_len": 64}):
        cfg = from_dict(AttentionConfig, {"rope_scaling": {"name": kind, **scaling}})
        scaled = Rotary(16, 10000.0, rotary_dims=8, scaling=cfg.rope_scaling)
        for seq_len in (16, 64):
            assert all(torch.equal(a, b) for a, b in zip(tables(scaled, seq_len), tables(plain, seq_len)))
            assert scaled.logit_scale(seq_len) == 1.0
    # Without the factor-1 shortcut the YaRN formula gives plain RoPE too.
    theta = rope_inv_freq(10000.0, 16)
    torch.testing.assert_close(yarn_inv_freq(theta, 1.0, 64, 1.0, 32.0), theta, rtol=1e-7, atol=0)


def test_ntk_at_the_training_length_is_only_a_larger_base():
    # A fixed factor applies at every length: exactly plain RoPE with base * s^(d/(d-2)).
    ntk = Rotary(16, 10000.0, rotary_dims=8, scaling=NTKScaling(factor=4.0, train_seq_len=32))
    assert ntk_base(10000.0, 8, 4.0) == 10000.0 * 4.0 ** (8 / 6)
    bigger_base = Rotary(16, ntk_base(10000.0, 8, 4.0), rotary_dims=8)
    assert all(torch.equal(a, b) for a, b in zip(tables(ntk, 32), tables(bigger_base, 32)))
    # It keeps the highest frequency and divides the lowest by exactly the factor.
    new, old = rope_inv_freq(ntk_base(10000.0, 8, 4.0), 8), rope_inv_freq(10000.0, 8)
    assert new[0] == old[0] == 1.0
    torch.testing.assert_close(new[-1], old[-1] / 4.0, rtol=1e-6, atol=0)
    # Following the length (factor 0): nothing at the training length, factor 2 at twice it.
    auto = Rotary(16, 10000.0, rotary_dims=8, scaling=NTKScaling(train_seq_len=32))
    assert all(torch.equal(a, b) for a, b in zip(tables(auto, 32), tables(Rotary(16, 10000.0, rotary_dims=8), 32)))
    doubled = Rotary(16, ntk_base(10000.0, 8, 2.0), rotary_dims=8)
    assert all(torch.equal(a, b) for a, b in zip(tables(auto, 64), tables(doubled, 64)))


def test_yarn_ramp_interpolates_long_wavelengths_and_keeps_short_ones():
    train_len, factor = 100, 4.0
    rotations = torch.tensor([64.0, 32.0, 16.5, 1.0, 0.5])  # over the training context
    theta = rotations * 2 * math.pi / train_len
    gamma = yarn_ramp(theta, train_len, alpha=1.0, beta=32.0)
    torch.testing.assert_close(gamma, torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    scaled = yarn_inv_freq(theta, factor, train_len, 1.0, 32.0)
    expected = theta * torch.tensor([1.0, 1.0, 0.5 / factor + 0.5, 1 / factor, 1 / factor])
    torch.testing.assert_close(scaled, expected)


def test_yarn_temperature_scales_the_logits_by_the_square_of_point_one_ln_s_plus_one():
    assert yarn_logit_scale(1.0) == 1.0
    assert yarn_logit_scale(4.0) == pytest.approx((0.1 * math.log(4.0) + 1) ** 2)
    # With every frequency kept (gamma = 1 everywhere) YaRN differs from plain RoPE only by
    # the temperature: the same as multiplying the query gain by it.
    keep_all = YaRNScaling(factor=4.0, train_seq_len=16, alpha=0.0, beta=1e-9)
    yarn, plain = attention(rope_scaling=keep_all), attention()
    with torch.no_grad():
        plain.q_gain.mul_(yarn_logit_scale(4.0))
    x = inputs()
    torch.testing.assert_close(yarn(x), plain(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(yarn(x), attention()(x), atol=1e-4)


def test_bad_scaling_settings_are_config_errors():
    for scaling, key in (
        ({"name": "ntk", "factor": 0.5}, "factor"),
        ({"name": "yarn", "alpha": 40.0}, "alpha"),
        ({"name": "yarn", "train_seq_len": 0}, "train_seq_len"),
        ({"name": "rope9"}, "rope_scaling"),
    ):
        with pytest.raises(ConfigError, match=key):
            validate(from_dict(GPTConfig, {**TINY, "attention": {"rope_scaling": scaling}}))
    with pytest.raises(ConfigError, match="more than 2 rotary dims"):
        validate(from_dict(GPTConfig, {**TINY, "attention": {"rotary_dims": 2, "rope_scaling": "ntk"}}))


# ---------------------------------------------------------------------------------------
# attention output gates


def test_sparse_gate_reads_only_its_window_and_gates_each_head():
    x = inputs(dim=32)
    weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    gates = head_gates(x, weight, scale=0.5)
    assert gates.shape == (2, 4, 12, 1)
    expected = torch.sigmoid(0.5 * torch.einsum("btk,hk->bht", x[..., :12], weight))
    torch.testing.assert_close(gates[..., 0], expected)
    changed = x.clone()
    changed[..., 12:] += 5.0
    assert torch.equal(head_gates(changed, weight, 0.5), gates)


def test_zero_init_gate_halves_every_head_and_a_closed_gate_silences_one_head():
    gated, plain = attention(gate="sparse"), attention()
    assert tuple(gated.attn_gate_w.shape) == (4, 12) and not gated.attn_gate_w.any()
    x = inputs().abs()  # positive inputs, so a negative weight row closes its head's gate
    torch.testing.assert_close(proj_input(gated, x), 0.5 * proj_input(plain, x))
    with torch.no_grad():
        gated.attn_gate_w[1] = -100.0
        gated.attn_gate_w[[0, 2, 3]] = 100.0
    heads = proj_input(gated, x).view(2, 12, 4, 8)
    assert heads[:, :, 1].abs().max() < 1e-12
    torch.testing.assert_close(heads[:, :, [0, 2, 3]], proj_input(plain, x).view(2, 12, 4, 8)[:, :, [0, 2, 3]])


@pytest.mark.parametrize("gate, per_layer", [("sparse", 4 * 12), ("dense", 4 * 64)])
def test_gate_parameters_count_go_to_adam_and_stay_fp32(gate, per_layer):
    base, model = tiny(), tiny(f"attention.gate={gate}")
    assert num_params(model) - num_params(base) == 2 * per_layer  # 2 layers
    rows = {name: (opt, lr) for name, _shape, opt, lr in describe_param_table(model, OptimConfig())}
    assert rows["blocks.0.attn.attn_gate_w"] == ("adam", OptimConfig().scalar_lr)
    assert is_control("blocks.1.attn.attn_gate_w")  # fp32 in the exported artifact
    assert cast_for_bf16_training(model).blocks[0].attn.attn_gate_w.dtype == torch.float32


def test_gate_settings_are_validated():
    with pytest.raises(ConfigError, match="gate.window"):
        validate(from_dict(GPTConfig, {**TINY, "attention": {"gate": {"name": "sparse", "window": 65}}}))
    with pytest.raises(ConfigError, match="gate.scale"):
        validate(from_dict(GPTConfig, {**TINY, "attention": {"gate": {"name": "sparse", "scale": -1.0}}}))
    cfg = override(from_dict(GPTConfig, TINY), "attention.gate=sparse")
    cfg = override(cfg, "attention.gate.window=8")
    validate(cfg)
    assert cfg.attention.gate.window == 8
    assert tiny("attention.gate=sparse", "attention.gate.window=8").blocks[0].attn.attn_gate_w.shape == (4, 8)


# ---------------------------------------------------------------------------------------
# XSA


def test_xsa_removes_the_tokens_own_value_direction_per_head_with_gqa():
    y = torch.randn(2, 6, 5, 8, generator=torch.Generator().manual_seed(3))  # 6 heads
    v = torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(4))  # 2 KV heads
    out = remove_self_value(y, v)
    for h in range(6):
        own_v = v[:, h // 3]  # query heads 0-2 read KV head 0, heads 3-5 KV head 1
        dots = (out[:, h] * own_v).sum(-1)
        assert dots.abs().max() < 1e-5
        removed = (y[:, h] * own_v).sum(-1, keepdim=True) / own_v.square().sum(-1, keepdim=True) * own_v
        torch.testing.assert_close(out[:, h], y[:, h] - removed)


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_xsa_attention_output_is_orthogonal_to_the_own_value(kv_heads):
    attn = attention(num_kv_heads=kv_heads)
    attn.xsa = True
    x = inputs()
    heads = proj_input(attn, x).view(2, 12, 4, 8)
    v = attn.c_v(x).view(2, 12, kv_heads, 8)
    group = 4 // kv_heads
    for h in range(4):
        assert (heads[:, :, h] * v[:, :, h // group]).sum(-1).abs().max() < 1e-5
    # Only the own-value direction goes: the first token (which sees only itself) outputs 0.
    assert heads[:, 0].abs().max() < 1e-5


def test_xsa_on_all_layers_or_on_chosen_ones():
    assert [b.attn.xsa for b in tiny().blocks] == [False, False]
    assert [b.attn.xsa for b in tiny("attention.xsa=true").blocks] == [True, True]
    assert [b.attn.xsa for b in tiny("attention.xsa=true", "attention.xsa_layers=[1]").blocks] == [False, True]
    for sets, match in (
        (["attention.xsa_layers=[1]"], "xsa is false"),
        (["attention.xsa=true", "attention.xsa_layers=[2]"], "xsa_layers"),
        (["attention.xsa=true", "attention.xsa_layers=[0, 0]"], "xsa_layers"),
    ):
        cfg = from_dict(GPTConfig, TINY)
        for assignment in sets:
            cfg = override(cfg, assignment)
        with pytest.raises(ConfigError, match=match):
            validate(cfg)


# ---------------------------------------------------------------------------------------
# QK gain, softcap, MQA


@pytest.mark.parametrize("gain, ok", [(1.5, True), (5.25, True), (0.5, True), (0.0, False), (-1.0, False), (12.0, False)])
def test_qk_gain_init_is_bounded(gain, ok):
    cfg = override(from_dict(GPTConfig, TINY), f"attention.qk_gain_init={gain}")
    if ok:
        validate(cfg)
        assert torch.equal(build(cfg).blocks[1].attn.q_gain, torch.full((4,), gain))
    else:
        with pytest.raises(ConfigError, match="attention.qk_gain_init"):
            validate(cfg)


def test_logit_softcap_is_validated():
    for bad in ("-1", "nan", "thirty"):
        with pytest.raises(ConfigError, match="logit_softcap"):
            validate(override(from_dict(GPTConfig, TINY), f"embeddings.logit_softcap={bad}"))
    validate(override(from_dict(GPTConfig, TINY), "embeddings.logit_softcap=0"))  # 0: no cap


def test_multi_query_attention_has_one_kv_head():
    model = tiny("attention.num_kv_heads=1")
    attn = model.blocks[0].attn
    assert attn.c_k.weight.shape == attn.c_v.weight.shape == (16, 64)
    assert num_params(tiny()) - num_params(model) == 2 * 2 * (16 * 64)  # k and v, 2 layers
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    assert model(x).shape == (2, 8, 128)  # test_model's tiny: width 64, 4 heads of 16 dims, 2 KV heads, vocab 128


# ---------------------------------------------------------------------------------------
# speed switches: the SDPA kernel, K/V expanded to every head, one QKV matmul


def output_and_grads(attn: CausalSelfAttention, x: torch.Tensor) -> list[torch.Tensor]:
    attn.zero_grad()
    y = attn(x)
    y.square().sum().backward()
    return [y.detach()] + [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("fields", [{"sdpa_backend": "math"}, {"sdpa_backend": "flash"}, {"expand_kv": True},
                                    {"fused_qkv": True}, {"sdpa_backend": "math", "expand_kv": True, "fused_qkv": True}])
def test_speed_switches_compute_the_same_attention_and_gradients(fields):
    x = inputs()
    plain, fast = attention(), attention(**fields)
    fast.load_state_dict(plain.state_dict())
    for a, b in zip(output_and_grads(plain, x), output_and_grads(fast, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # kernels differ in summation order
    for lin in (plain.c_q, plain.c_k, plain.c_v, fast.c_q, fast.c_k, fast.c_v):  # under QAT too
        lin.qat_bits = 4
    torch.testing.assert_close(plain(x), fast(x), rtol=1e-4, atol=1e-5)


def test_fused_qkv_is_one_matmul_in_training_and_the_three_linears_in_eval():
    attn, x = attention(fused_qkv=True), inputs()
    calls = []
    for lin in (attn.c_q, attn.c_k, attn.c_v):
        lin.register_forward_pre_hook(lambda m, args: calls.append(m))
    attn(x)
    assert calls == []  # training: the concatenated weight, not the modules
    attn.eval()
    attn(x)
    assert calls == [attn.c_q, attn.c_k, attn.c_v]  # eval: GPTQ's and TTT's hooks see every input


@pytest.mark.parametrize("backend, op", [("math", "aten.bmm"), ("flash", "aten._scaled_dot_product_flash_attention")])
def test_the_chosen_sdpa_kernel_is_the_one_in_the_compiled_graph(backend, op):
    targets = []

    def record(gm, _inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(attention(sdpa_backend=backend), fullgraph=True, backend=aot_autograd(fw_compiler=record))
    compiled(inputs())
    assert any(t.startswith(op) for t in targets)
    assert any("scaled_dot_product" in t for t in targets) == (backend != "math")


def test_an_sdpa_backend_that_cannot_run_is_a_clear_error():
    cfg = AttentionConfig()
    for name in ("auto", "math", "flash"):  # CPU has these
        check_sdpa_backend(dataclasses.replace(cfg, sdpa_backend=name), 512, CPU, torch.float32)
    for name in ("cudnn", "efficient"):
        with pytest.raises(ConfigError, match=f"sdpa_backend = '{name}' cannot run .* on cpu.*CUDA only.*valid: auto"):
            check_sdpa_backend(dataclasses.replace(cfg, sdpa_backend=name), 512, CPU, torch.float32)
    with pytest.raises(ConfigError, match="sdpa_backend"):
        validate(override(from_dict(GPTConfig, TINY), "attention.sdpa_backend=fa3"))


# ---------------------------------------------------------------------------------------
# everything together under fullgraph compile


COMBINED = [
    # partial RoPE + YaRN following the length (8 trained, 16 evaluated) + sparse gate + XSA
    # everywhere + MQA + the records' QK gain
    ["attention.num_kv_heads=1", "attention.rotary_dims=8", "attention.qk_gain_init=5.25",
     "attention.rope_scaling={name = 'yarn', train_seq_len = 8}", "attention.gate=sparse", "attention.xsa=true"],
    # fixed NTK factor + dense gate + XSA on one layer + GQA, with the speed switches (an
    # sdpa_kernel context inside the graph, K/V expanded, one QKV matmul)
    ["attention.rope_scaling={name = 'ntk', factor = 2.0}", "attention.gate=dense",
     "attention.gate.init_std=0.01", "attention.xsa=true", "attention.xsa_layers=[0]",
     "attention.sdpa_backend=math", "attention.expand_kv=true", "attention.fused_qkv=true"],
]


@pytest.mark.parametrize("sets", COMBINED, ids=["yarn-sparse-xsa-mqa", "ntk-dense-xsa1-gqa-speed"])
def test_combined_techniques_compile_fullgraph_and_match_eager(sets):
    torch._dynamo.reset()
    model = tiny(*sets)
    with torch.no_grad():
        for block in model.blocks:  # leave the zero init so gradients reach every part
            torch.nn.init.normal_(block.attn.proj.weight, std=0.05)
            torch.nn.init.normal_(block.mlp.proj.weight, std=0.05)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(5))
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss = compiled(x, y)
    loss.backward()
    torch.testing.assert_close(loss, model(x, y), rtol=1e-5, atol=1e-5)
    gate = model.blocks[0].attn.attn_gate_w
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:, :8]), model(x[:, :8]), rtol=1e-5, atol=1e-5)
