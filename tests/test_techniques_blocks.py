"""The MLP, residual and embedding techniques (issue 12): activations (silu^2, gelu^2,
leaky_relu^2 with a slope, swiglu and its width rule), the encoder/decoder split, parallel
blocks, the record's two residual lanes, layerwise LN scale, SmearGate with the BOS fix and
BigramHash; where their parameters go (optimizer, precision); fullgraph compile of them
all together."""

import math

import pytest
import torch
import torch.nn.functional as F

from underpar.config import from_dict, override, validate
from underpar.errors import ConfigError
from underpar.model.config import GPTConfig
from underpar.model.embeddings import BigramHash, SmearGate, bigram_buckets
from underpar.model.gpt import GPT, build, num_params
from underpar.model.linear import CastedLinear
from underpar.model.mlp import ACTIVATIONS
from underpar.model.precision import cast_for_bf16_training, is_control
from underpar.optim.build import OptimConfig
from underpar.optim.groups import describe_param_table

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 128, "num_layers": 2, "model_dim": 64, "attention": {"num_heads": 4, "num_kv_heads": 2}}
BOS = 1


def config(*sets: str) -> GPTConfig:
    cfg = from_dict(GPTConfig, TINY)
    for assignment in sets:
        cfg = override(cfg, assignment)
    return cfg


def tiny(*sets: str) -> GPT:
    torch.manual_seed(0)
    return build(config(*sets))


def perturbed(model: GPT) -> GPT:
    """Every zero-initialized weight and every gate/lane scalar moved off its init, so every
    path carries signal and a wrong routing shows."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CastedLinear) and module.zero_init:
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * 0.05)
        for name, p in model.named_parameters():
            if "lambdas" in name or "smear_gate.lam" in name or "skip_weights" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name == "bigram.embed.weight":
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def tokens(batch: int = 2, seq_len: int = 16, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, seq_len), generator=g)  # no BOS unless placed
    return ids


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


# ---------------------------------------------------------------------------------------
# activations


def test_squared_activations_and_the_leaky_slope():
    x = torch.linspace(-3, 3, 13)
    assert torch.equal(ACTIVATIONS["silu2"](x), F.silu(x).square())
    assert torch.equal(ACTIVATIONS["gelu2"](x), F.gelu(x).square())
    assert torch.equal(ACTIVATIONS["leaky_relu2"](x), F.leaky_relu(x, 0.5).square())  # the records' 0.5
    # The slope is a config field the MLP binds into the registered function.
    model = tiny("mlp.activation=leaky_relu2", "mlp.leaky_slope=0.25")
    assert torch.equal(model.blocks[0].mlp.activation(x), F.leaky_relu(x, 0.25).square())
    assert tiny("mlp.activation=leaky_relu2").blocks[1].mlp.activation(torch.tensor([-2.0])).item() == 1.0
    with pytest.raises(ConfigError, match="mlp.leaky_slope"):
        validate(config("mlp.leaky_slope=1.5"))


def test_swiglu_is_a_gated_mlp_with_matched_parameters():
    model = perturbed(tiny("mlp.activation=swiglu"))
    mlp = model.blocks[0].mlp
    # mult 2 at width 64: ungated hidden 128; gated floor(2/3 * 128) = 85.
    assert mlp.fc.weight.shape == mlp.gate.weight.shape == (85, 64) and mlp.proj.weight.shape == (64, 85)
    assert num_params(tiny()) - num_params(model) == 2 * (2 * 128 * 64 - 3 * 85 * 64)
    # Exactly the ungated count when 3 divides 2 * mult * model_dim (mult 3: hidden 128).
    assert num_params(tiny("mlp.mult=3", "mlp.activation=swiglu")) == num_params(tiny("mlp.mult=3"))
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        expected = F.linear(F.silu(F.linear(x, mlp.gate.weight)) * F.linear(x, mlp.fc.weight), mlp.proj.weight)
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# encoder/decoder split, parallel blocks, two lanes, LN scale


def test_encoder_layers_sets_the_unet_split():
    model = perturbed(tiny("num_layers=4", "residual.encoder_layers=1"))
    assert (model.num_encoder_layers, model.num_decoder_layers, model.num_skips) == (1, 3, 1)
    assert model.skip_weights.shape == (1, 64)
    ids = tokens(seq_len=8)
    with torch.no_grad():
        x = x0 = model.embed(ids)
        b, w = model.blocks, model.skip_weights
        e0 = b[0](x, x0)
        x = b[3](b[2](b[1](e0 + w[0] * e0, x0), x0), x0)
        torch.testing.assert_close(model.hidden(ids), norm(x), rtol=0, atol=0)
    # -1 is the baseline's half, 0 a pure decoder; more than the depth is an error.
    assert tiny("num_layers=5").num_encoder_layers == 2
    assert tiny("residual.encoder_layers=0").skip_weights.shape == (0, 64)
    with pytest.raises(ConfigError, match="encoder_layers"):
        validate(config("residual.encoder_layers=3"))


def test_parallel_blocks_add_attention_and_mlp_of_the_same_input():
    model = perturbed(tiny("residual.parallel_start=1", "residual.encoder_layers=0"))
    assert [b.parallel for b in model.blocks] == [False, True]
    assert num_params(model) == num_params(tiny("residual.encoder_layers=0"))  # no new parameters
    block = model.blocks[1]
    x, x0 = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    with torch.no_grad():
        mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
        expected = mixed + block.attn_scale * block.attn(norm(mixed)) + block.mlp_scale * block.mlp(norm(mixed))
        torch.testing.assert_close(block(x, x0), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="parallel_start"):
        validate(config("residual.parallel_start=2"))


def lanes_by_hand(block, lane0, lane1, x0):
    """PR #1529's dual-lane block, written out."""
    r, p = block.parallel_resid_lambdas, block.parallel_post_lambdas
    attn_in = block.resid_mix[0] * lane0 + block.resid_mix[1] * x0
    a = block.attn_scale * block.attn(norm(attn_in))
    m = block.mlp_scale * block.mlp(norm(lane1))  # the MLP reads lane 1 raw, not re-mixed
    return r[0] * lane0 + p[0, 0] * a + p[1, 0] * m, r[1] * lane1 + p[0, 1] * a + p[1, 1] * m


def test_two_lanes_route_like_the_record():
    model = tiny("num_layers=4", "residual.two_lane_start=2")
    # Each lane block owns 2 residual + 2x2 routing scalars, at the record's init.
    assert num_params(model) - num_params(tiny("num_layers=4")) == 2 * 6
    assert not hasattr(model.blocks[1], "parallel_resid_lambdas")
    assert torch.all(model.blocks[2].parallel_resid_lambdas == 1.1)
    assert torch.all(model.blocks[3].parallel_post_lambdas == 1.0)
    perturbed(model)
    ids = tokens(seq_len=8)
    with torch.no_grad():
        x0 = model.embed(ids)
        b, w = model.blocks, model.skip_weights
        e0 = b[0](x0, x0)
        e1 = b[1](e0, x0)
        lane0, lane1 = lanes_by_hand(b[2], e1 + w[0] * e1, e1, x0)  # skips enter lane 0 only
        lane0, lane1 = lanes_by_hand(b[3], lane0 + w[1] * e0, lane1, x0)
        torch.testing.assert_close(model.hidden(ids), norm(0.5 * (lane0 + lane1)), rtol=1e-5, atol=1e-6)
    # Lanes split in the decoder only, and only at a block that exists.
    for bad in ("residual.two_lane_start=1", "residual.two_lane_start=4"):
        with pytest.raises(ConfigError, match="two_lane_start"):
            validate(config("num_layers=4", bad))
    pure = tiny("num_layers=4", "residual.encoder_layers=0", "residual.two_lane_start=0")  # any block
    with torch.no_grad():
        x0 = pure.embed(ids)
        lanes = (x0, x0)
        for block in pure.blocks:
            lanes = lanes_by_hand(block, *lanes, x0)
        torch.testing.assert_close(pure.hidden(ids), norm(0.5 * (lanes[0] + lanes[1])), rtol=1e-5, atol=1e-6)


def test_layerwise_ln_scale_scales_each_blocks_norm_outputs_by_inverse_sqrt_depth():
    seen: dict[tuple[int, str], float] = {}

    def record(layer: int, branch: str):
        def hook(module, args):
            seen[(layer, branch)] = args[0].square().mean().sqrt().item()
        return hook

    model = perturbed(tiny("num_layers=3", "residual.layerwise_ln_scale=true", "residual.parallel_start=2"))
    assert num_params(model) == num_params(tiny("num_layers=3"))  # a constant, not a parameter
    for layer, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(record(layer, "attn"))
        block.mlp.register_forward_pre_hook(record(layer, "mlp"))
    with torch.no_grad():
        model(tokens())
    for (layer, _branch), rms in seen.items():
        assert rms == pytest.approx(1 / math.sqrt(layer + 1), rel=1e-4)
    assert len(seen) == 6


# ---------------------------------------------------------------------------------------
# SmearGate and BigramHash


def test_smeargate_mixes_the_previous_token_but_never_across_bos():
    smear = SmearGate(window=12, bos_id=BOS)
    with torch.no_grad():
        smear.lam.fill_(0.7)
        smear.proj.weight.normal_()
    ids = tokens(batch=1, seq_len=10)
    ids[0, 5] = BOS
    x = torch.randn(1, 10, 32)
    out = smear(x, ids)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(out[:, 5], x[:, 5])  # row start, BOS
    g = 0.7 * torch.sigmoid(x[0, 6, :12] @ smear.proj.weight[0])
    torch.testing.assert_close(out[0, 6], x[0, 6] + g * x[0, 5])
    # The previous document's last token changes nothing from the BOS on ...
    changed = x.clone()
    changed[0, 4] += 1.0
    assert torch.equal(smear(changed, ids)[:, 5:], out[:, 5:])
    # ... while without the BOS it would have leaked into position 5.
    ids[0, 5] = 7
    assert not torch.equal(smear(changed, ids)[:, 5], smear(x, ids)[:, 5])


def test_bigram_buckets_hash_pairs_and_sink_row_and_document_starts():
    ids = torch.tensor([[5, 9, 5, 9, BOS, 9, 5]])
    b = bigram_buckets(ids, 64, bos_id=BOS)
    sink = 63
    assert b[0, 0] == sink and b[0, 4] == sink  # no previous token in the document
    assert b[0, 1] == b[0, 3] == (36313 * 9 ^ 27191 * 5) % 63  # the records' hash of (5, 9)
    assert b[0, 2] == (36313 * 5 ^ 27191 * 9) % 63 and b[0, 2] != b[0, 1]  # order matters
    assert b[0, 5] == (36313 * 9 ^ 27191 * BOS) % 63  # (BOS, 9) is a pair inside the new document
    big = bigram_buckets(torch.randint(0, 65536, (4, 64)), 3072, bos_id=BOS)
    assert big.min() >= 0 and big.max() < 3072  # no int32 overflow at large vocabularies


def test_bigram_hash_parameters_and_start():
    model = tiny("embeddings.bigram_buckets=256", "embeddings.bigram_dim=16")
    assert num_params(model) - num_params(tiny()) == 256 * 16 + 16 * 64 + 1
    assert model.bigram.scale.item() == pytest.approx(0.05)
    assert BigramHash(256, 64, 64, BOS).proj is None  # no projection at the model width
    w = model.bigram.proj.weight
    torch.testing.assert_close(w.T @ w, torch.eye(16), rtol=0, atol=1e-5)  # orthogonal columns
    with pytest.raises(ConfigError, match="bigram_buckets"):
        validate(config("embeddings.bigram_buckets=1"))
    with pytest.raises(ConfigError, match="smear_window"):
        validate(config("embeddings.smear_gate=true", "embeddings.smear_window=65"))


def test_embedding_additions_start_silent_and_respect_documents():
    on = ("embeddings.smear_gate=true", "embeddings.bigram_buckets=64", "embeddings.bigram_dim=8")
    ids = tokens()
    with torch.no_grad():
        # Created after every other init and silent at init: the baseline's logits, exactly.
        torch.testing.assert_close(tiny(*on)(ids), tiny()(ids), rtol=0, atol=0)
        model = perturbed(tiny(*on))
        ids[:, 9] = BOS
        changed = ids.clone()
        changed[:, 8] = (changed[:, 8] + 5) % 128
        before, after = model.embed(ids), model.embed(changed)
        assert torch.equal(after[:, 9:], before[:, 9:])
        assert not torch.equal(after[:, 8], before[:, 8])
        ids[:, 9] = changed[:, 9] = 7  # no document boundary: the change reaches position 9
        assert not torch.equal(model.embed(changed)[:, 9], model.embed(ids)[:, 9])


# ---------------------------------------------------------------------------------------
# optimizer groups, precision, compile

EVERYTHING = (
    "num_layers=3",
    "mlp.activation=swiglu",
    "residual.encoder_layers=1",
    "residual.parallel_start=1",
    "residual.two_lane_start=2",
    "residual.layerwise_ln_scale=true",
    "embeddings.smear_gate=true",
    "embeddings.bigram_buckets=64",
    "embeddings.bigram_dim=16",
)


def test_new_parameters_land_in_the_right_optimizer_group_and_precision():
    model = tiny(*EVERYTHING)
    cfg = OptimConfig(matrix_lr=0.01, scalar_lr=0.02, tied_embed_lr=0.03)
    table = {name: (opt, lr) for name, _shape, opt, lr in describe_param_table(model, cfg)}
    assert table["blocks.0.mlp.gate.weight"] == ("muon", 0.01)
    assert table["blocks.2.parallel_resid_lambdas"] == ("adam", 0.02)
    assert table["blocks.2.parallel_post_lambdas"] == ("adam", 0.02)  # 2-D, but control: not Muon
    assert table["smear_gate.proj.weight"] == table["smear_gate.lam"] == ("adam", 0.02)
    assert table["bigram.embed.weight"] == ("adam", 0.03)  # the token embedding's lr
    assert table["bigram.proj.weight"] == ("adam", 0.02)
    assert table["bigram.scale"] == ("adam", 0.02)
    control = {n for n in table if is_control(n)}
    assert {"blocks.2.parallel_post_lambdas", "smear_gate.proj.weight", "smear_gate.lam", "bigram.scale"} <= control
    assert not {"bigram.embed.weight", "bigram.proj.weight", "blocks.0.mlp.gate.weight"} & control
    dtypes = {n: p.dtype for n, p in cast_for_bf16_training(model).named_parameters()}
    assert dtypes.pop("tok_emb.weight") == dtypes.pop("bigram.embed.weight") == torch.bfloat16
    assert set(dtypes.values()) == {torch.float32}


def test_the_artifact_round_trip_keeps_control_tensors_exact(tmp_path):
    from underpar.model.precision import CONTROL_PATTERNS
    from underpar.quant.artifact import export_model, load_model
    from underpar.quant.config import QuantConfig

    model = perturbed(tiny(*EVERYTHING))
    state = model.state_dict()
    export_model(state, QuantConfig(), tmp_path / "model.ptz", CONTROL_PATTERNS)
    restored = load_model(tmp_path / "model.ptz", QuantConfig())
    for name in ("blocks.2.parallel_post_lambdas", "blocks.2.parallel_resid_lambdas", "smear_gate.lam",
                 "smear_gate.proj.weight", "bigram.scale"):
        assert restored[name].dtype == torch.float32 and torch.equal(restored[name], state[name]), name
    fresh = build(config(*EVERYTHING))
    fresh.load_state_dict(restored)
    ids = tokens()
    with torch.no_grad():
        assert (fresh(ids) - model(ids)).abs().max() < 0.05


COMPILE_CONFIGS = {  # two combined configs: compiling takes seconds each on a CPU
    "swiglu-parallel-lanes-smear-bigram": EVERYTHING,
    "leaky-slope-pure-decoder-all-parallel-lanes-full-width-bigram": (
        "mlp.activation=leaky_relu2", "mlp.leaky_slope=0.3", "residual.encoder_layers=0",
        "residual.parallel_start=0", "residual.two_lane_start=1", "residual.layerwise_ln_scale=true",
        "embeddings.smear_gate=true", "embeddings.bigram_buckets=32", "embeddings.bigram_dim=64",
    ),
}


@pytest.mark.parametrize("name", sorted(COMPILE_CONFIGS))
def test_techniques_compile_fullgraph(name):
    # aot_eager: dynamo + AOT autograd, where graph breaks and tracing errors surface.
    torch._dynamo.reset()
    model = perturbed(tiny(*COMPILE_CONFIGS[name]))
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    ids = tokens(seq_len=16)
    ids[:, 7] = BOS
    targets = tokens(seq_len=16, seed=2)
    loss = compiled(ids, targets)
    loss.backward()
    torch.testing.assert_close(loss, model(ids, targets), rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.numel()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
