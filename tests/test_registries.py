"""Every entry of every registry, checked by what its kind requires (shapes, finiteness,
determinism, round trips). A new entry is covered without editing this file; a new kind of
registry needs one check function below."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import underpar.tracks.finetune  # noqa: F401  (importing the tracks registers every entry)
import underpar.tracks.pretrain  # noqa: F401
import underpar.tracks.randopt  # noqa: F401
from underpar.registry import Registry

CHECKS: dict[str, Callable[[str, Any], None]] = {}


def check(kind: str):
    def add(fn):
        CHECKS[kind] = fn
        return fn
    return add


# ---- model and quantization checks

# ---- optimizer, schedule and finetune checks

# ---- task, answer and randopt checks


@check("task")
def check_task(name: str, task: Any) -> None:
    """The task's sample records, written as a local file (no network), load the same way twice;
    every prompt is non-empty; an answer-scored task scores each gold answer, stated the way its
    answer kind states answers, as correct, another example's gold as wrong, and its own SFT
    response (where it has one) as correct; a task without gold answers has responses to train on."""
    import json
    import tempfile
    from pathlib import Path

    from underpar.data.answers import ANSWER_KINDS
    from underpar.data.tasks import Task

    assert isinstance(task, Task) and task.name == name and task.splits and task.sample_records
    split = task.splits[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{split}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in task.sample_records), encoding="utf-8")
        examples = task.load(split, path=str(path))
        assert examples == task.load(split, path=str(path)) and len(examples) == len(task.sample_records)
    for example in examples:
        prompt = task.prompt_messages(example)
        assert prompt and prompt[-1]["role"] == "user" and all(m["content"].strip() for m in prompt)
    if task.answer_kind is None:
        assert all(task.sft_response(e).strip() for e in examples)
        return
    kind = ANSWER_KINDS[task.answer_kind]
    assert len({e.answer for e in examples}) == len(examples) >= 2, "sample records need different gold answers"
    for example, other in zip(examples, examples[1:] + examples[:1]):
        assert task.reward(kind.completion(example.answer), example) == 1.0, example.answer
        assert task.reward(kind.completion(other.answer), example) == 0.0, (other.answer, example.answer)
        if example.response is not None:
            assert task.reward(example.response, example) == 1.0, example.response


@check("answer_kind")
def check_answer_kind(name: str, kind: Any) -> None:
    """Extraction from the canonical completion of each example answer gives it back (the
    canonical form exactly); vote keys are deterministic, equal answers share one and compare
    equal, different answers do not; no text gives no answer and no vote."""
    import itertools

    from underpar.data.answers import AnswerKind

    assert isinstance(kind, AnswerKind) and len(kind.examples) >= 2
    assert kind.extract(None) is None and kind.extract("") is None
    assert kind.vote_key(None) is None and kind.vote_key("  ") is None
    keys = []
    for group in kind.examples:
        canonical = group[0]
        assert kind.extract(kind.completion(canonical)) == canonical
        group_keys = {kind.vote_key(answer) for answer in group}
        assert len(group_keys) == 1 and kind.vote_key(canonical) == kind.vote_key(canonical), group
        for answer in group:
            assert kind.equal(kind.extract(kind.completion(answer)), canonical), answer
            assert kind.equal(answer, canonical) and kind.equal(canonical, answer), answer
        keys.append(group_keys.pop())
    assert len(set(keys)) == len(keys), keys
    for a, b in itertools.combinations(kind.examples, 2):
        assert not kind.equal(a[0], b[0]) and not kind.equal(b[0], a[0]), (a[0], b[0])


def _registries() -> dict[str, Registry]:
    return {kind: r for kind, r in Registry.all().items() if not kind.startswith("test-")}


def test_every_registry_kind_has_a_check():
    missing = sorted(set(_registries()) - set(CHECKS))
    assert not missing, f"registries without a check in tests/test_registries.py: {missing}"


@pytest.mark.parametrize("kind,name", [(k, n) for k, r in _registries().items() for n in r])
def test_registered_entry(kind: str, name: str):
    CHECKS[kind](name, _registries()[kind][name])
