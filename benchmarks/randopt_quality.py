"""Where RandOpt helps (issue 18): on tasks where SmolLM2-135M-Instruct is mid-range, the base model
against top-K majority-vote ensembles (K in --ks) with Wilson intervals and an exact McNemar test
on the same questions, the K=1 train-reward/test-accuracy Spearman, and ES (`--method es`:
antithetic pairs, z-scored rewards, fp32 master, tracks/randopt_es.py) after the same number of
candidate evaluations on the same train slice, for each task and global seed. One process, one model load; candidates are decoded --size at a
time (decode.population). The JSON is rewritten after every (task, seed), so a call cut short
keeps what finished; split a long grid over calls or GPUs with --tasks / --global-seeds, and give
each process its own --tag (the file is randopt_quality-<tag>-<device>.json).

The default tasks are the mid-range ones of data/tasks/generated.py (chain_sum_easy,
basic_arithmetic_easy: short direct answers, so --max-new-tokens defaults to each task's
TASK_TOKENS; 256 for other tasks). Cost per (task, seed) is search + ES (the same
number of candidate evaluations) + ensembles (up to max(--ks) members on the test set) + K=1
(--k1-seeds members on the test set): about (2 * population * train + (max(ks) + k1_seeds) * test)
prompt decodes of up to --max-new-tokens tokens.

    PYTHONPATH=src python3 benchmarks/randopt_quality.py --out $OUT [--tasks chain_sum_easy basic_arithmetic_easy] \\
        [--global-seeds 0 1 2] [--population 512] [--tag gpu0]
    python3 benchmarks/randopt_quality.py --out $OUT --merge a.json b.json   # one table and the per-seed summary

The summary gives, per task and K (and for ES), the mean accuracy gain over the global seeds with
its Student-t interval and a one-sample t-test of the gains (the seeds redraw the population; the
test questions are the same), beside how many seeds' McNemar tests reach p < 0.05.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from underpar import config as cfglib
from underpar.eval.stats import mean_ci, t_sf
from underpar.model import hf
from underpar.runs.rundir import device_tag, environment
from underpar.tracks import randopt

RUNS = tempfile.mkdtemp(prefix="randopt-quality-")
# New tokens each task's answers need, from SmolLM2-135M-Instruct's greedy completions on 200
# test questions (CPU, fp32): cut at 32 tokens, chain_sum_easy's score what they score at 128;
# basic_arithmetic_easy's first line (the only one scored) ends within 48.
TASK_TOKENS = {"chain_sum_easy": 32, "basic_arithmetic_easy": 48}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["chain_sum_easy", "basic_arithmetic_easy"])
    parser.add_argument("--global-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--population", type=int, default=512)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0 = the task's TASK_TOKENS, else 256")
    parser.add_argument("--tag", default="", help="file name prefix (one per process when a grid is split)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="candidates decoded together (decode.population)")
    parser.add_argument("--k1-seeds", type=int, default=64, help="-1 = the whole population")
    parser.add_argument("--es-pairs", type=int, default=16)
    parser.add_argument("--es-sigma", type=float, default=1e-3)
    parser.add_argument("--es-lr", type=float, default=5e-7)
    parser.add_argument("--no-es", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra randopt config overrides")
    parser.add_argument("--merge", nargs="+", help="result files of earlier runs: one table and summary, no decoding")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        records = [json.loads(Path(f).read_text()) for f in args.merge]
        record = {**records[0], "runs": [r for rec in records for r in rec["runs"]], "merged": args.merge}
        record["summary"] = summary_over_seeds(record["runs"])
        (out / f"randopt_quality-merged-{device_tag(record['device'])}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(table(record))
        return
    started = time.time()
    model, tokenizer = hf.load_model(args.model)
    record = {"benchmark": "randopt_quality", "model": args.model, "args": vars(args), "runs": [],
              "load_seconds": time.time() - started, **environment()}
    path = out / f"randopt_quality-{args.tag + '-' if args.tag else ''}{device_tag()}.json"
    for task in args.tasks:
        max_new_tokens = args.max_new_tokens or TASK_TOKENS.get(task, 256)
        for seed in args.global_seeds:
            cfg = cfglib.resolve("randopt", "randopt-smollm2", [
                f"task={task}", f"test_tasks={json.dumps([task])}", f"seed={seed}", f"name=quality-{task}-{seed}",
                f"population={args.population}", f"sigmas={json.dumps(args.sigmas)}",
                f"top_ratios={json.dumps([k / args.population for k in args.ks])}",
                f"train_examples={args.train_examples}", f"test_examples={args.test_examples}",
                f"decode.max_new_tokens={max_new_tokens}", f"decode.batch_size={args.batch_size}",
                f"decode.population={args.size}", f"diagnostics.k1_seeds={args.k1_seeds}",
                "diagnostics.merge_pairs=0", "diagnostics.bpb_documents=0", f"runs_root={RUNS}", *args.sets])
            summary = dataclasses.asdict(randopt.run(cfg, model, tokenizer))
            run = {"task": task, "global_seed": seed, "max_new_tokens": max_new_tokens, **{k: summary[k] for k in (
                "base", "population", "search", "ensembles", "diagnostics", "timing")}}
            if not args.no_es:  # the same task, train slice and number of candidate evaluations
                es_cfg = cfg
                for assignment in ("method=es", f"name=quality-es-{task}-{seed}", f"es.seed={seed}",
                                   f"es.pairs={args.es_pairs}", f"es.sigma={args.es_sigma}", f"es.lr={args.es_lr}",
                                   f"es.iterations={max(1, args.population // (2 * args.es_pairs))}"):
                    es_cfg = cfglib.override(es_cfg, assignment)
                es_summary = dataclasses.asdict(randopt.run(es_cfg, model, tokenizer))
                run["es"] = {k: es_summary[k] for k in ("es", "evaluations", "iterations", "test", "seconds", "model_dir")}
            record["runs"].append(run)
            record["seconds"] = time.time() - started
            path.write_text(json.dumps(record, indent=2) + "\n")
            phases = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timing"].items())
            es_s = f", es {run['es']['seconds']:.0f} s" if "es" in run else ""
            print(f"{task} seed {seed} done at {record['seconds']:.0f} s ({phases}{es_s})", flush=True)
    print(f"wrote {path}")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| task | seed | base [95% CI] | K | ensemble [95% CI] | gained / lost | McNemar p | K=1 Spearman | ES (evals) [95% CI] | ES p |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda a: f"{a['mean']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]"  # noqa: E731
    for run in record["runs"]:
        k1 = run["diagnostics"]["k1"]
        rho = "-" if not k1 or k1["spearman"] is None else f"{k1['spearman']:+.2f}"
        e = run["es"]["test"][run["task"]] if "es" in run else None
        es_text, es_p = (f"{fmt(e['accuracy'])} ({run['es']['evaluations']})", f"{e['mcnemar_p']:.3f}") if e else ("-", "-")
        for ens in run["ensembles"]:
            lines.append(f"| {run['task']} | {run['global_seed']} | {fmt(ens['base'])} | {ens['k']} | {fmt(ens['accuracy'])} | "
                         f"{ens['gained']} / {ens['lost']} | {ens['mcnemar_p']:.3f} | {rho} | {es_text} | {es_p} |")
    if "summary" in record:
        lines += ["", "| task | K | seeds | base | accuracy, mean | gain, mean [95% t-CI] | t-test p | seeds with McNemar p < 0.05 |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in record["summary"]:
            g = row["gain"]
            p = "-" if row["p"] is None else f"{row['p']:.3f}"
            lines.append(f"| {row['task']} | {row['k']} | {g['n']} | {row['base']:.3f} | {row['accuracy']:.3f} | "
                         f"{g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | {p} | {row['significant']} |")
    else:
        lines.append(f"\n{record['device']}, torch {record['torch']}, {record.get('seconds', 0):.0f} s in all")
    return "\n".join(lines)


def summary_over_seeds(runs: list[dict]) -> list[dict]:
    """Per task and K (and "ES"): the gain over the base model on the test questions, over global
    seeds: mean, t-interval and a two-sided one-sample t-test against 0."""
    cells: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for run in runs:
        for ens in run["ensembles"]:
            cells.setdefault((run["task"], str(ens["k"])), []).append(
                (ens["base"]["mean"], ens["accuracy"]["mean"], ens["mcnemar_p"]))
        if "es" in run:
            e = run["es"]["test"][run["task"]]
            cells.setdefault((run["task"], "ES"), []).append((e["base"]["mean"], e["accuracy"]["mean"], e["mcnemar_p"]))
    rows = []
    for (task, k), values in cells.items():
        gains = [acc - base for base, acc, _ in values]
        gain = mean_ci(gains)
        p = None  # one seed: no test
        if len(gains) > 1 and gain["std"] == 0:  # every seed the same gain: certain, or none
            p = 1.0 if gain["mean"] == 0 else 0.0
        elif len(gains) > 1:
            p = 2 * t_sf(abs(gain["mean"]) / (gain["std"] / len(gains) ** 0.5), len(gains) - 1)
        rows.append({"task": task, "k": k, "base": sum(v[0] for v in values) / len(values),
                     "accuracy": sum(v[1] for v in values) / len(values), "gain": gain, "p": p,
                     "significant": sum(v[2] < 0.05 for v in values)})
    return rows


if __name__ == "__main__":
    main()
