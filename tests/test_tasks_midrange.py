"""The mid-range task variants (data/tasks/generated.py, issue 18): each generates what its name
and config say, is prompted with the question alone, and is what randopt_quality.py runs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym")

from underpar.data.tasks import TASKS, get_task  # noqa: E402
from underpar.data.tasks.base import NUMERIC_INSTRUCTION  # noqa: E402

CHAIN = re.compile(r"State the final answer to the following arithmetic problem: (\d(?: [+-] \d){1,2}) =")
SUM = re.compile(r"(?:What is (?P<a>.+)\?|Solve (?P<b>.+)\.|Compute (?P<c>.+)\.|Evaluate: (?P<d>.+)\.)")


def test_chain_sum_easy_is_two_or_three_one_digit_terms():
    task = get_task("chain_sum_easy")
    test = task.load("test", limit=100)
    terms = set()
    for example in test:
        match = CHAIN.fullmatch(example.question)
        assert match, example.question
        expression = match.group(1)
        terms.add(len(expression.split()) // 2 + 1)
        assert int(example.answer) == eval(expression)  # noqa: S307 (digits, + and - only)
        assert task.prompt_messages(example) == [{"role": "user", "content": f"{example.question}\n\n{NUMERIC_INSTRUCTION}"}]
        assert task.reward(f"{expression} = {example.answer}", example) == 1.0
    assert terms == {2, 3}
    assert not {e.question for e in test} & {e.question for e in task.load("train", limit=200)}


def test_basic_arithmetic_easy_is_a_sum_of_two_numbers_below_101():
    task = get_task("basic_arithmetic_easy")
    test = task.load("test", limit=100)
    widths = set()
    for example in test:
        match = SUM.fullmatch(example.question)
        assert match, example.question
        a, b = next(g for g in match.groups() if g).split(" + ")
        widths.add(max(len(a), len(b)))
        assert int(a) <= 100 and int(b) <= 100 and int(example.answer) == int(a) + int(b)
        assert task.prompt_messages(example) == [{"role": "user", "content": example.question}]
        # the first line is the answer; what follows is not read
        assert task.reward(f"{a} + {b} = {example.answer}\n\nIn Python, 2 + 2 is 4.", example) == 1.0
        assert task.reward(f"To add them:\n{a} + {b} = {example.answer}", example) == 0.0
        assert task.reward(f"To add them:\n{a} + {b}\n#### {example.answer}", example) == 1.0  # the strict form
    assert widths >= {1, 2}
    assert len({m.group(0).split()[0] for e in test if (m := SUM.fullmatch(e.question))}) == 4  # all phrasings


def test_variants_keep_the_defaults_apart():
    # the default tasks keep their config, cached data and the step-by-step instruction
    chain = get_task("chain_sum")
    example = chain.load("test", limit=1)[0]
    assert chain.prompt_messages(example)[0]["content"].endswith(NUMERIC_INSTRUCTION)
    assert not chain.first_line and not get_task("chain_sum_easy").first_line
    assert get_task("chain_sum_easy").dataset == "chain_sum" and chain.config == {}
    assert example.question not in {e.question for e in get_task("chain_sum_easy").load("test", limit=100)}


def quality_benchmark():
    path = Path(__file__).parents[1] / "benchmarks" / "randopt_quality.py"
    spec = importlib.util.spec_from_file_location("randopt_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_runs_registered_tasks():
    module = quality_benchmark()
    assert set(module.TASK_TOKENS) == {"chain_sum_easy", "basic_arithmetic_easy"} <= set(TASKS)


def test_quality_summary_tests_the_gain_over_seeds():
    def run(seed, acc, p, es_acc):
        return {"task": "t", "global_seed": seed,
                "ensembles": [{"k": 16, "base": {"mean": 0.2}, "accuracy": {"mean": acc}, "mcnemar_p": p}],
                "es": {"test": {"t": {"base": {"mean": 0.2}, "accuracy": {"mean": es_acc}, "mcnemar_p": 0.5}}}}
    rows = quality_benchmark().summary_over_seeds([run(0, 0.26, 0.01, 0.2), run(1, 0.25, 0.2, 0.2), run(2, 0.27, 0.03, 0.2)])
    k16, es = rows
    assert (k16["k"], es["k"]) == ("16", "ES") and k16["significant"] == 2 and es["significant"] == 0
    assert abs(k16["gain"]["mean"] - 0.06) < 1e-12 and abs(k16["accuracy"] - 0.26) < 1e-12
    # gains 0.06, 0.05, 0.07: t = 0.06 / (0.01 / sqrt 3) = 10.39 on 2 df, two-sided p = 0.0091
    assert abs(k16["p"] - 0.0091) < 2e-4 and k16["gain"]["lo"] > 0
    assert es["p"] == 1.0 and es["gain"]["mean"] == 0
