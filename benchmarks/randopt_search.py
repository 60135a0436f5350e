"""RandOpt search on SmolLM2-135M-Instruct: for each global seed, 128 seeded perturbations scored
on 128 generated GSM-style training problems; the top 2% / 5% (K = 2 / 6) ensembled by majority
vote on held-out gsm_symbolic and ASDiv (200 each), against the base model; seeds/s; the K=1
train-vs-test diagnostic; pairwise merges; held-out bpb.

One process and one model load for all global seeds: `randopt.run` leaves the base weights in
place (PerturbSpace.restore) and the static decoder compiled by the first run serves the rest.

Sizing for ~8 minutes on one H100 with 2 global seeds x 128: every prompt set is one batch
(decode.batch_size = 200 = the test sets; the 128 training prompts are padded to 200 rows,
which costs little on a launch-bound 135M decode step), and the K=1 diagnostic evaluates 48
seeds per global seed (the top 6 ensemble members, whose answers are cached, plus 42 drawn at
random from the rest) instead of all 128. That is ~200 generate calls of <= 256 new tokens
per global seed.

    PYTHONPATH=src python3 benchmarks/randopt_search.py --out $OUT [--global-seeds 0 1] [--population 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path


from underpar import config as cfglib
from underpar.model import hf
from underpar.runs.rundir import device_tag, environment
from underpar.tracks import randopt

TEST_TASKS = ("gsm_symbolic", "asdiv")
RUNS = tempfile.mkdtemp(prefix="randopt-search-")  # run directories; only the JSON goes to --out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--global-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--train-examples", type=int, default=128)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=200, help="decoder rows; >= test examples = one batch per set")
    parser.add_argument("--k1-seeds", type=int, default=48, help="-1 = the whole population")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = hf.load_model("smollm2-135m")
    load_seconds = time.time() - started

    def config(seed: int) -> randopt.RandOptConfig:
        return cfglib.resolve("randopt", "randopt-smollm2", [
            f"seed={seed}", f"name=randopt-seed{seed}", f"population={args.population}",
            f"train_examples={args.train_examples}", f"test_examples={args.test_examples}",
            f"test_tasks={json.dumps(list(TEST_TASKS))}", f"decode.batch_size={args.batch_size}",
            f"diagnostics.k1_seeds={args.k1_seeds}", f"runs_root={RUNS}", *args.sets])

    record = {"benchmark": "randopt_search", "model": "smollm2-135m", "config": cfglib.to_dict(config(args.global_seeds[0])),
              "load_seconds": load_seconds, "runs": [], **environment()}
    path = out / f"randopt_search-{device_tag()}.json"
    for seed in args.global_seeds:
        summary = dataclasses.asdict(randopt.run(config(seed), model, tokenizer))
        record["runs"].append({"global_seed": seed, **{k: summary[k] for k in (
            "base", "population", "search", "ensembles", "diagnostics", "timing", "decoder_rows", "run_dir")}})
        record["seconds"] = time.time() - started
        path.write_text(json.dumps(record, indent=2) + "\n")  # after every global seed: partial results survive
        print(f"global seed {seed} done at {record['seconds']:.0f} s", flush=True)
    record["aggregate"] = aggregate(record["runs"])
    record["transformers"] = summary["transformers"]
    record["seconds"] = time.time() - started
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    print(table(record))


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean ensemble-minus-base accuracy per (test set, K) over the global seeds."""
    rows = {}
    for run in runs:
        for e in run["ensembles"]:
            rows.setdefault((e["task"], e["k"]), []).append(e["delta"])
    return [{"task": t, "k": k, "mean_delta": sum(d) / len(d), "deltas": d} for (t, k), d in rows.items()]


def table(record: dict) -> str:
    lines = ["| global seed | test set | K | base | ensemble [95% CI] | delta (pp) | members mean | seeds/s |",
             "|---|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        for e in run["ensembles"]:
            acc = e["accuracy"]
            lines.append(f"| {run['global_seed']} | {e['task']} | {e['k']} | {e['base']['mean']:.3f} | {acc['mean']:.3f} "
                         f"[{acc['lo']:.3f}, {acc['hi']:.3f}] | {100 * e['delta']:+.1f} | {e['members_mean_accuracy']:.3f} | "
                         f"{run['search']['seeds_per_second']:.3f} |")
    lines += ["", "| global seed | K=1 test set | seeds | Spearman (train reward, test acc) | base | oracle best | "
              "train-selected | mean single | merges avg / sum (parents mean) | bpb base -> K |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in record["runs"]:
        d = run["diagnostics"]
        k1, merges, bpb = d["k1"], d["merges"], d["bpb"]
        rho = "n/a" if k1["spearman"] is None else f"{k1['spearman']:+.3f} (p {k1['p']:.2f})"
        merge = (f"{merges['operators']['average']['mean']:.3f} / {merges['operators']['sum']['mean']:.3f} "
                 f"({merges['parents_mean']:.3f})") if merges else "-"
        bpb_text = (f"{bpb['base']:.4f} -> " + ", ".join(f"K={e['k']} {e['bpb']:.4f}" for e in bpb["ensembles"])) if bpb else "-"
        lines.append(f"| {run['global_seed']} | {k1['task']} | {k1['seeds']} | {rho} | {k1['base']:.3f} | {k1['oracle_best']:.3f} | "
                     f"{k1['train_selected']:.3f} | {k1['mean']:.3f} | {merge} | {bpb_text} |")
    lines += ["", "| test set | K | mean delta over global seeds (pp) |", "|---|---|---|"]
    for a in record.get("aggregate", []):
        lines.append(f"| {a['task']} | {a['k']} | {100 * a['mean_delta']:+.2f} |")
    lines.append(f"\n{record['device']}, torch {record['torch']}, {record['seconds']:.0f} s in all")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
