"""Task accuracy: greedy answers to a task's prompts, extracted and scored, with 95% CIs; and
`underpar eval task` (TaskEvalConfig: its options, checked like config fields before the model
loads)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from underpar import ui
from underpar.config import bounded, choice, validate
from underpar.data.sft import prompt_ids
from underpar.data.tasks import TASKS, Example, Task, get_task
from underpar.errors import ConfigError, DataError
from underpar.eval.generate import DecodeConfig, GenerationStats, generate
from underpar.eval.stats import accuracy_ci


def check_scored(name: str, split: str, field: str) -> None:
    """`field` names task `name` to score on `split`: the task must have gold answers and that
    split (a ConfigError that lists the tasks that do)."""
    task = get_task(name)
    if task.answer_kind is None:
        scored = ", ".join(n for n, t in TASKS.items() if t.answer_kind is not None and split in t.splits)
        raise ConfigError(f"{field} = {name!r} has no gold answers to score; choose an answer-scored task ({scored})")
    if split not in task.splits:
        raise ConfigError(f"{field} = {name!r} has no {split!r} split (its splits: {', '.join(task.splits)})")


def answer(model: torch.nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], decode: DecodeConfig,
           stats: GenerationStats | None = None, label: str | None = None) -> list[str]:
    """The model's greedy completion of each example's chat prompt; with a `label`, a progress
    bar over the examples."""
    prompts = [prompt_ids(tokenizer, task.prompt_messages(e)) for e in examples]
    if label is None:
        return [c.text for c in generate(model, tokenizer, prompts, decode, stats)]
    return _answer_in_batches(model, tokenizer, prompts, decode, stats, label)


def _answer_in_batches(model, tokenizer, prompts: list[list[int]], decode: DecodeConfig,
                       stats: GenerationStats | None, label: str) -> list[str]:
    """`generate` one batch per call, so a bar can move between batches. The batches are the
    ones a single call forms (longest prompts first, `batch_size` each; the static engine's
    last batch filled up with repeats of its first prompt), so the completions are the same
    and the static engine keeps one decoder shape (one compiled graph on CUDA)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    rows = min(decode.batch_size, len(prompts))
    texts: list[str] = [""] * len(prompts)
    with ui.progress() as bar:
        shown = bar.add_task(label, total=len(prompts), info="")
        for start in range(0, len(order), decode.batch_size):
            idx = order[start : start + decode.batch_size]
            batch = [prompts[i] for i in idx]
            if decode.engine == "static":
                batch += [batch[0]] * (rows - len(batch))
            part = GenerationStats()
            done = generate(model, tokenizer, batch, decode, part)[: len(idx)]
            for i, completion in zip(idx, done):
                texts[i] = completion.text
            if stats is not None:
                stats.prompts += len(idx)
                stats.batches += 1
                stats.prompt_tokens += sum(len(p) for p in batch[: len(idx)])
                stats.generated_tokens += sum(len(c.token_ids) for c in done)
                stats.decode_steps += part.decode_steps
                stats.seconds += part.seconds
                stats.compiled = part.compiled
            tokens_per_second = sum(len(c.token_ids) for c in done) / part.seconds if part.seconds > 0 else 0.0
            bar.update(shown, advance=len(idx), info=f"{tokens_per_second:.0f} tok/s")
    return texts


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
                  samples: int = 3, label: str | None = None) -> dict[str, Any]:
    """Generate, extract and score; with throughput and a few sample completions. With a
    `label`, a progress bar over the examples."""
    if not examples:
        raise DataError(f"no examples of task {task.name} to evaluate")
    was_training = model.training
    model.eval()
    stats = GenerationStats()
    completions = answer(model, tokenizer, task, examples, decode, stats, label)
    model.train(was_training)
    result = score(task, examples, completions)
    result["generated_tokens_per_second"] = stats.tokens_per_second
    result["samples"] = [
        {"question": e.question[:300], "gold": e.answer, "completion": c[:600]}
        for e, c in zip(examples[:samples], completions[:samples])
    ]
    return result


# ---------------------------------------------------------------- `underpar eval task`


@dataclasses.dataclass
class TaskEvalConfig:
    """The options of `underpar eval task`."""

    model: str = "smollm2-135m"  # smollm2-135m, a local save_pretrained folder, or a hub id
    task: str = choice("gsm_symbolic", TASKS)
    split: str = "test"
    limit: int = bounded(200, 1)  # the first N examples
    path: str = ""  # a local file in the task's schema ("" = hub or generated)
    max_new_tokens: int = bounded(256, 1)
    batch_size: int = bounded(64, 1)

    def check(self) -> None:
        check_scored(self.task, self.split, "task")
        if not self.model.strip():
            raise ConfigError("model = '' names no model; give smollm2-135m, a local folder or a hub id")


def evaluate_model(cfg: TaskEvalConfig) -> dict[str, Any]:
    """Load the examples (and check the model name) first, then the model: a bad input fails in
    seconds, before the slow load. Progress goes to stderr."""
    from underpar.model import hf

    validate(cfg)
    task = get_task(cfg.task)
    examples = task.load(cfg.split, limit=cfg.limit, path=cfg.path or None)
    if not examples:
        raise DataError(f"{cfg.path or f'task {cfg.task}'} has no {cfg.split} examples to score")
    hf.check_model_name(cfg.model)
    decode = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    ui.console.print(f"loading model {cfg.model} ...", markup=False, highlight=False, soft_wrap=True)
    started = time.perf_counter()
    model, tokenizer = hf.load_model(cfg.model)
    hf.require_chat_template(tokenizer, cfg.model)
    hf.check_positions(model, cfg.model, max_new_tokens=cfg.max_new_tokens)
    ui.console.print(f"loaded {cfg.model} ({hf.num_parameters(model):,} parameters, {next(model.parameters()).device}) "
                     f"in {time.perf_counter() - started:.1f} s; scoring {len(examples)} examples of {cfg.task} "
                     f"({cfg.split})", markup=False, highlight=False, soft_wrap=True)
    return evaluate_task(model, tokenizer, task, examples, decode, label=f"{cfg.task} {cfg.split}")
