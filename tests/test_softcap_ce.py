"""Softcapped cross-entropy: the torch reference (its hand-written backward) against autograd
through `softcap` + F.cross_entropy, the custom ops under torch.compile(fullgraph=True), the
input checks; GPU tests check the Triton kernel against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from underpar.kernels import softcap_ce as S
from underpar.model.embeddings import softcap

pytestmark = pytest.mark.usefixtures("one_thread")


def plain(logits: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean") -> torch.Tensor:
    """What the model computes without the kernel: cap in fp32, then F.cross_entropy."""
    z = softcap(logits.float(), cap)
    losses = F.cross_entropy(z.flatten(0, -2), targets.flatten(), reduction=reduction)
    return losses.view(targets.shape) if reduction == "none" else losses


def make(shape, vocab, dtype, device="cpu", scale=8.0, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, device=device) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g, device=device)
    return logits.requires_grad_(), targets


def loss_and_grad(fn, logits, targets, cap, reduction="mean", weights=None):
    x = logits.detach().clone().requires_grad_()
    loss = fn(x, targets, cap, reduction)
    (loss if weights is None else loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("cap", [30.0, 2.5, 0.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_autograd_fp32(cap, reduction):
    logits, targets = make((3, 5), 97, torch.float32)
    weights = torch.rand(3, 5) if reduction == "none" else None  # a non-uniform upstream gradient
    want, want_grad = loss_and_grad(plain, logits, targets, cap, reduction, weights)
    got, got_grad = loss_and_grad(S.softcap_cross_entropy, logits, targets, cap, reduction, weights)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_matches_autograd_low_precision(dtype):
    """Gradients come back in the logits' dtype: both paths round the same fp32 values once."""
    logits, targets = make((64,), 300, dtype, scale=20.0)
    want, want_grad = loss_and_grad(plain, logits, targets, 30.0)
    got, got_grad = loss_and_grad(S.softcap_cross_entropy, logits, targets, 30.0)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2**-7, atol=1e-9)


def test_reference_lse_and_large_logits():
    logits, targets = make((16,), 50, torch.float32, scale=1e4)
    losses, lse = S.reference_forward(logits.detach(), targets, 30.0)
    z = 30.0 * torch.tanh(logits.detach() / 30.0)
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))
    assert bool(((losses >= 0) & (losses <= 2 * 30.0 + 4.0)).all())  # bounded by the cap
    uncapped, _ = S.reference_forward(logits.detach(), targets, 0.0)  # stable without a cap too
    assert bool(torch.isfinite(uncapped).all()) and float(uncapped.max()) > 1e3


def test_ops_pass_opcheck():
    """Schema, fake (shape) implementation and autograd registration of the custom ops."""
    logits, targets = make((6,), 33, torch.float32)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")  # compiling: below
    torch.library.opcheck(torch.ops.underpar.softcap_ce_fwd.default, (logits, targets, 30.0), test_utils=checks)
    _, lse = S.reference_forward(logits.detach(), targets, 30.0)
    torch.library.opcheck(torch.ops.underpar.softcap_ce_bwd.default,
                          (logits.detach(), targets, lse, torch.rand(6), 30.0), test_utils=checks)


def test_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 40, bias=False)

    def step(h, targets):
        return S.softcap_cross_entropy(head(h), targets, 30.0)

    h = torch.randn(2, 8, 16)
    targets = torch.randint(0, 40, (2, 8))
    want = step(h, targets)
    want.backward()
    want_grad, head.weight.grad = head.weight.grad.clone(), None
    got = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)(h, targets)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "logits, targets, cap, reduction, fragment",
    [
        (torch.zeros(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 30.0, "mean", "dtype"),
        (torch.zeros(4, 8), torch.zeros(5, dtype=torch.long), 30.0, "mean", r"\(4, 8\).*\(5,\)"),
        (torch.zeros(4, 8), torch.zeros(4), 30.0, "mean", "integer ids"),
        (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), -1.0, "mean", "cap must be >= 0"),
        (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), float("nan"), "mean", "cap must be >= 0"),
        (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), 30.0, "avg", "mean, sum, none"),
    ],
)
def test_bad_inputs_are_named(logits, targets, cap, reduction, fragment):
    with pytest.raises(ValueError, match=fragment):
        S.softcap_cross_entropy(logits, targets, cap, reduction)


def test_int32_targets_and_target_out_of_range_on_cpu():
    logits, targets = make((10,), 20, torch.float32)
    a = S.softcap_cross_entropy(logits, targets, 30.0)
    b = S.softcap_cross_entropy(logits, targets.int(), 30.0)
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        S.softcap_cross_entropy(logits, torch.full((10,), 20), 30.0)


# --------------------------------------------------------------------------- GPU

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and S.triton_available()), reason="needs CUDA and Triton")

GPU_SHAPES = [(1, 1024), (37, 1000), (4099, 1024), (513, 8192), (7, 50_304)]


def _grad_tolerance(dtype):
    """fp32 sums in another order (and the kernel's sigmoid form of tanh: ~1e-6 apart in the
    capped logits), then at most one rounding step apart in a 16-bit dtype."""
    return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("rows, vocab", GPU_SHAPES)
@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_triton_equals_reference(dtype, rows, vocab, cap):
    logits, targets = make((rows,), vocab, dtype, device="cuda", scale=15.0, seed=rows)
    x = logits.detach()
    want_loss, want_lse = S.reference_forward(x, targets, cap)
    got_loss, got_lse = S.triton_forward(x, targets, cap)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=2e-5)
    g = torch.rand(rows, device="cuda")
    want_grad = S.reference_backward(x, targets, want_lse, g, cap)
    got_grad = S.triton_backward(x, targets, got_lse, g, cap)
    assert got_grad.dtype == dtype and got_grad.shape == x.shape
    torch.testing.assert_close(got_grad.float(), want_grad.float(), **_grad_tolerance(dtype))


@pytest.mark.gpu
@needs_triton
def test_triton_strided_rows_and_expanded_gradient():
    """A column slice of a wider tensor (row stride != V) and the mean's stride-0 gradient."""
    wide, targets = make((300,), 1032, torch.bfloat16, device="cuda")
    x = wide.detach()[:, :1024]
    targets = targets.clamp_max(1023)
    want_loss, want_lse = S.reference_forward(x, targets, 30.0)
    got_loss, got_lse = S.triton_forward(x, targets, 30.0)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=2e-5)
    g = torch.full((), 1 / 300, device="cuda").expand(300)
    torch.testing.assert_close(S.triton_backward(x, targets, got_lse, g, 30.0).float(),
                               S.reference_backward(x, targets, want_lse, g, 30.0).float(),
                               **_grad_tolerance(torch.bfloat16))


@pytest.mark.gpu
@needs_triton
def test_cuda_compiled_model_loss_matches_plain():
    """The op inside a compiled bf16 head on CUDA against the eager softcap + F.cross_entropy."""
    torch._dynamo.reset()
    head = torch.nn.Linear(64, 1024, bias=False).cuda().bfloat16()
    h = torch.randn(4, 256, 64, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 1024, (4, 256), device="cuda")
    want = plain(head(h), targets, 30.0)
    want.backward()
    want_grad, head.weight.grad = head.weight.grad.float(), None
    compiled = torch.compile(lambda a, t: S.softcap_cross_entropy(head(a), t, 30.0), fullgraph=True)
    got = compiled(h, targets)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.float(), want_grad, rtol=2e-2, atol=1e-4)


def test_model_switch_uses_the_fused_loss_with_the_same_value_and_gradients():
    """model.embeddings.fused_ce: the GPT's training loss through softcap_cross_entropy equals
    the default path's (fp32 on the CPU), gradients too."""
    from underpar.config import from_dict, override
    from underpar.model.config import GPTConfig
    from underpar.model.gpt import build

    base = from_dict(GPTConfig, {"vocab_size": 128, "num_layers": 2, "model_dim": 64,
                                 "attention": {"num_heads": 4, "num_kv_heads": 2}})
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        model = build(override(base, f"embeddings.fused_ce={str(fused).lower()}"))
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss)
        grads.append(model.tok_emb.weight.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
