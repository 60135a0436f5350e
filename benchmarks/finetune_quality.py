"""Fine-tuning quality: SmolLM2-135M-Instruct fine-tuned on a fixed gsm_symbolic training set,
full versus Deep Chaos with the same steps, several seeds each; accuracy on held-out
gsm_symbolic and on ASDiv, with the base model's accuracy; mean, 95% CI and a Welch test.

One process and one model object: the base weights are copied back before every run, so the
compiled decoder is reused across evaluations.

    PYTHONPATH=src python3 benchmarks/finetune_quality.py --out $OUT [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.data.tasks import get_task
from underpar.eval.accuracy import evaluate_task
from underpar.eval.generate import DecodeConfig
from underpar.eval.stats import mean_ci, welch_test
from underpar.model import hf
from underpar.runs.rundir import device_tag
from underpar.tracks import finetune

EVAL_TASKS = ("gsm_symbolic", "asdiv")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["full", "chaos"])
    parser.add_argument("--eval-examples", type=int, default=300)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()
    model, tokenizer = hf.load_model("smollm2-135m")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def config(method: str, seed: int) -> finetune.FinetuneConfig:
        seeded = any(f.name == "seed" for f in dataclasses.fields(finetune.METHODS[method]))  # chaos, LISA
        sets = [f"method={method}", f"train.seed={seed}", *([f"method.seed={seed}"] if seeded else []),
                f"train.runs_root={tempfile.mkdtemp(prefix='finetune-quality-')}", f"eval.examples={args.eval_examples}", "train.save=false",
                f"eval.tasks={json.dumps(list(EVAL_TASKS))}", *args.sets]
        return cfglib.resolve("finetune", "chaos-smollm2", sets)

    reference = config("full", 0)
    decode = DecodeConfig(max_new_tokens=reference.eval.max_new_tokens, batch_size=reference.eval.batch_size,
                          engine=reference.eval.engine, compile=reference.eval.compile)
    base = {}
    for name in EVAL_TASKS:
        task = get_task(name)
        examples = task.load("test", limit=args.eval_examples, seed=reference.data.seed)
        base[name] = evaluate_task(model, tokenizer, task, examples, decode)
        print(f"base {name}: {base[name]['accuracy']['mean']:.3f} ({base[name]['generated_tokens_per_second']:.0f} tok/s)", flush=True)

    runs = []
    for method in args.methods:
        for seed in args.seeds:
            model.load_state_dict(base_state)
            summary = finetune.run(config(method, seed), model, tokenizer)
            row = {"method": method, "seed": seed, "steps": summary.steps, "first_loss": summary.first_loss,
                   "final_loss": summary.final_loss, "median_ms_per_step": summary.median_ms_per_step,
                   "training_seconds": summary.training_seconds,
                   "accuracy": {n: summary.eval[n]["accuracy"]["mean"] for n in EVAL_TASKS},
                   "strict": {n: summary.eval[n]["strict"]["mean"] for n in EVAL_TASKS},
                   "flexible": {n: summary.eval[n]["flexible"]["mean"] for n in EVAL_TASKS}}
            runs.append(row)
            print(json.dumps(row), flush=True)

    stats = {}
    for name in EVAL_TASKS:
        by_method = {m: [r["accuracy"][name] for r in runs if r["method"] == m] for m in args.methods}
        stats[name] = {m: mean_ci(v) for m, v in by_method.items()}
        if "full" in by_method and "chaos" in by_method and len(args.seeds) > 1:
            stats[name]["chaos_vs_full_welch"] = welch_test(by_method["chaos"], by_method["full"])
    record = {"benchmark": "finetune_quality", "model": "smollm2-135m", "train_task": "gsm_symbolic",
              "config": cfglib.to_dict(reference), "eval_examples": args.eval_examples,
              "base": {n: {k: base[n][k] for k in ("accuracy", "strict", "flexible", "n", "generated_tokens_per_second")} for n in EVAL_TASKS},
              "runs": runs, "stats": stats, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "commit": os.environ.get("UNDERPAR_GIT_COMMIT"), "seconds": time.time() - started}
    (out / f"finetune_quality-{device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| model | " + " | ".join(f"{n} accuracy (mean [95% CI])" for n in EVAL_TASKS) + " |",
             "|---|" + "---|" * len(EVAL_TASKS)]
    lines.append("| base | " + " | ".join(f"{record['base'][n]['accuracy']['mean']:.3f} [{record['base'][n]['accuracy']['lo']:.3f}, "
                                            f"{record['base'][n]['accuracy']['hi']:.3f}]" for n in EVAL_TASKS) + " |")
    methods = sorted({r["method"] for r in record["runs"]})
    for m in methods:
        cells = []
        for n in EVAL_TASKS:
            s = record["stats"][n][m]
            cells.append(f"{s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] (n={s['n']} seeds)")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for n in EVAL_TASKS:
        if "chaos_vs_full_welch" in record["stats"][n]:
            w = record["stats"][n]["chaos_vs_full_welch"]
            lines.append(f"\nWelch chaos vs full on {n}: t = {w['t']:.2f}, p = {w['p']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
