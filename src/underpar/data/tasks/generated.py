"""reasoning-gym tasks generated offline (gsm_symbolic, basic_arithmetic, chain_sum), with
deterministic, disjoint, cached splits."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from underpar.data.answers import extract_gsm8k_strict, normalize_number
from underpar.data.corpora import cache_dir
from underpar.data.tasks.base import Example, Task, _field, read_records, register_task
from underpar.errors import ConfigError, DataError


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

    def __init__(self, name: str, dataset: str | None = None, instruction: str | None = None,
                 first_line: bool = False, **config: Any):
        """Task `name` from reasoning-gym's `dataset` (default: the same name) built with `config`
        (the dataset's own config fields, e.g. max_terms=3); `instruction` replaces the numeric
        one ("" = the question alone); `first_line`: a reply without the strict '#### <answer>'
        line is read from its first line only (a direct answer, whatever the model rambles on
        about afterwards)."""
        self.name, self.dataset, self.config, self.first_line = name, dataset or name, config, first_line
        if instruction is not None:
            self.instruction = instruction

    def extract_all(self, text: str | None) -> dict[str, str | None]:
        if self.first_line and text and "####" not in text:
            text = text.strip().split("\n", 1)[0]
        return super().extract_all(text)

    def prompt_messages(self, example: Example) -> list[dict]:
        if not self.instruction:  # the question alone (it states what to answer)
            return [{"role": "user", "content": example.question}]
        return super().prompt_messages(example)

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
        dataset = reasoning_gym.create_dataset(self.dataset, size=max_tries, seed=stream_seed, **self.config)
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

# Variants where SmolLM2-135M-Instruct is mid-range, so that RandOpt's votes can help (issue 18);
# the defaults (2-6 terms of 1-4 digits; basic_arithmetic's * / parentheses) score 0.02-0.08.
# Measured (CPU fp32, greedy, test split of seed 0, 200 questions, Wilson 95%): chain_sum_easy
# 0.140 [0.099, 0.195] at 32 new tokens (0.250 [0.175, 0.343] on another 100-question sample:
# just below mid-range; it fails on negative results and 3 terms), basic_arithmetic_easy 0.225
# [0.173, 0.288] at 48. chain_sum_easy keeps the step-by-step instruction: the replies are short
# ("4 - 4 = 0", median 11 tokens) and no worse than with the question alone (0.150 on 200).
# basic_arithmetic_easy is the question alone ("What is 23 + 45?"), read from the reply's first
# line: the model states the sum there, then often rambles on with other numbers.
register_task(Generated("chain_sum_easy", dataset="chain_sum",
                        min_terms=2, max_terms=3, min_digits=1, max_digits=1))  # "3 - 9 + 4 ="
register_task(Generated("basic_arithmetic_easy", dataset="basic_arithmetic", instruction="", first_line=True,
                        min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+"],
                        allow_parentheses=False, allow_negation=False, format_style="natural"))
