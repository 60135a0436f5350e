"""GPTQ, LQER and legal calibration (CPU, synthetic layers and a tiny GPT)."""

from __future__ import annotations

import pytest
import torch

from underpar.config import from_dict
from underpar.data.manifest import split_files
from underpar.data.shards import TokenLoader
from underpar.errors import ArtifactError
from underpar.model.config import GPTConfig
from underpar.model.gpt import build
from underpar.quant import artifact
from underpar.quant.calibrate import Calibration, gptq_quantize
from underpar.quant.clip import round_to_nearest, row_scales
from underpar.quant.config import QuantConfig
from underpar.quant.gptq import collect_hessians, gptq_codes
from underpar.quant.lqer import lqer_delta, lqer_factors
from underpar.quant.rowquant import dequantize_mixed, quantize_mixed

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_layer(rows=48, cols=96, n=2048, seed=0):
    """Weights and inputs whose features are strongly correlated (as activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.logspace(0, -2, cols)[None, :]
    X = torch.randn(n, cols, generator=g) @ mix.T + 0.05 * torch.randn(n, cols, generator=g)
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, X


def output_error(W, W_hat, X):
    return ((X @ W.T - X @ W_hat.T).norm() / (X @ W.T).norm()).item()


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_round_to_nearest_on_the_layer_outputs(act_order):
    W, X = correlated_layer()
    H = X.T @ X / X.shape[0]
    qmax = 7  # int4 makes the difference large
    scale = row_scales(12.85 * W.std(dim=1), qmax)
    rtn = round_to_nearest(W, scale, qmax).float() * scale.float()[:, None]
    codes = gptq_codes(W, H, scale, qmax, block_size=32, act_order=act_order)
    assert codes.dtype == torch.int8 and codes.abs().max() <= qmax
    gptq = codes.float() * scale.float()[:, None]
    assert output_error(W, gptq, X) < 0.7 * output_error(W, rtn, X)


def test_gptq_zeroes_columns_no_input_reaches_and_survives_a_singular_hessian():
    W, X = correlated_layer(rows=16, cols=32, n=8)  # 8 samples: H has rank 8 of 32
    X[:, 5] = 0.0
    H = X.T @ X
    scale = row_scales(W.abs().amax(dim=1), 31)
    codes = gptq_codes(W, H, scale, 31, block_size=8, damp=0.0)
    assert (codes[:, 5] == 0).all() and codes.abs().max() <= 31
    with pytest.raises(ArtifactError, match="Hessian of shape"):
        gptq_codes(W, H[:4, :4], scale, 31)


def test_lqer_lowers_the_error_of_the_worst_tensors():
    W, X = correlated_layer()
    scale = row_scales(12.85 * W.std(dim=1), 7)
    W_hat = round_to_nearest(W, scale, 7).float() * scale.float()[:, None]
    err = W - W_hat
    factors = lqer_factors(err, rank=4, bits=4)
    assert factors["a"].shape == (48, 4) and factors["b"].shape == (4, 96) and factors["a"].abs().max() <= 7
    assert (W - W_hat - lqer_delta(factors)).norm() < err.norm()
    # through the scheme: only the top_k worst tensors get factors, and the dequantized error drops
    g = torch.Generator().manual_seed(3)
    state = {f"blocks.{i}.mlp.fc.weight": torch.randn(64, 64, generator=g) * (1 + i) for i in range(3)}
    base = dict(scheme="mixed", keep_float_max_numel=0, matrix_bits=4)
    plain, _ = quantize_mixed(state, (), QuantConfig(**base))
    fixed, stats = quantize_mixed(state, (), QuantConfig(**base, lqer_rank=4, lqer_top_k=2))
    assert stats["num_lqer"] == 2 and "lqer" in fixed["tensors"]["blocks.2.mlp.fc.weight"]
    assert "lqer" not in fixed["tensors"]["blocks.0.mlp.fc.weight"]  # the smallest error
    before, after = dequantize_mixed(plain), dequantize_mixed(fixed)
    for name in ("blocks.1.mlp.fc.weight", "blocks.2.mlp.fc.weight"):
        assert (after[name] - state[name]).norm() < (before[name] - state[name]).norm(), name


def tiny_gpt(tied: bool = True):
    cfg = from_dict(GPTConfig, {"vocab_size": 128, "num_layers": 2, "model_dim": 64,
                                "attention": {"num_heads": 4, "num_kv_heads": 2}, "embeddings": {"tied": tied}})
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():  # trained-looking: no zero-init projections
        for p in model.parameters():
            if p.ndim == 2 and p.abs().max() == 0:
                p.normal_(0, 0.02)
    return model


def test_hessians_cover_every_linear_and_the_head():
    model = tiny_gpt()
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    H = collect_hessians(model, batches)
    linears = {f"{n}.weight" for n, m in model.named_modules() if type(m).__name__ == "CastedLinear"}
    assert set(H) == linears | {"tok_emb.weight"}
    hidden = torch.cat([model.hidden(b).reshape(-1, 64) for b in batches])
    torch.testing.assert_close(H["tok_emb.weight"], hidden.T @ hidden / hidden.shape[0], rtol=1e-4, atol=1e-6)
    for h in H.values():
        torch.testing.assert_close(h, h.T)
    assert set(collect_hessians(tiny_gpt(tied=False), batches)) == linears | {"lm_head.weight"}


def test_calibration_refuses_validation_data(builtin_data):
    out, manifest = builtin_data
    from underpar.data.dataset import PreparedData

    data = PreparedData(manifest)
    val_loader = TokenLoader(split_files(manifest, "val"))
    with pytest.raises(ArtifactError, match="refuses .*val.*validation data"):
        Calibration.from_loader(val_loader, 1, 256, 64, data=data)
    with pytest.raises(ArtifactError, match="refuses tokens of the 'val' split"):
        Calibration.from_tokens(data.val_tokens, "val", 1, 2, 64)
    with pytest.raises(ArtifactError, match="refuses the prepared data's validation tokens"):
        Calibration.from_tokens(data.val_tokens, "train", 1, 2, 64, data=data)
    with pytest.raises(ArtifactError, match="build a Calibration with"):
        Calibration([torch.zeros(1, 8, dtype=torch.long)], "train")
    with pytest.raises(ArtifactError, match="needs a Calibration"):
        gptq_quantize(tiny_gpt(), [torch.zeros(1, 8, dtype=torch.long)], QuantConfig(scheme="mixed", gptq=True))
    train = Calibration.from_loader(data.train_loader(), 2, 256, 64, data=data)
    assert train.source == "train" and len(train) == 2 and train.batches[0].shape == (4, 64)
    assert torch.equal(train.batches[0].reshape(-1)[:100], data.train_tokens()[:100].long())


def test_generated_calibration_is_seeded_and_starts_at_bos():
    model = tiny_gpt()
    a = Calibration.generated(model, 1, 2, 12, seed=5)
    b = Calibration.generated(model, 1, 2, 12, seed=5)
    assert a.source == "generated" and a.batches[0].shape == (2, 12) and (a.batches[0][:, 0] == 1).all()
    assert torch.equal(a.batches[0], b.batches[0])


def test_gptq_quantize_a_model_round_trips_through_the_artifact(tmp_path):
    model = tiny_gpt()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4 * 2 * 32,), generator=g)
    calibration = Calibration.from_tokens(tokens, "train", 4, 2, 32)
    cfg = QuantConfig(scheme="mixed", container="grouped", gptq=True, keep_float_max_numel=1024,
                      compressors=["zlib"], lqer_rank=2, lqer_top_k=1)
    obj, stats = gptq_quantize(model, calibration, cfg)
    methods = {n: e.get("method") for n, e in obj["tensors"].items()}
    assert methods["tok_emb.weight"] == "gptq" and methods["blocks.0.mlp.fc.weight"] == "gptq"
    assert stats["num_gptq"] == stats["num_quantized"] and stats["calibration_source"] == "train"
    assert stats["calibration_tokens"] == 256 and stats["gptq_seconds"] >= stats["calibration_seconds"] >= 0
    path = tmp_path / "model.ptz"
    exported = artifact.export_quantized(obj, cfg, path, stats)
    loaded = artifact.load_model(path, cfg)
    expected = dequantize_mixed(obj)
    assert all(torch.equal(loaded[n], expected[n]) for n in expected)
    x = tokens[:64].view(2, 32)
    with torch.no_grad():
        before = model(x[:, :-1], x[:, 1:]).item()
        model.load_state_dict(loaded)
        after = model(x[:, :-1], x[:, 1:]).item()
    assert abs(after - before) < 0.05 and exported.model_bytes == path.stat().st_size
