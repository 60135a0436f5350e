"""Ensembles of model variants: majority voting over answers grouped by their answer kind's
vote key (so "1/2" and "0.5" are one vote), ties to the higher-ranked member."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from underpar.data.answers import vote_key

# ---------------------------------------------------------------- majority vote


def majority_vote(answers: Sequence[str | None], kind: str,
                  keys: Sequence[str | None] | None = None) -> str | None:
    """The ensemble's answer to one question. `answers` are the members' extracted answers in
    rank order (best first); they vote by `vote_key(answer, kind)`, so "1/2" and "0.5" count
    as one answer. None (nothing extracted) does not vote; if nobody answered, the result is
    None. A tie between keys goes to the key of the highest-ranked member among its voters.
    Returns that member's own answer text (scored with the task's `is_correct`).
    `keys` may pass precomputed vote keys (one per answer)."""
    keys = [vote_key(a, kind) for a in answers] if keys is None else list(keys)
    if len(keys) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(keys)} vote keys")
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    most = max(counts.values())
    # Members are in rank order, so the first voter of a top-count key is the tie winner.
    return next(a for a, k in zip(answers, keys) if k is not None and counts[k] == most)


def vote_all(member_answers: Sequence[Sequence[str | None]], kind: str,
             member_keys: Sequence[Sequence[str | None]] | None = None) -> list[str | None]:
    """`majority_vote` per question: member_answers[m][q] is member m's answer to question q,
    members in rank order."""
    if not member_answers:
        raise ValueError("an ensemble needs at least one member")
    if member_keys is None:
        member_keys = [[vote_key(a, kind) for a in answers] for answers in member_answers]
    questions = len(member_answers[0])
    if any(len(answers) != questions for answers in member_answers):
        raise ValueError("every member must answer the same questions")
    return [majority_vote([answers[q] for answers in member_answers], kind,
                          [keys[q] for keys in member_keys]) for q in range(questions)]
