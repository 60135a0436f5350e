"""RandOpt's diagnostics of a scored population: reward statistics, K=1 train-vs-test transfer
(and its plot), pairwise merges of top members, and held-out bits per byte of the base model
against the probability-averaged top-K ensemble."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar import dist
from underpar.data import corpora
from underpar.eval.stats import mean
from underpar.tracks.randopt_search import MERGE_OPS, Candidates, map_with_progress

# ---------------------------------------------------------------- population statistics


def paired(base: Sequence[bool], other: Sequence[bool]) -> dict[str, Any]:
    """`other` against `base` on the same questions: questions only `other` gets right (gained),
    only `base` gets right (lost), and the exact two-sided McNemar p-value: twice the binomial
    tail of the smaller count among the discordant pairs at p = 1/2 (capped at 1)."""
    gained = sum(o and not b for b, o in zip(base, other, strict=True))
    lost = sum(b and not o for b, o in zip(base, other, strict=True))
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {"gained": gained, "lost": lost, "mcnemar_p": min(1.0, 2 * tail)}


def population_stats(rows: Sequence[dict], ranked: Sequence[int], base_train: float) -> dict[str, Any]:
    """Train-reward statistics of a scored population (rows have seed, sigma, reward), overall
    and per sigma, the share above the base model's train accuracy, and the top 10."""
    rewards = [r["reward"] for r in rows]
    by_sigma = {}
    for sigma in sorted({r["sigma"] for r in rows}):
        own = [r["reward"] for r in rows if r["sigma"] == sigma]
        by_sigma[repr(sigma)] = {"n": len(own), "mean_reward": mean(own), "max_reward": max(own)}
    return {"size": len(rows), "reward_mean": mean(rewards),
            "reward_std": statistics.stdev(rewards) if len(rewards) > 1 else 0.0,
            "reward_min": min(rewards), "reward_max": max(rewards),
            "above_base": mean([r > base_train for r in rewards]), "by_sigma": by_sigma,
            "top": [{k: rows[i][k] for k in ("index", "seed", "sigma", "reward")} for i in ranked[:10]]}


# ---------------------------------------------------------------- K=1 transfer


def transfer_stats(rows: Sequence[dict], chosen: Sequence[int], accuracy: dict[int, float], base: float,
                   task: str) -> dict[str, Any]:
    """The K=1 diagnostic: does train reward predict a single seed's test accuracy? `chosen`
    are candidate indices in rank order (so the first is the train-selected seed); Spearman's
    rho is None when either side is constant or there are fewer than 3 seeds."""
    from scipy.stats import spearmanr

    train = [rows[i]["reward"] for i in chosen]
    test = [accuracy[i] for i in chosen]
    rho = p = None
    if len(chosen) >= 3 and len(set(train)) > 1 and len(set(test)) > 1:
        result = spearmanr(train, test)
        rho, p = float(result.statistic), float(result.pvalue)
    oracle = max(range(len(chosen)), key=lambda j: test[j])
    return {"task": task, "seeds": len(chosen), "spearman": rho, "p": p, "base": base,
            "oracle_best": test[oracle], "oracle_index": chosen[oracle],
            "train_selected": test[0], "train_selected_index": chosen[0], "mean": mean(test),
            "above_base": mean([a > base for a in test]),
            "points": [{"index": i, "seed": rows[i]["seed"], "sigma": rows[i]["sigma"],
                        "train_reward": rows[i]["reward"], "test_accuracy": accuracy[i]} for i in chosen]}


def plot_transfer(k1: dict[str, Any], base_train: float, path: Path) -> Path:
    """Train reward vs test accuracy of single seeds (K=1), by sigma, with the base model's lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for sigma in sorted({p["sigma"] for p in k1["points"]}):
        pts = [p for p in k1["points"] if p["sigma"] == sigma]
        ax.scatter([p["train_reward"] for p in pts], [p["test_accuracy"] for p in pts], s=18, alpha=0.7,
                   label=f"sigma {sigma:g}")
    ax.axhline(k1["base"], color="gray", ls="--", lw=1, label="base (test)")
    ax.axvline(base_train, color="gray", ls=":", lw=1, label="base (train)")
    rho = "n/a" if k1["spearman"] is None else f"{k1['spearman']:.2f}"
    ax.set_xlabel("train reward")
    ax.set_ylabel(f"{k1['task']} test accuracy")
    ax.set_title(f"K=1 transfer: {k1['seeds']} seeds, Spearman {rho}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- merges


def merge_stats(pairs: Sequence[tuple[int, int]], merged: dict[tuple[int, int, str], float],
                rows: Sequence[dict], single: dict[int, float], base: float, task: str) -> dict[str, Any]:
    """Each merge's test accuracy vs its parents'; per operator: mean, how often it beats base,
    the better parent, and the parents' mean."""
    table = []
    for a, b in pairs:
        parents = [single[a], single[b]]
        table.append({"a": a, "b": b, "seeds": [rows[a]["seed"], rows[b]["seed"]],
                      "sigmas": [rows[a]["sigma"], rows[b]["sigma"]], "parents": parents,
                      **{op: merged[(a, b, op)] for op in MERGE_OPS}})
    per_op = {op: {"mean": mean([r[op] for r in table]),
                   "beats_base": mean([r[op] > base for r in table]),
                   "beats_both_parents": mean([r[op] > max(r["parents"]) for r in table]),
                   "beats_parents_mean": mean([r[op] > mean(r["parents"]) for r in table])} for op in MERGE_OPS}
    return {"task": task, "base": base, "pairs": table, "parents_mean": mean([mean(r["parents"]) for r in table]),
            "operators": per_op}


# ---------------------------------------------------------------- held-out bits per byte


def encode_documents(tokenizer: Any, documents: Sequence[str], max_tokens: int) -> tuple[list[list[int]], int]:
    """(token ids of each document, cut to `max_tokens`, documents under 2 tokens dropped;
    total UTF-8 bytes of the scored text). Every token after a document's first is scored, and
    the bytes counted are those of the decoded text of exactly those tokens:
    `len(tokenizer.decode(ids[1:]).encode("utf-8"))`, special tokens and spacing kept as
    decoded (no clean-up)."""
    encoded, total_bytes = [], 0
    for doc in documents:
        ids = list(tokenizer(doc, add_special_tokens=False)["input_ids"])[:max_tokens]
        if len(ids) < 2:
            continue
        text = tokenizer.decode(ids[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        encoded.append(ids)
        total_bytes += len(text.encode("utf-8"))
    return encoded, total_bytes


def token_logprobs(model: torch.nn.Module, documents: Sequence[Sequence[int]]) -> list[Tensor]:
    """log p(ids[t] | ids[:t]) for t >= 1 of each document (one forward per document, softmax
    in float32), as float64 CPU tensors."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for ids in documents:
                x = torch.tensor([list(ids)], dtype=torch.long, device=device)
                logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
                logp = F.log_softmax(logits, dim=-1).gather(-1, x[0, 1:, None])[:, 0]
                out.append(logp.double().cpu())
    finally:
        model.train(was_training)
    return out


def ensemble_logprobs(member_logprobs: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Per-token log of the members' mean probability, log((1/K) sum_k p_k), computed stably as
    logsumexp_k(log p_k) - log K. member_logprobs[k][d] is member k's tensor for document d."""
    k = len(member_logprobs)
    if k == 0:
        raise ValueError("an ensemble needs at least one member")
    return [torch.logsumexp(torch.stack(per_doc), dim=0) - math.log(k)
            for per_doc in zip(*member_logprobs)]


def bits_per_byte(logprobs: Sequence[Tensor], total_bytes: int) -> float:
    """Summed negative log-likelihood in bits (nats / ln 2) over the scored bytes."""
    if total_bytes <= 0:
        raise ValueError("no bytes to score")
    nats = -sum(float(lp.sum()) for lp in logprobs)
    return nats / math.log(2) / total_bytes


def heldout_bpb(env: dist.Env, model: torch.nn.Module, tokenizer: Any, candidates: Candidates,
                members: Sequence[int], ks: dict[int, list[float]], documents: int, max_tokens: int) -> dict[str, Any]:
    """Bits per byte of the base model, of each top member, and of each top-K ensemble (`ks`:
    K -> the top ratios that give it) on the first `documents` built-in validation documents,
    each cut to `max_tokens` (at most the model's context). The base and the members are scored
    across ranks."""
    val_documents = corpora.split_documents(corpora.load_documents("builtin"))[1]
    context = getattr(model.config, "max_position_embeddings", None) or max_tokens
    max_tokens = min(max_tokens, context)
    doc_ids, n_bytes = encode_documents(tokenizer, val_documents[:documents], max_tokens)

    def logprobs(i: int | None) -> list[Tensor]:
        candidates.apply(i)
        return token_logprobs(model, doc_ids)

    base_lp, *member_lp = map_with_progress(env, "held-out bpb", "models", [None, *members], logprobs)
    return {"documents": len(doc_ids), "tokens": sum(len(d) - 1 for d in doc_ids), "bytes": n_bytes,
            "max_tokens": max_tokens, "base": bits_per_byte(base_lp, n_bytes),
            "members_mean": mean([bits_per_byte(lp, n_bytes) for lp in member_lp]),
            "ensembles": [{"k": k, "ratios": ratios, "bpb": bits_per_byte(ensemble_logprobs(member_lp[:k]), n_bytes)}
                          for k, ratios in ks.items()]}
