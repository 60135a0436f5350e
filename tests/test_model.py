"""The baseline GPT: exact parameter count and names, init behaviour, softcap, causality,
the activations, the U-Net residual, config errors, a tiny model that learns, and fullgraph
compile."""

import math
import shutil

import pytest
import torch

from underpar.config import from_dict, override, validate
from underpar.errors import ConfigError
from underpar.model.config import GPTConfig
from underpar.model.gpt import GPT, build, num_params
from underpar.model.linear import CastedLinear
from underpar.model.mlp import ACTIVATIONS
from underpar.model.rope import Rotary
from underpar.model.precision import CONTROL_PATTERNS, cast_for_bf16_training, is_control

TINY = {"vocab_size": 128, "num_layers": 2, "model_dim": 64, "attention": {"num_heads": 4, "num_kv_heads": 2}}


def tiny(*sets: str) -> GPT:
    """The tiny model with `section.key=value` overrides, e.g. tiny("mlp.mult=1.5")."""
    cfg = from_dict(GPTConfig, TINY)
    for assignment in sets:
        cfg = override(cfg, assignment)
    torch.manual_seed(0)
    return build(cfg)


def random_batch(vocab: int, batch: int = 2, seq_len: int = 32, seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


@pytest.fixture(scope="module")
def baseline() -> GPT:
    torch.manual_seed(0)
    return build(GPTConfig())


# ---------------------------------------------------------------------------------------
# the published baseline


def test_baseline_has_the_published_parameter_count(baseline):
    assert num_params(baseline) == 17_059_912


def test_untied_head_adds_vocab_by_dim(baseline):
    untied = build(from_dict(GPTConfig, {"embeddings": {"tied": False}}))
    assert num_params(untied) - num_params(baseline) == 1024 * 512


def test_state_dict_keys_match_the_reference_names(baseline):
    keys = set(baseline.state_dict())
    per_block = {
        "attn_scale", "mlp_scale", "resid_mix", "attn.q_gain", "attn.c_q.weight",
        "attn.c_k.weight", "attn.c_v.weight", "attn.proj.weight", "mlp.fc.weight",
        "mlp.proj.weight",
    }  # fmt: skip
    expected = {"tok_emb.weight", "skip_weights"}
    expected |= {f"blocks.{i}.{name}" for i in range(9) for name in per_block}
    assert keys == expected
    assert baseline.skip_weights.shape == (4, 512)
    assert baseline.blocks[0].attn.c_k.weight.shape == (256, 512)  # 4 KV heads of 64


def test_baseline_init(baseline):
    emb = baseline.tok_emb.weight
    assert abs(emb.std().item() - 0.005) < 2e-4
    for block in baseline.blocks:
        assert torch.count_nonzero(block.attn.proj.weight) == 0
        assert torch.count_nonzero(block.mlp.proj.weight) == 0
        assert torch.all(block.attn.q_gain == 1.5)
        assert torch.all(block.resid_mix[0] == 1) and torch.all(block.resid_mix[1] == 0)
        assert torch.all(block.attn_scale == 1) and torch.all(block.mlp_scale == 1)
    assert torch.all(baseline.skip_weights == 1)


def test_loss_at_init_is_about_log_vocab(baseline):
    inputs, targets = random_batch(1024, seq_len=64)
    with torch.no_grad():
        loss = baseline(inputs, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - math.log(1024)) < 0.05


def test_untied_loss_at_init_is_exactly_log_vocab():
    model = tiny("embeddings.tied=false")  # zero-init head -> uniform logits
    inputs, targets = random_batch(128)
    with torch.no_grad():
        assert model(inputs, targets).item() == pytest.approx(math.log(128), abs=1e-5)


# ---------------------------------------------------------------------------------------
# forward behaviour


def test_forward_shapes_and_views_agree():
    model = tiny()
    inputs, targets = random_batch(128, batch=3, seq_len=16)
    with torch.no_grad():
        logits = model(inputs)
        assert logits.shape == (3, 16, 128) and logits.dtype == torch.float32
        assert torch.equal(logits, model.logits(inputs))
        losses = model.token_losses(inputs, targets)
        assert losses.shape == (3, 16)
        assert losses.mean().item() == pytest.approx(model(inputs, targets).item(), rel=1e-6)


def test_logits_are_softcapped():
    model = tiny("embeddings.logit_softcap=2.0")
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000.0)  # raw logits in the thousands
        logits = model(random_batch(128)[0])
    assert logits.abs().max().item() <= 2.0
    assert logits.abs().max().item() > 1.9


def test_softcap_zero_disables_the_cap():
    model = tiny("embeddings.logit_softcap=0.0")
    with torch.no_grad():
        model.tok_emb.weight.mul_(1000.0)
        assert model(random_batch(128)[0]).abs().max().item() > 30.0


def test_trained_baseline_logits_stay_within_30(baseline):
    with torch.no_grad():
        saved = baseline.tok_emb.weight.clone()
        baseline.tok_emb.weight.mul_(1000.0)
        logits = baseline(random_batch(1024, batch=1, seq_len=16)[0])
        baseline.tok_emb.weight.copy_(saved)
    assert logits.abs().max().item() <= 30.0


def perturbed(model: GPT) -> GPT:
    """Give the zero-initialized projections weights so every path carries signal."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CastedLinear) and module.zero_init:
                module.weight.normal_(0.0, 0.05)
    return model


def test_causality_earlier_positions_ignore_later_tokens():
    model = perturbed(tiny("num_layers=3"))
    inputs, _ = random_batch(128, batch=1, seq_len=24)
    changed = inputs.clone()
    t = 13
    changed[0, t] = (changed[0, t] + 1) % 128
    with torch.no_grad():
        before, after = model(inputs), model(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax(dim=-1).min() > 1e-4


def unet_by_hand(model: GPT, inputs: torch.Tensor) -> torch.Tensor:
    """The baseline's U-Net written out for 4 blocks: 2 encoder outputs added back in reverse."""
    x = x0 = torch.nn.functional.rms_norm(model.tok_emb(inputs), (model.cfg.model_dim,))
    b, w = model.blocks, model.skip_weights
    e0 = b[0](x, x0)
    e1 = b[1](e0, x0)
    x = b[2](e1 + w[0] * e1, x0)
    x = b[3](x + w[1] * e0, x0)
    return torch.nn.functional.rms_norm(x, (model.cfg.model_dim,))


def test_unet_adds_encoder_outputs_back_in_reverse_order():
    model = perturbed(tiny("num_layers=4"))
    with torch.no_grad():
        model.skip_weights.uniform_(0.5, 1.5)
        inputs = random_batch(128, seq_len=8)[0]
        torch.testing.assert_close(model.hidden(inputs), unet_by_hand(model, inputs), rtol=0, atol=0)
    assert (model.num_encoder_layers, model.num_decoder_layers, model.num_skips) == (2, 2, 2)


def test_without_unet_skips_the_blocks_are_a_plain_stack():
    model = perturbed(tiny("num_layers=3", "residual.encoder_layers=0"))
    assert model.skip_weights.shape == (0, 64)
    assert num_params(tiny("num_layers=3")) - num_params(model) == 1 * 64
    inputs = random_batch(128, seq_len=8)[0]
    with torch.no_grad():
        x = x0 = torch.nn.functional.rms_norm(model.tok_emb(inputs), (64,))
        for block in model.blocks:
            x = block(x, x0)
        torch.testing.assert_close(model.hidden(inputs), torch.nn.functional.rms_norm(x, (64,)), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_runs(name):
    model = perturbed(tiny(f"mlp.activation={name}"))
    inputs, targets = random_batch(128, seq_len=8)
    loss = model(inputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.blocks[0].mlp.fc.weight.grad.abs().sum() > 0


def test_leaky_relu2_squares_a_half_slope_leak():
    x = torch.tensor([-2.0, -0.5, 0.0, 3.0])
    assert torch.equal(ACTIVATIONS["leaky_relu2"](x), torch.tensor([1.0, 0.0625, 0.0, 9.0]))
    assert torch.equal(ACTIVATIONS["relu2"](x), torch.tensor([0.0, 0.0, 0.0, 9.0]))


def test_fractional_mlp_mult_sets_hidden_width():
    model = tiny("mlp.mult=1.5")
    assert model.blocks[0].mlp.fc.weight.shape == (96, 64)


def test_rotary_rotates_half_split_pairs_by_position_times_frequency():
    rotary = Rotary(head_dim=8, base=10000.0)
    cos, sin = rotary(seq_len=5, device=torch.device("cpu"), dtype=torch.float32)
    assert cos.shape == (1, 1, 5, 4)
    inv_freq = 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    expected = torch.outer(torch.arange(5).double(), inv_freq)
    torch.testing.assert_close(cos[0, 0].double(), expected.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, 0].double(), expected.sin(), rtol=0, atol=1e-6)


def test_bfloat16_rope_reproduces_the_reference_rounding_of_positions():
    rounded = Rotary(64, 10000.0, torch.bfloat16)(1024, torch.device("cpu"), torch.float32)[0]
    exact = Rotary(64, 10000.0)(1024, torch.device("cpu"), torch.float32)[0]
    assert torch.equal(rounded[..., 256, :], rounded[..., 257, :])  # 257 rounds to 256
    assert not torch.equal(exact[..., 256, :], exact[..., 257, :])


# ---------------------------------------------------------------------------------------
# config validation


def test_unknown_activation_lists_the_valid_ones():
    cfg = from_dict(GPTConfig, {"mlp": {"activation": "swish9"}})
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert "mlp.activation" in message and "swish9" in message
    for name in ACTIVATIONS:
        assert name in message


def test_build_validates_the_config():
    with pytest.raises(ConfigError, match="mlp.activation"):
        build(override(GPTConfig(), "mlp.activation=nope"))


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"model_dim": 500, "attention": {"num_heads": 8}}, "attention.num_heads"),
        ({"attention": {"num_heads": 8, "num_kv_heads": 3}}, "attention.num_kv_heads"),
        ({"model_dim": 24, "attention": {"num_heads": 8, "num_kv_heads": 4}}, "head dim"),
        ({"mlp": {"mult": 1.001}}, "mlp.mult"),
        ({"num_layers": 0}, "num_layers"),
        ({"embeddings": {"logit_softcap": -1.0}}, "embeddings.logit_softcap"),
        ({"attention": {"rope_dtype": "float16"}}, "attention.rope_dtype"),
    ],
)
def test_bad_shapes_are_config_errors_naming_the_key(changes, key):
    cfg = from_dict(GPTConfig, changes)
    with pytest.raises(ConfigError, match=key):
        validate(cfg)


def test_overrides_reach_the_model_config():
    cfg = override(GPTConfig(), "mlp.activation=leaky_relu2")
    cfg = override(cfg, "mlp.mult=4")
    cfg = override(cfg, "attention.num_kv_heads=2")
    validate(cfg)
    assert cfg.mlp.activation == "leaky_relu2" and cfg.mlp.mult == 4.0
    assert cfg.attention.num_kv_heads == 2


def test_old_flat_keys_are_errors_that_list_the_sections():
    with pytest.raises(ConfigError, match="valid keys here: .*attention.*mlp"):
        override(GPTConfig(), "num_heads=4")


# ---------------------------------------------------------------------------------------
# precision


def test_control_patterns_cover_exactly_the_small_steering_params(baseline):
    control = {name for name, _ in baseline.named_parameters() if is_control(name)}
    suffixes = {name.rsplit(".", 1)[-1] for name in control}
    assert suffixes == {"attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weights"}
    assert all(any(p in name for p in CONTROL_PATTERNS) for name in control)
    assert not any(is_control(name) for name in baseline.state_dict() if name.endswith(".weight"))


def test_bf16_layout_keeps_linears_and_control_params_fp32():
    model = cast_for_bf16_training(perturbed(tiny()))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes.pop("tok_emb.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}
    inputs, targets = random_batch(128, seq_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(inputs, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert model.blocks[0].resid_mix.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------
# learning and compiling


def test_tiny_model_fits_a_repeated_batch():
    model = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = random_batch(128, batch=4, seq_len=32)
    losses = []
    for _ in range(30):
        loss = model(inputs, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(128), abs=0.05)
    assert losses[-1] < 0.25 * losses[0]


def compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    model = perturbed(tiny())
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    inputs, targets = random_batch(128, seq_len=16)
    loss = compiled(inputs, targets)
    loss.backward()
    torch.testing.assert_close(loss, model(inputs, targets), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    assert model.blocks[0].attn.c_q.weight.grad is not None


def test_fullgraph_compile_traces_without_graph_breaks():
    # aot_eager runs dynamo + AOT autograd (where graph breaks and tracing errors surface)
    # without generating C++; it takes a few seconds on CPU.
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="inductor on CPU needs a C compiler (cc)")
def test_fullgraph_compile_with_inductor():
    # ~40 s on 2 CPU cores (C++ codegen for forward and backward).
    compiled_matches_eager("inductor")
