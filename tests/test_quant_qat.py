"""QAT: straight-through fake quantization in CastedLinear, off by default, as a stage switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from underpar.model.linear import CastedLinear
from underpar.quant.clip import round_to_nearest, row_scales
from underpar.quant.config import QuantConfig
from underpar.quant.qat import fake_quantize_rows, qat_switches, quantize_dequantize_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", [8, 7, 6, 5, 4])
def test_fake_quant_forward_is_the_round_trip_and_its_gradient_is_straight_through(bits):
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(16, 40, generator=g) * 0.1).requires_grad_()
    qmax = (1 << (bits - 1)) - 1
    scale = row_scales(w.detach().abs().amax(dim=1), qmax)
    expected = round_to_nearest(w.detach(), scale, qmax).float() * scale.float()[:, None]
    y = fake_quantize_rows(w, bits)
    assert torch.equal(y, expected) and torch.equal(quantize_dequantize_rows(w.detach(), bits), expected)
    assert len(torch.unique(y[0])) <= 2 * qmax + 1
    upstream = torch.randn(16, 40, generator=g)
    y.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_casted_linear_qat_on_and_off():
    torch.manual_seed(0)
    layer = CastedLinear(40, 16)
    x = torch.randn(3, 5, 40)
    plain = layer(x)
    assert torch.equal(plain, F.linear(x, layer.weight))
    params, state = list(layer.parameters()), set(layer.state_dict())
    layer.qat_bits = 6
    on = layer(x)
    assert torch.equal(on, F.linear(x, quantize_dequantize_rows(layer.weight.detach(), 6)))
    assert not torch.equal(on, plain)
    assert list(layer.parameters()) == params and set(layer.state_dict()) == state  # nothing added
    on.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    layer.qat_bits = 0
    assert torch.equal(layer(x), plain)


def test_qat_switches_turn_the_large_linears_on_and_off():
    model = torch.nn.Sequential(CastedLinear(64, 64), CastedLinear(4, 4), torch.nn.Linear(64, 64))
    assert qat_switches(model, QuantConfig()) == []  # qat_bits = 0: no stage
    cfg = QuantConfig(qat_bits=5, qat_start=0.7, keep_float_max_numel=100)
    [(at, name, set_on)] = qat_switches(model, cfg)
    assert (at, name) == (0.7, "qat int5")
    set_on(True)
    assert (model[0].qat_bits, model[1].qat_bits) == (5, 0)  # the 16-value weight stays float
    assert not hasattr(model[2], "qat_bits")
    set_on(False)
    assert model[0].qat_bits == 0


@pytest.mark.parametrize("sigmas", [12.85, 16.0])
def test_sdclip_qat_forward_is_the_mixed_exports_round_trip(sigmas):
    from underpar.quant.rowquant import dequantize_mixed, quantize_mixed

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=g) * 0.05
    w[0, 0] = 0.9  # an outlier: abs-max and SDClip grids differ most
    cfg = QuantConfig(scheme="mixed", qat_bits=6, qat_clip="sdclip", keep_float_max_numel=16)
    cfg.clip.matrix_sigmas = sigmas
    [(_, name, set_on)] = qat_switches(torch.nn.Sequential(CastedLinear(64, 24)), cfg)
    assert name == f"qat int6 sdclip {sigmas:g}"
    exported = dequantize_mixed(quantize_mixed({"w": w}, (), cfg)[0])["w"]
    layer = CastedLinear(64, 24)
    layer.weight.data.copy_(w)
    set_on_layer = qat_switches(layer, cfg)[0][2]
    set_on_layer(True)
    assert layer.qat_bits == (6, sigmas)
    x = torch.randn(5, 64, generator=g)
    assert torch.equal(layer(x), F.linear(x, exported))
    # the abs-max grid is a different (finer) one: QAT on it trains for weights the export does not store
    assert not torch.equal(fake_quantize_rows(w, 6), exported)


def test_sdclip_qat_needs_the_sdclip_export_clip():
    from underpar import config as cfglib
    from underpar.errors import ConfigError

    cfg = cfglib.from_dict(QuantConfig, {"qat_bits": 6, "qat_clip": "sdclip", "clip": "percentile"})
    with pytest.raises(ConfigError, match="quant.clip = sdclip"):
        cfglib.validate(cfg)


@pytest.mark.parametrize("qat_clip", ["absmax", "sdclip"])
def test_each_qat_stage_is_one_graph_and_switching_compiles_nothing_new(qat_clip):
    from underpar.stages import compiled_graphs

    torch._dynamo.reset()
    before = compiled_graphs()  # the count is process-wide: earlier tests compiled too
    torch.manual_seed(0)
    model = torch.nn.Sequential(CastedLinear(64, 64), CastedLinear(64, 64))
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    [(_, _, set_on)] = qat_switches(model, QuantConfig(qat_bits=6, keep_float_max_numel=100, qat_clip=qat_clip))
    x = torch.randn(4, 64)
    plain = compiled(x)
    set_on(True)
    quantized = compiled(x)  # the warmup: one graph per stage
    graphs = compiled_graphs() - before
    for on in (False, True, False, True):
        set_on(on)
        assert torch.equal(compiled(x), quantized if on else plain)
    assert compiled_graphs() - before == graphs == 2
    assert not torch.equal(plain, quantized)
    torch._dynamo.reset()


def test_the_gptq_time_reserve_is_only_taken_with_gptq():
    assert QuantConfig().reserve_seconds() == 0.0
    assert QuantConfig(scheme="mixed", gptq=True, gptq_reserve_seconds=4.0).reserve_seconds() == 4.0
