"""The task interface: `Example`, `Task` (load a split, format the prompt, score answers by
the task's answer kind, give the SFT target) and the `TASKS` registry, with the readers of
local files and hub datasets that every task uses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from underpar.data.answers import ANSWER_KINDS, AnswerKind
from underpar.errors import ConfigError, DataError, UnderparError
from underpar.registry import Registry


@dataclass
class Example:
    question: str
    answer: str                          # gold final answer, normalized ("" for chat)
    response: str | None = None          # the SFT target text
    messages: list[dict] | None = None   # a whole chat (task "chat")
    meta: dict = field(default_factory=dict)


NUMERIC_INSTRUCTION = ("Solve the problem step by step. End your reply with the final answer "
                       "on its own line in the form \"#### <number>\".")
MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


# ---------------------------------------------------------------- reading records

def read_records(path: str | Path, split: str) -> list[dict]:
    """Records of a `.jsonl` or `.json` file (a list, or an object with the split's list), or
    of `<folder>/<split>.jsonl|.json`."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / f"{split}.jsonl", path / f"{split}.json"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DataError(f"{path} has no {split}.jsonl or {split}.json; add one or pass the file")
        path = found[0]
    if not path.is_file():
        raise DataError(f"task data file {path} does not exist; pass an existing .jsonl/.json file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: bad JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict):
        data = data.get(split, data.get("data"))
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a list of records (or {{\"{split}\": [...]}})")
    return data


def hub_records(repo: str, config: str | None, split: str) -> list[dict]:
    """A split of a Hugging Face hub dataset as a list of dicts (needs `datasets` and access)."""
    try:
        import datasets
    except ImportError:
        raise DataError("loading tasks from the hub needs `datasets` (pip install 'underpar[hf]'), "
                        "or pass a local file with path=") from None
    try:
        dataset = datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise DataError(f"could not load {repo} ({config or 'default'}, split {split}) from the "
                        f"hub: {type(e).__name__}: {e}; pass a local .jsonl copy with path=") from None
    return [dict(row) for row in dataset]


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record or record[name] is None:
        raise DataError(f"{where}: record has no {name!r} field (fields: {sorted(record)})")
    return record[name]


# ---------------------------------------------------------------- tasks

TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    """Add `task` to `TASKS` under its name (a config names it in `task`, `test_tasks`, ...)."""
    return TASKS.register(task.name)(task)


def get_task(name: str) -> Task:
    """The registered task `name`; an unknown name is a ConfigError listing the valid ones."""
    return TASKS[name]


class Task:
    """A task: `load` examples, `prompt_messages`, `extract` answers, `reward`, `sft_response`.
    File and hub tasks keep the source order and take the first `limit` records (lm-eval's
    --limit); `seed` matters for generated tasks. Answers are read, compared and voted on by
    the task's answer kind (a name in `ANSWER_KINDS`; None for tasks without gold answers).
    `sample_records` are records in the task's local-file schema, with different gold answers:
    documentation, and what the registry check loads (no network)."""

    name: str = ""
    answer_kind: str | None = "numeric"
    splits: tuple[str, ...] = ("train", "test")
    instruction: str = NUMERIC_INSTRUCTION
    sample_records: tuple[dict, ...] = ()

    @property
    def answers(self) -> AnswerKind:
        if self.answer_kind is None:
            raise UnderparError(f"task {self.name!r} has no gold answers to score; evaluate with an answer "
                                f"task ({', '.join(n for n, t in TASKS.items() if t.answer_kind)})")
        return ANSWER_KINDS[self.answer_kind]

    def load(self, split: str, limit: int | None = None, seed: int = 0,
             path: str | None = None) -> list[Example]:
        if split not in self.splits:
            raise ConfigError(f"task {self.name!r} has no split {split!r}; valid: {list(self.splits)}")
        records = read_records(path, split) if path else self._hub(split)
        where = str(path) if path else f"task {self.name} (hub)"
        records = records[:limit] if limit is not None else records
        return [self.example(r, f"{where} record {i}") for i, r in enumerate(records)]

    def _hub(self, split: str) -> list[dict]:
        raise DataError(f"task {self.name!r} has no hub source; pass path=")

    def example(self, record: dict, where: str) -> Example:
        raise NotImplementedError

    def prompt_messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": f"{example.question}\n\n{self.instruction}"}]

    def extract_all(self, text: str | None) -> dict[str, str | None]:
        """Both extractions, as lm-eval reports them: "strict" (the task's format) and
        "flexible" (a fallback)."""
        return self.answers.extract_all(text)

    def extract(self, text: str | None) -> str | None:
        """The strict extraction, else the flexible one."""
        found = self.extract_all(text)
        return found["strict"] if found["strict"] is not None else found["flexible"]

    def is_correct(self, pred: str | None, gold: str) -> bool:
        return self.answers.equal(pred, gold)

    def reward(self, text: str | None, example: Example) -> float:
        return 1.0 if self.is_correct(self.extract(text), example.answer) else 0.0

    def sft_response(self, example: Example) -> str:
        if example.response is None:
            raise DataError(f"task {self.name!r}: this example has no response to train on "
                            f"(question {example.question[:60]!r})")
        return example.response
