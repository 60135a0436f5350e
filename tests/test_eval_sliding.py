"""Sliding-window evaluation: equal to the plain evaluation at stride = seq_len, every token
scored exactly once at any stride, ranks sum to one process, and a longer window under RoPE
scaling."""

from __future__ import annotations

import pytest
import torch

from underpar import config as cfglib
from underpar.data.tokenizer import ByteLUTs
from underpar.errors import ConfigError, DataError
from underpar.eval.bpb import BpbMeter, evaluate_bpb
from underpar.eval.sliding import evaluate_sliding, score_segments, scored_range, segments
from underpar.model.config import GPTConfig
from underpar.model.gpt import build

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64


def random_luts(seed: int = 0) -> ByteLUTs:
    g = torch.Generator().manual_seed(seed)
    boundary = torch.zeros(VOCAB, dtype=torch.bool)
    boundary[:2] = True
    return ByteLUTs(
        bytes_per_token=torch.where(boundary, 0, torch.randint(1, 5, (VOCAB,), generator=g)).to(torch.int16),
        has_leading_space=(torch.rand(VOCAB, generator=g) < 0.3) & ~boundary,
        is_boundary=boundary,
    )


def stream(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, VOCAB, (n,), generator=g, dtype=torch.int32)
    tokens[::37] = 1  # documents start with BOS
    return tokens


def context_model(seed: int = 2):
    """A causal model whose logits depend on the whole prefix of the window (a running mean of
    token embeddings), so window boundaries and context lengths change the scores."""
    g = torch.Generator().manual_seed(seed)
    table, emb, proj = torch.randn(VOCAB, VOCAB, generator=g), torch.randn(VOCAB, 8, generator=g), torch.randn(8, VOCAB, generator=g)

    def logits_fn(x_bt):
        running = emb[x_bt].cumsum(1) / torch.arange(1, x_bt.size(1) + 1)[None, :, None]
        return table[x_bt] + running @ proj

    return logits_fn


def bigram_model(seed: int = 3):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))
    return lambda x_bt: table[x_bt]


def test_stride_equal_to_seq_len_is_the_plain_evaluation_exactly():
    tokens, luts, fn = stream(1000), random_luts(), context_model()
    for seq_len, batch in ((64, 3), (100, 4)):
        plain = evaluate_bpb(fn, tokens, luts, seq_len, batch)
        sliding = evaluate_sliding(fn, tokens, luts, seq_len, seq_len, batch)
        assert torch.equal(plain.sums, sliding.sums), seq_len


@pytest.mark.parametrize("seq_len,stride", [(64, 1), (64, 16), (64, 48), (100, 7), (50, 50)])
def test_every_token_is_scored_exactly_once_with_enough_context(seq_len, stride):
    tokens, luts = stream(1003), random_luts()
    calls: list[torch.Tensor] = []
    scored: list[torch.Tensor] = []

    def fn(x_bt):
        calls.append(x_bt)
        return bigram_model()(x_bt)

    meter = evaluate_sliding(fn, tokens, luts, seq_len, stride, batch_seqs=5,
                             on_scored=lambda pos, logits: scored.append(pos))
    positions = torch.cat(scored)
    last = (1003 - 1) // seq_len * seq_len
    assert meter.tokens == positions.numel() == last
    assert torch.equal(positions.sort().values, torch.arange(1, last + 1))  # each once, none else
    assert all(x.size(1) == seq_len and x.size(0) <= 5 for x in calls)
    # A bigram model ignores context: any stride scores what the plain evaluation scores.
    plain = evaluate_bpb(bigram_model(), tokens, luts, seq_len, 5)
    assert meter.bytes == plain.bytes
    assert meter.nll_sum == pytest.approx(plain.nll_sum, rel=1e-12)


def test_segments_give_each_target_the_context_the_stride_allows():
    seq_len, stride = 32, 8
    starts, ends = segments(1, 200, seq_len, stride)
    assert starts[0] == 1 and ends[0] == seq_len and ends[-1] == 200
    assert torch.equal(starts[1:], ends[:-1] + 1)
    assert int((ends - starts + 1).max()) <= seq_len
    context = starts - (ends - seq_len).clamp(min=0) - 1  # tokens before a segment's first target
    assert int(context[1:].min()) >= seq_len - stride
    # A range that starts mid-stream keeps the global cut points (so chunked scoring lines up).
    sub_starts, sub_ends = segments(45, 120, seq_len, stride)
    assert sub_starts[0] == 45 and sub_ends[0] == 48 and sub_ends[-1] == 120
    with pytest.raises(ConfigError, match="stride must lie in"):
        segments(1, 10, 8, 9)
    with pytest.raises(DataError, match="too few for one window"):
        scored_range(8, 8)


def test_scoring_a_range_reads_no_token_after_it():
    tokens, luts, fn = stream(600), random_luts(), context_model()
    starts, ends = segments(130, 257, 64, 16)
    scores = []
    for tail in (tokens[258:], torch.randint(2, VOCAB, (600 - 258,), dtype=torch.int32)):
        changed = torch.cat([tokens[:258], tail])
        meter = BpbMeter(luts)
        score_segments(fn, changed, luts, starts, ends, 64, 4, meter)
        scores.append(meter.sums)
    assert torch.equal(scores[0], scores[1]) and scores[0][2] == 257 - 130 + 1


def test_two_ranks_sum_to_one():
    tokens, luts, fn = stream(2000), random_luts(), context_model()
    single = evaluate_sliding(fn, tokens, luts, 64, 16, 4)
    combined = BpbMeter(luts)
    for rank in range(2):
        combined.add(evaluate_sliding(fn, tokens, luts, 64, 16, 4, rank=rank, world_size=2))
    assert combined.tokens == single.tokens and combined.bytes == single.bytes
    assert combined.nll_sum == pytest.approx(single.nll_sum, rel=1e-12)


def tiny_gpt(scaling: str):
    cfg = cfglib.from_dict(GPTConfig, {
        "vocab_size": VOCAB, "num_layers": 2, "model_dim": 32,
        "attention": {"num_heads": 2, "num_kv_heads": 1, "rope_scaling": {"name": scaling, "train_seq_len": 32}
                      if scaling != "none" else "none"},
    })
    torch.manual_seed(0)
    model = build(cfg)
    with torch.no_grad():  # zero-initialized projections would make every position alike
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_longer_window_under_rope_scaling():
    tokens, luts = stream(700), random_luts()
    plain, ntk = tiny_gpt("none"), tiny_gpt("ntk")
    ntk.load_state_dict(plain.state_dict())
    at_train_len = [evaluate_sliding(m.logits, tokens, luts, 32, 8, 8) for m in (plain, ntk)]
    assert torch.equal(at_train_len[0].sums, at_train_len[1].sums)  # scaling is off at the trained length
    longer = [evaluate_sliding(m.logits, tokens, luts, 64, 16, 8) for m in (plain, ntk)]
    assert longer[0].tokens == longer[1].tokens == (700 - 1) // 64 * 64
    assert longer[0].nll_sum != longer[1].nll_sum  # the scaled frequencies are in use
    assert all(torch.isfinite(m.sums).all() for m in longer)
