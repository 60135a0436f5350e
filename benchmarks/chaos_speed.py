"""Deep Chaos speed and memory: random-init Qwen2.5-3B shape, bf16, sequence length 2048 at
batch 1, the same batches for every method, each method in its own process.

Reports ms/step averaged over whole sticky blocks (after the first, which includes warm-up),
peak memory over a short run, and steady-state peak memory (AdamW state created for every
parameter first, as after every layer has trained once).

    PYTHONPATH=src python3 benchmarks/chaos_speed.py --out $OUT [--arch qwen2.5-3b] [--blocks 3] [--only ...]

"chaos-slice*" variants hoist and run the kept heads / channel groups / output groups as
smaller matmuls (model/sliced.py, eager): gathered from the full weights every step, or, in
"chaos-slice-pack*", packed once per block into parameters that train (method.slice_form=pack). Held-out loss measuring is off (eval.heldout_examples=0):
this is a speed run on random tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from underpar.runs.rundir import device_tag, environment

RUNS = Path(tempfile.mkdtemp(prefix="chaos-speed-"))  # run directories; only the JSON goes to --out
VARIANTS = {
    "full": ["method=full"],
    "lisa": ["method=lisa"],
    "chaos-mask": ["method=chaos", "method.strategy=mask"],
    "chaos-hoist": ["method=chaos", "method.strategy=hoist"],
    "chaos-hoist-identity": ["method=chaos", "method.strategy=hoist", "method.hoist_identity=true"],
    "chaos-hoist-identity-offload": ["method=chaos", "method.strategy=hoist", "method.hoist_identity=true",
                                     "method.optimizer_state=offload"],
    "chaos-hoist-identity-reset": ["method=chaos", "method.strategy=hoist", "method.hoist_identity=true",
                                   "method.optimizer_state=reset"],
    "chaos-slice": ["method=chaos", "method.strategy=slice"],
    "chaos-slice-identity": ["method=chaos", "method.strategy=slice", "method.hoist_identity=true"],
    "chaos-slice-identity-offload": ["method=chaos", "method.strategy=slice", "method.hoist_identity=true",
                                     "method.optimizer_state=offload"],
    "chaos-slice-identity-reset": ["method=chaos", "method.strategy=slice", "method.hoist_identity=true",
                                   "method.optimizer_state=reset"],
    # kept rows / cols packed once per block into parameters that train (no per-step gather / scatter)
    "chaos-slice-pack-identity": ["method=chaos", "method.strategy=slice", "method.slice_form=pack",
                                  "method.hoist_identity=true"],
    "chaos-slice-pack-identity-reset": ["method=chaos", "method.strategy=slice", "method.slice_form=pack",
                                        "method.hoist_identity=true", "method.optimizer_state=reset"],
}


def one_run(name: str, sets: list[str], out: Path) -> dict:
    """Run the finetune track in a fresh process; returns its summary and per-step metrics."""
    args = [sys.executable, "-m", "underpar", "finetune", "--preset", "chaos-qwen2.5-3b"]
    for s in sets + [f"train.runs_root={RUNS / name}", "eval.heldout_examples=0"]:
        args += ["--set", s]
    result = subprocess.run(args, capture_output=True, text=True, env=os.environ)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    (run_dir,) = [p for p in (RUNS / name).iterdir() if (p / "summary.json").is_file()]  # the run store sits beside
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "ms": [r["ms"] for r in rows if "ms" in r]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--arch", default="qwen2.5-3b")
    parser.add_argument("--blocks", type=int, default=4, help="sticky blocks of 50 steps; the first is warm-up")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tag", default="", help="prefix of the result file name, e.g. 'offload-'")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--interval", type=int, default=50, help="sticky_interval (LISA's interval too)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    interval = args.interval
    steps = args.blocks * interval
    results = {}
    for name in args.only:
        block = {"full": [], "lisa": [f"method.interval={interval}"]}.get(name, [f"method.sticky_interval={interval}"])
        base = VARIANTS[name] + block + [f"model.architecture={args.arch}", f"train.steps={steps}",
                                         f"data.max_length={args.seq_len}"]
        short = one_run(name, base, out)
        steady = one_run(name + "-steady", base + ["train.steps=3", "train.preallocate_optimizer_state=true"], out)
        if "error" in short or "error" in steady:
            results[name] = {"error": short.get("error") or steady.get("error")}
            print(name, "FAILED", results[name]["error"][-500:], flush=True)
            continue
        blocks = [statistics.mean(short["ms"][b * interval : (b + 1) * interval]) for b in range(args.blocks)]
        results[name] = {
            "ms_per_step_by_block": blocks,
            "ms_per_step": statistics.mean(blocks[1:]),
            "peak_memory_bytes": short["summary"]["peak_memory_bytes"],
            "steady_peak_memory_bytes": steady["summary"]["peak_memory_bytes"],
            "final_loss": short["summary"]["final_loss"],
            "device": short["summary"]["device"],
            "torch": short["summary"]["torch"],
        }
        print(name, json.dumps(results[name]), flush=True)
        write(out, args, interval, results)  # after every variant: a cut-off run keeps what it measured
    print(table(write(out, args, interval, results)))


def write(out: Path, args, interval: int, results: dict) -> dict:
    base = results.get("full", {})
    for r in results.values():
        if "ms_per_step" in r and "ms_per_step" in base:
            r["speedup_vs_full"] = base["ms_per_step"] / r["ms_per_step"]
            if base["peak_memory_bytes"]:  # CUDA only
                r["peak_memory_vs_full"] = r["peak_memory_bytes"] / base["peak_memory_bytes"]
                r["steady_memory_vs_full"] = r["steady_peak_memory_bytes"] / base["steady_peak_memory_bytes"]
    record = {"benchmark": "chaos_speed", "arch": args.arch, "seq_len": args.seq_len, "batch": 1,
              "sticky_interval": interval, "blocks": args.blocks, **environment(), "results": results}
    (out / f"chaos_speed-{args.tag}{device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def table(record: dict) -> str:
    lines = ["| method | ms/step | speedup vs full | peak GiB (short run) | vs full | steady-state peak GiB | vs full |",
             "|---|---|---|---|---|---|---|"]
    for name, r in record["results"].items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['ms_per_step']:.1f} | {r.get('speedup_vs_full', 1):.2f}x | {gib(r['peak_memory_bytes'])} | "
            f"{r.get('peak_memory_vs_full', 1):.2f}x | {gib(r['steady_peak_memory_bytes'])} | {r.get('steady_memory_vs_full', 1):.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
