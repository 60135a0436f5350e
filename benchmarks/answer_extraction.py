"""Host-side scoring of a RandOpt chunk (issue 18): 32 candidates x 128 gsm_symbolic completions.
The completions stand in as the task's worked solutions (or questions where a task has none).
Times, best of --repeats, on this machine's CPU:

- `extract_last_number` scanning only after the last letter before the last digit (the library's);
- `extract_last_number_reference`, a scan of the whole text (the form it replaced; same
  results, checked here);
- the task's reward of every completion (strict extraction, the last number, the comparison).

    PYTHONPATH=src python3 benchmarks/answer_extraction.py --out $OUT   # ~10 s
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from underpar.data import answers
from underpar.data.tasks import get_task
from underpar.runs.rundir import device_tag, environment


def best_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    task = get_task(args.task)
    examples = task.load("test", limit=args.prompts)
    texts = [e.response or e.question for e in examples] * args.candidates
    gold = examples * args.candidates
    if [answers.extract_last_number(t) for t in texts] != [answers.extract_last_number_reference(t) for t in texts]:
        raise SystemExit("extract_last_number differs from a scan of the whole text")
    record = {"benchmark": "answer_extraction", "task": args.task, "completions": len(texts),
              "mean_chars": sum(map(len, texts)) / len(texts), **environment(),
              "seconds": {
                  "last_number": best_seconds(lambda: [answers.extract_last_number(t) for t in texts], args.repeats),
                  "last_number_whole_scan": best_seconds(lambda: [answers.extract_last_number_reference(t) for t in texts], args.repeats),
                  "reward": best_seconds(lambda: [task.reward(t, e) for t, e in zip(texts, gold)], args.repeats)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"answer_extraction-{device_tag()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["seconds"]), f"\nwrote {path}")


if __name__ == "__main__":
    main()
