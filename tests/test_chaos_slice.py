"""Deep Chaos strategy "slice": kept heads, channel groups and output groups run as smaller
matmuls. It must be the masked network with the zero rows left out: same loss to fp32
rounding, same gradients of every weight, exact zeros on what is not kept."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from underpar.model import surgery  # noqa: E402
from underpar.model.sliced import SlicedLayer, sliced_linear  # noqa: E402
from underpar.tracks.chaos import ChaosConfig, ChaosController  # noqa: E402
from test_chaos import ARCHS, SMALL_GROUPS, find_block, tiny, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("which", ["rows", "cols", "both", "none"])
def test_sliced_linear_matches_indexing_and_scatters_gradients(bias, which):
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(12, 10, bias=bias)
    x = torch.randn(2, 5, 12 if which in ("rows", "none") else 6, generator=gen, requires_grad=True)
    rows = torch.tensor([0, 3, 4, 9]) if which in ("rows", "both") else None
    cols = torch.tensor([1, 2, 7, 8, 10, 11]) if which in ("cols", "both") else None
    y = sliced_linear(x, linear, rows, cols)
    w = linear.weight if rows is None else linear.weight[rows]
    w = w if cols is None else w[:, cols]
    b = None if not bias else (linear.bias if rows is None else linear.bias[rows])
    ref = F.linear(x, w, b)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    g = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(y, [x, linear.weight] + ([linear.bias] if bias else []), g)
    want = torch.autograd.grad(ref, [x, linear.weight] + ([linear.bias] if bias else []), g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_equals_masked_forward_and_gradients(arch):
    compare_sliced_and_masked(arch, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_equals_masked_on_cuda(arch):
    compare_sliced_and_masked(arch, "cuda")


def compare_sliced_and_masked(arch, device):
    base = tiny(arch, seed=5).train().to(device)
    x = tokens(seed=3, seq_len=12).to(device)
    grads, losses, plans = {}, {}, {}
    for strategy in ("mask", "slice"):
        model = copy.deepcopy(base)
        ctl = ChaosController(model, ChaosConfig(strategy=strategy, seed=4, stub_std=0.0, **SMALL_GROUPS))
        plan = find_block(ctl.scheduler, ["both", "attn", "mlp", "dead"])
        ctl.begin_block(plan.block)
        if strategy == "slice":
            assert {type(m).__name__ for m in model.model.layers} >= {"SlicedLayer", "BiasStub"}
            assert len(model.model.layers) < 10
        loss = model(x, labels=x).loss
        loss.backward()
        losses[strategy], plans[strategy] = loss.detach(), plan
        grads[strategy] = {n: None if p.grad is None else p.grad.clone()
                           for n, p in zip([n for n, _ in base.named_parameters()], ctl.params)}
        ctl.end()
    assert plans["mask"].modes == plans["slice"].modes and plans["mask"].mlp_groups == plans["slice"].mlp_groups
    torch.testing.assert_close(losses["slice"], losses["mask"], rtol=1e-5, atol=1e-6)
    checked = 0
    for name, g_mask in grads["mask"].items():
        g_slice = grads["slice"][name]
        assert (g_mask is None) == (g_slice is None), name
        if g_mask is not None:
            torch.testing.assert_close(g_slice, g_mask, rtol=1e-4, atol=1e-6, msg=name)
            checked += 1
    assert checked > 20
    # a kept layer's masked rows get exact zeros, not small numbers
    i = plans["slice"].layers("both")[0]
    q_grad = grads["slice"][f"model.layers.{i}.self_attn.k_proj.weight"]
    kept = set(plans["slice"].kv_heads[i])
    for head in range(2):
        assert bool(q_grad[head * 16:(head + 1) * 16].any()) == (head in kept)


def test_slice_restores_exactly_and_keeps_hidden_states_aligned():
    model = tiny("llama").train()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    ctl = ChaosController(model, ChaosConfig(strategy="slice", seed=4, **SMALL_GROUPS))
    ctl.begin_block(find_block(ctl.scheduler, ["both", "dead"]).block)
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
        assert len(out.hidden_states) == len(model.model.layers) + 1
        assert any(isinstance(m, SlicedLayer) for m in model.model.layers)
        with ctl.restored():
            assert torch.equal(model(x).logits, ref)
    ctl.end()
    assert not surgery.is_hoisted(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
