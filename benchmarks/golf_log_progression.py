"""GPU benchmark: the 131-run log's Phase 3 and its progression of stacked wins (baseline ->
... -> H1), each entry exactly as sweeps/golf-log-131.toml defines it, run through the sweep
machinery on the built-in data with a short wallclock cap, next to the log's own BPB and steps
(one RTX 4000 Ada, 600 s, ~2.3 s/step). Writes golf_log_progression-<device>[-<tag>].json (per
entry: val_bpb after the round trip, before it, steps, ms/step, the log's numbers), a markdown
table of both (golf_log_progression.md) and the sweep's report.md.

    PYTHONPATH=src python3 benchmarks/golf_log_progression.py --out $OUT [--only phase3 progression] [--seconds 10]
    PYTHONPATH=src python3 benchmarks/golf_log_progression.py --out /tmp/p --tiny --data PREPARED --only KEY  # CPU smoke

--only takes phase/variant keys of the sweep and the groups `progression` (the default) and
`phase3` (01-regularization/baseline and 03-architecture/U1..U10). Over several GPUs of one
machine: one process per GPU, each `--worker i/n` with CUDA_VISIBLE_DEVICES=i and the same
--out and --runs (they share the run store there and split the entries i, i+n, ...; each
writes its own JSON tagged w<i>of<n>), then `--merge` those JSONs into one JSON, table and
sweep report:

    for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python3 benchmarks/golf_log_progression.py --out $OUT --runs /tmp/glp \
        --only phase3 progression --worker $i/2 > $OUT/w$i.log 2>&1 & done; wait
    python3 benchmarks/golf_log_progression.py --out $OUT --merge $OUT/golf_log_progression-*-w*of2.json

Without --compile the entries train eagerly (each entry's graphs cost ~30-45 s of untimed
warmup on an H200, benchmarks/results/golf_quality-h200.json; 23 entries more than the
budget); steps are then eager steps. With --compile each summary holds compiled_graphs and
recompiles_in_timed_region. Every entry is scored on the whole validation split (the built-in
data: 653,589 tokens, ~2 s per entry on an H200 for both passes with the export).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from underpar import config as cfglib
from underpar.runs import report as reportlib
from underpar.runs import sweep as sweeplib
from underpar.runs.rundir import device_tag, environment

SWEEP = Path(__file__).resolve().parents[1] / "sweeps" / "golf-log-131.toml"

# The log's "Progression" section: each stacked win, its BPB and steps in the log.
PROGRESSION = {
    "01-regularization/baseline": (1.6117, 240), "02-nature-v1/N2": (1.5906, 240), "05-tidal-combos/NF8": (1.5867, 240),
    "08-stack-winners/W0e": (1.5744, 240), "11b-block-structure/A7": (1.5600, 260), "12-parallel/B4": (1.5527, 259),
    "13-parallel-retune/C10": (1.5501, 259), "14b-asymmetric/D6": (1.5377, 266), "15-split-1-8/E8": (1.5354, 265),
    "16-fine-tuning/F6": (1.5341, 266), "16-fine-tuning/F7": (1.5329, 276), "17-novel/G1": (1.5211, 266),
    "18-aggressive/H1": (1.5207, 276),
}
# The log's Phase 3 table: what each entry did there (none trained).
PHASE3 = {
    "U1": "CRASH: torch.compile", "U2": "CRASH: AttributeError", "U3": "4.1069 BROKEN: no training",
    "U4": "CRASH: torch.compile", **{f"U{i}": "Not reached" for i in range(5, 11)},
}
GROUPS = {"progression": list(PROGRESSION),
          "phase3": ["01-regularization/baseline", *(f"03-architecture/{u}" for u in PHASE3)]}
OPTIONS = ("data", "seconds", "tokens", "compile", "only", "tiny")  # what selects and configures the runs


def selection(opts: dict[str, Any], runs: Path) -> sweeplib.Sweep:
    """The sweep cut down to the chosen entries, each on the benchmark's settings; a phase
    whose stacked baseline is not among them is judged against its own first entry."""
    os.environ.update(SWEEP_RUNS=str(runs), SWEEP_DEVICE="cpu" if opts["tiny"] else "cuda", SWEEP_DATA=opts["data"],
                      SWEEP_SECONDS=str(opts["seconds"]), SWEEP_TOKENS=str(opts["tokens"]))
    plan = sweeplib.load(SWEEP)
    known = {f"{j.phase}/{j.variant}" for j in plan.jobs}
    keys = [k for name in opts["only"] for k in GROUPS.get(name, [name])]
    if unknown := [k for k in keys if k not in known]:
        raise SystemExit(f"--only: {', '.join(unknown)} is not a group ({', '.join(GROUPS)}) or an entry of {SWEEP.name}")
    extra = [f"train.compile={str(opts['compile']).lower()}", "train.val_every_steps=0"]
    if not opts["compile"]:
        extra.append("train.warmup_steps=0")  # the untimed warmup exists to compile; eager runs skip it
    if opts["tiny"]:  # any prepared folder (e.g. a small text corpus): its own data settings and vocabulary
        prepared = json.loads((Path(opts["data"]) / "manifest.json").read_text())["config"]
        extra += [f"data.{k}={prepared[k]}" for k in ("source", "path", "vocab_size", "val_docs")]
        extra.append(f"model.vocab_size={prepared['vocab_size']}")
    jobs = []
    for job in plan.jobs:
        if f"{job.phase}/{job.variant}" not in keys:
            continue
        sets = [*plan.sets, *job.sets, *extra, f"name={job.config.name}"]
        if opts["tiny"]:
            sets += [f"model.model_dim={job.config.model.model_dim // 4}", "train.seq_len=64", "train.tokens_per_step=1024",
                     "train.micro_batch_tokens=1024", "train.max_steps=3", "train.max_wallclock_seconds=0", "train.warmup_steps=0",
                     "train.val_max_tokens=4096"]
        jobs.append(dataclasses.replace(job, config=cfglib.resolve(plan.track, plan.preset, sets)))
    ran = {(j.phase, j.variant) for j in jobs}
    phases = [p if p.baseline_key in ran else dataclasses.replace(p, baseline=next(j.variant for j in jobs if j.phase == p.name),
                                                                  baseline_phase="")
              for p in plan.phases if any(j.phase == p.name for j in jobs)]
    return dataclasses.replace(plan, jobs=jobs, phases=phases)


def rows_of(plan: sweeplib.Sweep, jobs: list[sweeplib.Job]) -> list[dict[str, Any]]:
    results, rows = sweeplib.results(plan), []
    for job in jobs:
        result = results[job.key]
        metrics = (result["run"] or {}).get("metrics", {})
        log_bpb, log_steps = PROGRESSION.get(f"{job.phase}/{job.variant}", (None, None))
        rows.append({"entry": f"{job.phase}/{job.variant}", "description": job.description, "status": result["status"],
                     "error": result["error"], "val_bpb": metrics.get("val_bpb"), "val_bpb_pre_quant": metrics.get("val_bpb_pre_quant"),
                     "steps": metrics.get("steps"), "median_ms_per_step": metrics.get("median_ms_per_step"),
                     "training_seconds": metrics.get("training_seconds"), "compiled_graphs": metrics.get("compiled_graphs"),
                     "recompiles_in_timed_region": metrics.get("recompiles_in_timed_region"), "log_val_bpb": log_bpb,
                     "log_steps": log_steps, "log_status": PHASE3.get(job.variant) if job.phase == "03-architecture" else None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Phase 3 and the progression, ours beside the log's (deltas against each one's baseline)."""
    def num(v: Any, fmt: str = ".4f") -> str:
        return "-" if v is None else format(v, fmt)

    by = {r["entry"]: r for r in rows}
    base = by.get("01-regularization/baseline", {}).get("val_bpb")
    lines = ["## Phase 3: Unconventional Architecture", "",
             "| # | entry | description | val_bpb | delta | steps | ms/step | recompiles | the log |", "|---|---|---|---|---|---|---|---|---|"]
    for key in GROUPS["phase3"]:
        if r := by.get(key):
            delta = num(r["val_bpb"] - base, "+.4f") if None not in (r["val_bpb"], base) else "-"
            lines.append(f"| {key.split('/')[1]} | {key} | {r['description']} | {num(r['val_bpb'])} | {delta} | {num(r['steps'], 'd')} | "
                         f"{num(r['median_ms_per_step'], '.0f')} | {num(r['recompiles_in_timed_region'], 'd') if r['compiled_graphs'] else 'eager'} | "
                         f"{r['log_status'] or '%s (%s steps)' % (r['log_val_bpb'], r['log_steps'])} |")
    lines += ["", "## Progression of stacked wins", "",
              "| entry | val_bpb | delta | steps | ms/step | the log's BPB | the log's delta | the log's steps |",
              "|---|---|---|---|---|---|---|---|"]
    log_base = PROGRESSION["01-regularization/baseline"][0]
    for key, (log_bpb, log_steps) in PROGRESSION.items():
        if r := by.get(key):
            delta = num(r["val_bpb"] - base, "+.4f") if None not in (r["val_bpb"], base) else "-"
            lines.append(f"| {key} | {num(r['val_bpb'])} | {delta} | {num(r['steps'], 'd')} | {num(r['median_ms_per_step'], '.0f')} | "
                         f"{log_bpb:.4f} | {log_bpb - log_base:+.4f} | {log_steps} |")
    others = [r for r in rows if r["entry"] not in GROUPS["phase3"] + GROUPS["progression"]]
    if others:
        lines += ["", "## Other entries", "", "| entry | description | val_bpb | delta | steps | ms/step |", "|---|---|---|---|---|---|"]
        for r in others:
            delta = num(r["val_bpb"] - base, "+.4f") if None not in (r["val_bpb"], base) else "-"
            lines.append(f"| {r['entry']} | {r['description']} | {num(r['val_bpb'])} | {delta} | {num(r['steps'], 'd')} | "
                         f"{num(r['median_ms_per_step'], '.0f')} |")
    failed = [f"- {r['entry']}: {r['status']}: {r['error']}" for r in rows if r["status"] != "done"]
    return "\n".join(lines + (["", "Not done:", *failed] if failed else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=".data/builtin_sp1024", help="a prepared built-in folder")
    parser.add_argument("--seconds", type=float, default=10.0, help="wallclock cap per entry (the log: 600)")
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per step (REFERENCE: 131,072 keeps the small corpus to a few passes)")
    parser.add_argument("--compile", action="store_true", help="compile each entry (untimed warmup, ~30-45 s each)")
    parser.add_argument("--only", nargs="*", default=["progression"], help="phase/variant keys or groups: progression, phase3")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: a quarter width, 3 steps")
    parser.add_argument("--worker", default="0/1", help="i/n: this process runs entries i, i+n, ... (one process per GPU)")
    parser.add_argument("--tag", default=None, help="suffix of the JSON's name (default: w<i>of<n> with --worker)")
    parser.add_argument("--runs", default=None, help="runs root and store shared by the workers (default: OUT/runs; "
                        "a folder outside OUT keeps the run directories, ~12 MB each, out of what comes back)")
    parser.add_argument("--merge", nargs="+", default=None, help="JSONs of the workers: one JSON, table and report")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        if len({json.dumps(p["options"], sort_keys=True) for p in parts}) != 1:
            raise SystemExit("--merge: the JSONs were run with different options: " + "; ".join(str(p["options"]) for p in parts))
        opts, tag, runs = parts[0]["options"], None, Path(args.runs or parts[0]["runs"])
        plan = selection(opts, runs)  # the shared store holds every worker's runs
        order = [f"{j.phase}/{j.variant}" for j in plan.jobs]
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order.index(r["entry"]))
        tally = {k: sum(p["tally"].get(k, 0) for p in parts) for k in parts[0]["tally"]}
        extra = {"merged": [str(p) for p in args.merge], "worker_wall_seconds": [p["wall_seconds"] for p in parts]}
    else:
        opts = {k: getattr(args, k) for k in OPTIONS}
        worker = sweeplib.parse_worker(args.worker)
        tag = args.tag or (f"w{worker[0]}of{worker[1]}" if worker[1] > 1 else None)
        runs = Path(args.runs or out / "runs")
        plan = selection(opts, runs)
        tally = sweeplib.run_sweep(plan, worker=worker, say=lambda line: print(line, flush=True))
        mine = [job for i, job in enumerate(plan.jobs) if i % worker[1] == worker[0]]
        rows = rows_of(plan, mine)
        extra = {"worker": args.worker}
        for row in rows:
            print(json.dumps(row), flush=True)
    if not tag:  # the whole selection: one table and the sweep's report
        (out / "golf_log_progression.md").write_text(table(rows))
        extra["report"] = str(reportlib.write(plan, out / "report"))
        print(table(rows), flush=True)
    record = {"benchmark": "golf_log_progression", "sweep": SWEEP.name, "options": opts, "runs": str(runs.resolve()), "tally": tally,
              "wall_seconds": time.perf_counter() - started, **extra, "rows": rows, **environment()}
    name = f"golf_log_progression-{device_tag()}" + (f"-{tag}" if tag else "")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
