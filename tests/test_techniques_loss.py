"""The training loss's terms of the 131-run log (issue 13; model/loss.py): each term against
its formula restated here, token dropout leaving exactly the drawn positions out, head
diversity 0 for orthogonal heads, mixup's partners, the fused-loss conflict, evaluation left
alone, fullgraph compile of every term at once, and a killed and resumed run with random
terms ending as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from underpar import config as cfglib
from underpar.errors import ConfigError
from underpar.model.loss import LossConfig, head_similarity, mixup_partners, num_dropped, token_keep_mask
from underpar.tracks import pretrain as track

from test_pretrain import data_dir, final_losses, micro_config, run_killed_at_step  # noqa: F401  (data_dir is a fixture)
from test_techniques_blocks import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_TERMS = ["loss.z_loss=1e-3", "loss.logit_penalty=1e-4", "loss.token_dropout=0.05", "loss.embed_mixup=0.1",
             "loss.label_smoothing=0.1", "loss.head_diversity=1e-2"]


def tokens(batch: int = 3, seq_len: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, 128, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return t[:, :-1], t[:, 1:]


def plain_token_ce(model, x, y) -> torch.Tensor:
    """Per-token cross-entropy [B, T] of the capped logits, as the default loss computes it."""
    logits = model.capped_logits(model.hidden(x)).float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def test_terms_are_off_by_default_and_validated():
    assert not LossConfig().active() and LossConfig(head_diversity=1e-4).active()
    cfg = cfglib.resolve("pretrain", None, ["model.loss.z_loss=1e-4", "model.loss.token_dropout=0.05"])
    assert cfg.model.loss == LossConfig(z_loss=1e-4, token_dropout=0.05)
    assert cfglib.from_dict(type(cfg), cfglib.to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="model.loss.token_dropout"):
        cfglib.resolve("pretrain", None, ["model.loss.token_dropout=1.0"])
    with pytest.raises(ConfigError, match="model.loss.z_loss"):
        cfglib.resolve("pretrain", None, ["model.loss.z_loss=-1"])
    with pytest.raises(ConfigError, match="model.loss.label_smoothing needs the capped logits.*fused_ce=false"):
        tiny("embeddings.fused_ce=true", "loss.label_smoothing=0.1")
    tiny("embeddings.fused_ce=true", "loss.token_dropout=0.1", "loss.embed_mixup=0.1", "loss.head_diversity=1e-4")


@pytest.mark.parametrize("term", ["z_loss", "logit_penalty", "label_smoothing", "head_diversity"])
def test_each_term_is_its_formula(term):
    coef = 0.01 if term != "label_smoothing" else 0.1
    model = tiny(f"loss.{term}={coef}")
    x, y = tokens()
    with torch.no_grad():
        got = model(x, y)
        logits = model.capped_logits(model.hidden(x)).float()
        ce = plain_token_ce(model, x, y).mean()
        if term == "z_loss":
            want = ce + coef * torch.logsumexp(logits, dim=-1).square().mean()
        elif term == "logit_penalty":
            want = ce + coef * logits.square().mean()
        elif term == "label_smoothing":  # (1 - eps) CE + eps * mean over the vocabulary of -log p
            log_p = logits.log_softmax(-1)
            want = (1 - coef) * ce - coef * log_p.mean(-1).mean()
        else:
            sims = [head_similarity(b.attn.c_q.weight, 4) for b in model.blocks]
            want = ce + coef * sum(sims) / len(sims)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got != ce


def test_evaluation_and_logits_are_untouched():
    model, plain = tiny(*ALL_TERMS), tiny()
    x, y = tokens()
    assert torch.equal(model.logits(x), plain.logits(x))
    assert torch.equal(model.token_losses(x, y), plain.token_losses(x, y))
    model.eval()
    plain.eval()
    assert torch.equal(model(x, y), plain(x, y))
    plain.train()
    assert torch.equal(model(x, y), plain(x, y))  # in eval mode: the default loss, bit for bit


def test_head_similarity_is_zero_for_orthogonal_heads_and_one_for_parallel():
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
    weight = q.T[:32]  # 4 heads x 8 rows of 64 inputs, all rows orthonormal
    assert head_similarity(weight, 4).item() == pytest.approx(0.0, abs=1e-6)
    same = q.T[32:40].repeat(4, 1)  # one head four times, orthogonal to every head of `weight`
    assert head_similarity(same, 4).item() == pytest.approx(1.0, abs=1e-6)
    assert head_similarity(-same, 4).item() == pytest.approx(1.0, abs=1e-6)  # a sign does not make a head new
    two = torch.cat([same[:8], same[:8], -same[:8], weight[:8]])  # pairs: 1, 1, 0 for three of six
    assert head_similarity(two, 4).item() == pytest.approx(0.5, abs=1e-5)
    random = torch.randn(512, 512, generator=torch.Generator().manual_seed(2))  # cosines ~ 1/sqrt(32768)
    fp32 = head_similarity(random, 8)
    assert 1e-5 < fp32 < 1e-4
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 anyway: bf16 would lose them
        assert torch.equal(head_similarity(random, 8), fp32)
    # the penalty pushes heads apart: one gradient step lowers it
    w = same.clone().add_(0.01 * torch.randn(32, 64, generator=torch.Generator().manual_seed(1))).requires_grad_()
    head_similarity(w, 4).backward()
    with torch.no_grad():
        assert head_similarity(w - 10.0 * w.grad, 4) < head_similarity(w, 4)


def test_token_dropout_leaves_exactly_the_drawn_positions_out():
    fraction = 0.25
    model = tiny(f"loss.token_dropout={fraction}")
    x, y = tokens(2, 16)
    assert num_dropped(32, fraction) == 8 and num_dropped(4, 0.9) == 3  # never every position
    torch.manual_seed(5)
    keep = token_keep_mask(y.shape, fraction, y.device)
    assert keep.shape == y.shape and int((keep == 0).sum()) == 8 and set(keep.unique().tolist()) == {0.0, 1.0}
    with torch.no_grad():
        torch.manual_seed(5)
        got = model(x, y)
        per_token = plain_token_ce(model, x, y)
        torch.testing.assert_close(got, per_token[keep.bool()].mean(), rtol=1e-6, atol=1e-6)
        # a different target at a dropped position changes nothing; at a kept one it does
        dropped = (keep == 0).nonzero()[0]
        kept = keep.nonzero()[0]
        for where, changes in ((dropped, False), (kept, True)):
            y2 = y.clone()
            y2[tuple(where)] = (y2[tuple(where)] + 1) % 128
            torch.manual_seed(5)
            assert (model(x, y2) != got) == changes
        # each call (each micro-step) draws new positions from the seeded generator
        torch.manual_seed(5)
        token_keep_mask(y.shape, fraction, y.device)
        assert not torch.equal(token_keep_mask(y.shape, fraction, y.device), keep)


def test_embed_mixup_mixes_sequences_and_their_targets():
    w = 0.2
    model = tiny(f"loss.embed_mixup={w}")
    x, y = tokens(4, 16)
    for seed in range(5):
        torch.manual_seed(seed)
        partners = mixup_partners(4, x.device)
        assert sorted(partners.tolist()) == [0, 1, 2, 3] and all(p != i for i, p in enumerate(partners.tolist()))
    with torch.no_grad():
        torch.manual_seed(3)
        got = model(x, y)
        torch.manual_seed(3)
        partners = mixup_partners(4, x.device)
        x0 = model.embed(x)
        mixed = (1 - w) * x0 + w * x0[partners]
        layout = model.layout if model.looping else model.plain_layout
        from underpar.model.linear import rms_norm
        from underpar.model.residual import run_unet

        hidden = rms_norm(run_unet(model.blocks, model.skip_weights, layout, mixed, x0=mixed, adapters=model.adapters))
        logits = model.capped_logits(hidden).float().flatten(0, 1)
        want = (1 - w) * F.cross_entropy(logits, y.flatten()) + w * F.cross_entropy(logits, y[partners].flatten())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        single = tiny(f"loss.embed_mixup={w}")
        assert torch.equal(single(x[:1], y[:1]), tiny()(x[:1], y[:1]))  # one sequence: nothing to mix with


def test_every_term_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    model = tiny(*ALL_TERMS)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    x, y = tokens()
    torch.manual_seed(2)
    loss = compiled(x, y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(2)
    torch.testing.assert_close(loss, model(x, y), rtol=1e-5, atol=1e-5)


def test_kill_and_resume_with_random_terms_is_exact(data_dir, tmp_path, monkeypatch):  # noqa: F811
    """Token dropout and mixup draw from the run's generator, which checkpoints and the warmup
    restore: a run killed at step 5 and resumed logs the uninterrupted run's losses."""
    terms = ["model.loss.token_dropout=0.1", "model.loss.embed_mixup=0.1", "model.loss.head_diversity=1e-3"]
    uninterrupted = track.run(micro_config(data_dir, tmp_path / "a", *terms))
    plain = track.run(micro_config(data_dir, tmp_path / "c"))
    killed_dir = run_killed_at_step(micro_config(data_dir, tmp_path / "b", *terms), 5, monkeypatch)
    resumed = track.run(cfglib.load_json(killed_dir / "config.json"), resume=killed_dir)
    assert final_losses(killed_dir) == final_losses(uninterrupted.run_dir) != final_losses(plain.run_dir)
    assert resumed.val_bpb == uninterrupted.val_bpb
