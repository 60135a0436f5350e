"""Task accuracy: greedy answers to a task's prompts, extracted and scored, with 95% CIs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from underpar.data.sft import prompt_ids
from underpar.data.tasks import Example, Task
from underpar.eval.generate import DecodeConfig, GenerationStats, generate
from underpar.eval.stats import accuracy_ci


def answer(model: torch.nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], decode: DecodeConfig,
           stats: GenerationStats | None = None) -> list[str]:
    """The model's greedy completion of each example's chat prompt."""
    prompts = [prompt_ids(tokenizer, task.prompt_messages(e)) for e in examples]
    return [c.text for c in generate(model, tokenizer, prompts, decode, stats)]


def score(task: Task, examples: Sequence[Example], completions: Sequence[str]) -> dict[str, Any]:
    """Accuracy (strict extraction, else flexible) plus each extraction alone, as lm-eval
    reports strict-match and flexible-extract."""
    rows = {"accuracy": [], "strict": [], "flexible": []}
    for example, text in zip(examples, completions, strict=True):
        found = task.extract_all(text)
        rows["accuracy"].append(task.is_correct(task.extract(text), example.answer))
        rows["strict"].append(task.is_correct(found["strict"], example.answer))
        rows["flexible"].append(task.is_correct(found["flexible"], example.answer))
    out: dict[str, Any] = {"task": task.name, "n": len(examples)}
    for name, correct in rows.items():
        out[name] = accuracy_ci(correct) if correct else None
    return out


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], decode: DecodeConfig,
                  samples: int = 3) -> dict[str, Any]:
    """Generate, extract and score; with throughput and a few sample completions."""
    was_training = model.training
    model.eval()
    stats = GenerationStats()
    completions = answer(model, tokenizer, task, examples, decode, stats)
    model.train(was_training)
    result = score(task, examples, completions)
    result["generated_tokens_per_second"] = stats.tokens_per_second
    result["samples"] = [
        {"question": e.question[:300], "gold": e.answer, "completion": c[:600]}
        for e, c in zip(examples[:samples], completions[:samples])
    ]
    return result
