"""GPU benchmark: the 131-run log's progression of stacked wins (baseline -> ... -> H1), each
entry exactly as sweeps/golf-log-131.toml defines it, run through the sweep machinery on the
built-in data with a short wallclock cap, next to the log's own BPB and steps (one RTX 4000
Ada, 600 s, ~2.3 s/step). Writes golf_log_progression-<device>.json (per entry: val_bpb after
the round trip, before it, steps, ms/step, the log's numbers) and the sweep's report.md.

    PYTHONPATH=src python3 benchmarks/golf_log_progression.py --out $OUT [--seconds 10] [--compile]
    PYTHONPATH=src python3 benchmarks/golf_log_progression.py --out /tmp/p --tiny --data PREPARED --only KEY  # CPU smoke

--only takes any phase/variant of the sweep, e.g. Phase 3's structure experiments:
    --only 01-regularization/baseline 03-architecture/U1 ... 03-architecture/U6 --compile
(with --compile each run's summary holds compiled_graphs and recompiles_in_timed_region).
Without --compile the entries train eagerly (each compiled graph costs ~1 min of untimed
warmup on an H200, 13 of them more than the budget); steps are then eager steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=".data/builtin_sp1024", help="a prepared built-in folder")
    parser.add_argument("--seconds", type=float, default=10.0, help="wallclock cap per entry (the log: 600)")
    parser.add_argument("--tokens", type=int, default=131072, help="tokens per step (REFERENCE: 131,072 keeps the small corpus to a few passes)")
    parser.add_argument("--compile", action="store_true", help="compile each entry (untimed warmup, ~1 min each)")
    parser.add_argument("--only", nargs="*", default=None, help="phase/variant keys of PROGRESSION")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: a quarter width, 3 steps")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(SWEEP_RUNS=str(out / "runs"), SWEEP_DEVICE="cpu" if args.tiny else "cuda", SWEEP_DATA=args.data,
                      SWEEP_SECONDS=str(args.seconds), SWEEP_TOKENS=str(args.tokens))
    plan = sweeplib.load(SWEEP)
    keys = args.only or list(PROGRESSION)
    extra = [f"train.compile={str(args.compile).lower()}", "train.val_every_steps=0"]
    if not args.compile:
        extra.append("train.warmup_steps=0")  # the untimed warmup exists to compile; eager runs skip it
    if args.tiny:  # any prepared folder (e.g. a small text corpus): its own data settings and vocabulary
        prepared = json.loads((Path(args.data) / "manifest.json").read_text())["config"]
        extra += [f"data.{k}={prepared[k]}" for k in ("source", "path", "vocab_size", "val_docs")]
        extra.append(f"model.vocab_size={prepared['vocab_size']}")
    jobs = []
    for job in plan.jobs:
        key = f"{job.phase}/{job.variant}"
        if key not in keys:
            continue
        sets = [*plan.sets, *job.sets, *extra, f"name={job.config.name}"]
        if args.tiny:
            sets += [f"model.model_dim={job.config.model.model_dim // 4}", "train.seq_len=64", "train.tokens_per_step=1024",
                     "train.micro_batch_tokens=1024", "train.max_steps=3", "train.warmup_steps=0", "train.val_max_tokens=4096"]
        jobs.append(dataclasses.replace(job, config=cfglib.resolve(plan.track, plan.preset, sets)))
    phases = [p for p in plan.phases if any(j.phase == p.name for j in jobs)]
    # a phase whose stacked baseline is not among these runs is judged against its own first entry
    ran = {(j.phase, j.variant) for j in jobs}
    phases = [p if p.baseline_key in ran else dataclasses.replace(p, baseline=next(j.variant for j in jobs if j.phase == p.name),
                                                                  baseline_phase="") for p in phases]
    small = dataclasses.replace(plan, jobs=jobs, phases=phases)
    started = time.perf_counter()
    tally = sweeplib.run_sweep(small, say=lambda line: print(line, flush=True))
    report = reportlib.write(small, out / "report")
    rows = []
    for job in jobs:
        result = sweeplib.results(small)[job.key]
        metrics = (result["run"] or {}).get("metrics", {})
        log_bpb, log_steps = PROGRESSION.get(f"{job.phase}/{job.variant}", (None, None))
        rows.append({"entry": f"{job.phase}/{job.variant}", "description": job.description, "status": result["status"],
                     "error": result["error"], "val_bpb": metrics.get("val_bpb"), "val_bpb_pre_quant": metrics.get("val_bpb_pre_quant"),
                     "steps": metrics.get("steps"), "median_ms_per_step": metrics.get("median_ms_per_step"),
                     "training_seconds": metrics.get("training_seconds"), "compiled_graphs": metrics.get("compiled_graphs"),
                     "recompiles_in_timed_region": metrics.get("recompiles_in_timed_region"), "log_val_bpb": log_bpb,
                     "log_steps": log_steps})
        print(json.dumps(rows[-1]), flush=True)
    record = {"benchmark": "golf_log_progression", "sweep": str(SWEEP.name), "seconds": args.seconds, "tokens_per_step": args.tokens,
              "compile": args.compile, "tiny": args.tiny, "tally": tally, "wall_seconds": time.perf_counter() - started,
              "report": str(report), "rows": rows, **environment()}
    (out / f"golf_log_progression-{device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
