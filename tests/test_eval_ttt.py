"""Score-first test-time training: legal (a changed token moves no earlier prediction; every
token is scored once, before any update that used it), equal to sliding windows without
updates, better on a repetitive stream, weights restored; chunking and the phased plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from underpar import config as cfglib
from underpar.errors import ConfigError
from underpar.eval.config import EvalConfig, TTTConfig
from underpar.eval.sliding import evaluate_sliding
from underpar.eval.ttt import chunk_ends, evaluate_ttt, plan

from test_eval_sliding import VOCAB, random_luts, stream, tiny_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ, STRIDE = 32, 8
FAST = TTTConfig(enabled=True, chunk_tokens=96, respect_documents=False, lr=0.05, epochs=2, batch_seqs=2)
DOCS = TTTConfig(enabled=True, scope="document", params="lora", lora_rank=4, optimizer="adam", lr=0.02,
                 doc_chunk_tokens=8, doc_batch=3)


def run(model, tokens, cfg=FAST, **kw):
    return evaluate_ttt(model, tokens, random_luts(), cfg, SEQ, STRIDE, batch_seqs=4, **kw)


@pytest.mark.parametrize("cfg", [FAST, DOCS], ids=["stream", "document"])
def test_a_changed_token_changes_no_earlier_prediction(cfg):
    tokens = stream(500)
    changed = tokens.clone()
    t = 250
    changed[t] = (tokens[t] + 7) % VOCAB
    seen = []
    for toks in (tokens, changed):
        logits = torch.zeros(500, VOCAB)
        run(tiny_gpt("none"), toks, cfg, on_scored=lambda pos, lg: logits.index_copy_(0, pos, lg.float()))
        seen.append(logits)
    assert torch.equal(seen[0][: t + 1], seen[1][: t + 1])  # predictions of tokens 1..t
    assert not torch.equal(seen[0][t + 1 :], seen[1][t + 1 :])
    if cfg is DOCS:  # documents are independent: the one after t's document is untouched too
        after = int((tokens[t + 1 :] == 1).nonzero()[0]) + t + 1
        assert torch.equal(seen[0][after + 1 :], seen[1][after + 1 :])
        return
    # The updates matter: without them the later predictions are different.
    plain = torch.zeros(500, VOCAB)
    run(tiny_gpt("none"), tokens, dataclasses.replace(FAST, epochs=0),
        on_scored=lambda pos, lg: plain.index_copy_(0, pos, lg.float()))
    assert torch.equal(plain[:97], seen[0][:97]) and not torch.allclose(plain[97:481], seen[0][97:481])


@pytest.mark.parametrize("cfg", [FAST, dataclasses.replace(FAST, phases=2, phase_fraction=0.5, optimizer="adam", lr=0.01),
                                 dataclasses.replace(FAST, params="lora", lora_rank=4, respect_documents=True), DOCS])
def test_every_token_is_scored_once_before_any_update_uses_it(cfg):
    tokens = stream(700)
    events = []
    result = run(tiny_gpt("none"), tokens, cfg, on_scored=lambda pos, lg: events.append(("score", pos.tolist())),
                 on_update=lambda lo, hi: events.append(("update", lo, hi)))
    scored: set[int] = set()
    updates = trained = 0
    for event in events:
        if event[0] == "score":
            assert scored.isdisjoint(event[1])
            scored.update(event[1])
        else:
            updates, trained = updates + 1, trained + event[2] - event[1] + 1
            assert set(range(event[1], event[2] + 1)) <= scored, event  # its targets were scored already
    last = (700 - 1) // SEQ * SEQ
    assert scored == set(range(1, last + 1)) and result.meter.tokens == last
    assert trained == result.trained_tokens > 0
    # One update call per step (stream), or per document adapted in a step (document).
    assert updates == result.updates if cfg.scope == "stream" else updates > result.updates > 0


def test_without_updates_it_is_the_sliding_score():
    tokens, model = stream(800), tiny_gpt("none")
    sliding = evaluate_sliding(model.logits, tokens, random_luts(), SEQ, STRIDE, 4)
    result = run(model, tokens, dataclasses.replace(FAST, epochs=0))
    assert result.updates == 0 and result.chunks == 8
    assert result.meter.tokens == sliding.tokens and result.meter.bytes == sliding.bytes
    assert result.meter.nll_sum == pytest.approx(sliding.nll_sum, rel=1e-6)


def test_it_learns_a_repeated_document_and_restores_the_weights():
    doc = stream(64, seed=5)
    tokens = doc.repeat(12)
    model = tiny_gpt("none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = evaluate_sliding(model.logits, tokens, random_luts(), SEQ, STRIDE, 4)
    cfg = dataclasses.replace(FAST, lr=0.2, epochs=3)
    for params in ("all", "lora"):
        result = run(model, tokens, dataclasses.replace(cfg, params=params, lora_rank=8, optimizer="adam" if params == "lora" else "sgd",
                                                        lr=0.05 if params == "lora" else 0.2))
        assert result.meter.bpb < (0.5 if params == "all" else 0.9) * sliding.bpb, params
        assert result.trained_tokens == 3 * sum(96 // SEQ * SEQ for _ in range(result.chunks - 1))
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
        assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_document_scope_learns_within_a_document():
    phrase = stream(24, seed=6)[1:]
    tokens = torch.cat([torch.tensor([1], dtype=torch.int32), phrase.repeat(8)] * 4)  # 4 documents, each one phrase x 8
    model = tiny_gpt("none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = evaluate_sliding(model.logits, tokens, random_luts(), SEQ, STRIDE, 4)
    result = run(model, tokens, dataclasses.replace(DOCS, lr=0.05, doc_chunk_tokens=16, lora_rank=8))
    assert result.chunks == 4 and result.meter.tokens == sliding.tokens and result.meter.bytes == sliding.bytes
    assert result.meter.bpb < 0.9 * sliding.bpb
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="scope = 'document' trains per-document LoRA"):
        cfglib.validate(dataclasses.replace(DOCS, params="all"))


def test_chunks_end_before_a_document_start():
    tokens = torch.full((400,), 5, dtype=torch.int32)
    tokens[[0, 70, 130, 210, 330]] = 1
    cfg = TTTConfig(chunk_tokens=100)
    # BOS at 70, 130, 210 end chunks at 69, 129, 209; then none in [260, 309]: the nominal end.
    assert chunk_ends(tokens, 380, cfg) == [69, 129, 209, 309, 380]
    assert chunk_ends(tokens, 380, dataclasses.replace(cfg, respect_documents=False)) == [100, 200, 300, 380]


def test_plan_per_chunk_and_phased():
    per_chunk = plan(4, [10, 20, 30, 40], TTTConfig())
    assert [(p.after, [c for c, _ in p.chunks]) for p in per_chunk] == [(0, [0]), (1, [1]), (2, [2])]
    assert [p.chunks[0][1] for p in per_chunk] == pytest.approx([1.0, 0.75, 0.25])  # cosine across chunks
    assert [p.fresh_optimizer for p in per_chunk] == [True, False, False]
    ends = list(range(10, 210, 10))  # 20 chunks
    phased = plan(20, ends, TTTConfig(phases=3, phase_fraction=0.3))  # 6 prefix chunks, 3 phases
    assert [(p.after, [c for c, _ in p.chunks]) for p in phased] == [(1, [0, 1]), (3, [0, 1, 2, 3]), (5, list(range(6)))]
    assert all(p.fresh_optimizer for p in phased)
    assert plan(20, ends, TTTConfig(epochs=0)) == [] and plan(1, [10], TTTConfig()) == []


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="eval.ttt.optimizer = 'lion' is not valid; choose one of: sgd, adam"):
        cfglib.validate(cfglib.override(EvalConfig(), "ttt.optimizer=lion"), "eval")
    with pytest.raises(ConfigError, match="eval.stride = 64 must not exceed eval.seq_len = 32"):
        cfglib.validate(EvalConfig(seq_len=32, stride=64))


def _ttt_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        result = run(tiny_gpt("none"), stream(700), dataclasses.replace(FAST, batch_seqs=3), rank=rank, world_size=world_size)
        torch.save({"sums": result.meter.sums, "updates": result.updates}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_as_one(tmp_path):
    """Each step's sequences split across 2 gloo ranks (3 per step: one rank gets 1, the other 2,
    and both step together); the averaged gradients give one process's trajectory."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single = run(tiny_gpt("none"), stream(700), dataclasses.replace(FAST, batch_seqs=3))
    # fork: the children inherit the imports (and one_thread's single thread: no OpenMP pool)
    mp.start_processes(_ttt_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["sums"], ranks[1]["sums"]) and ranks[0]["updates"] == single.updates
    assert ranks[0]["sums"][2] == single.meter.tokens and ranks[0]["sums"][1] == single.meter.bytes
    assert float(ranks[0]["sums"][0]) == pytest.approx(single.meter.nll_sum, rel=1e-5)


def test_updates_use_the_plain_cross_entropy_not_the_training_loss_terms():
    """A model trained with model.loss terms (token dropout here) adapts at test time on plain
    cross-entropy: the same scores as the same weights without the terms."""
    from underpar.config import override

    tokens = stream(400)
    plain = run(tiny_gpt("none"), tokens)
    with_terms = tiny_gpt("none")
    with_terms.cfg = override(with_terms.cfg, "loss.token_dropout=0.5")
    assert run(with_terms, tokens).meter.bpb == plain.meter.bpb
