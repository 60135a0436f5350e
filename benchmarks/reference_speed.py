"""GPU benchmark: ms/step of the reference `train_gpt.py` (openai/parameter-golf, run unchanged)
against `underpar pretrain --preset golf-baseline`, with and without underpar's speed switches,
at the full 524,288-token batch on the built-in shards, in one call (issue 12's speed target).

Both sides log their training clock per step (the reference every step up to 10, then every
`--log-every`); the statistic is the same for both: (train time at the last step - train time
at step 10) / (steps - 10), so compile and the first steps are left out.

    PYTHONPATH=src python3 benchmarks/reference_speed.py --reference .ref/train_gpt.py \
        --data .data/builtin_sp1024 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from underpar import config as cfglib
from underpar.runs.rundir import RunDir, device_tag, environment
from underpar.tracks import pretrain as track

UNDERPAR = {
    "underpar_golf_baseline": [],
    "underpar_speed_switches": ["model.embeddings.fused_ce=true", "optim.muon_fused=true"],
    # the same global batch in fewer, larger micro-steps (same gradient up to summation order)
    "underpar_micro_131072": ["train.micro_batch_tokens=131072"],
    "underpar_micro_262144": ["train.micro_batch_tokens=262144"],
    "underpar_micro_262144_speed_switches": ["train.micro_batch_tokens=262144", "model.embeddings.fused_ce=true",
                                             "optim.muon_fused=true"],
}
STEP_LINE = re.compile(r"step:(\d+)/\d+ .*train_time:(\d+)ms")


def window_ms(times: dict[int, float], first: int = 10) -> float:
    """Mean ms per step from step `first` to the last step logged."""
    last = max(times)
    return (times[last] - times[first]) / (last - first)


def run_reference(args: argparse.Namespace, out: Path) -> dict:
    data = Path("/tmp/reference_data")
    data.mkdir(exist_ok=True)
    source = Path(args.data).resolve()
    for split in ("train", "val"):  # the reference reads fineweb_{split}_*.bin: the same shard format
        for shard in sorted(source.glob(f"{split}_*.bin")):
            link = data / f"fineweb_{shard.name}"
            if not link.exists():
                link.symlink_to(shard)
    env = {**os.environ, "DATA_PATH": str(data), "TOKENIZER_PATH": str(source / "tokenizer.model"),
           "ITERATIONS": str(args.steps), "WARMDOWN_ITERS": "0", "VAL_LOSS_EVERY": "0",
           "TRAIN_LOG_EVERY": str(args.log_every), "MAX_WALLCLOCK_SECONDS": "0", "RUN_ID": "reference_speed"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(args.reference).resolve())], env=env, cwd="/tmp",
                          capture_output=True, text=True)
    (out / "reference_speed.reference.log").write_text(proc.stdout[-200_000:] + proc.stderr[-50_000:])
    times = {int(m[1]): float(m[2]) for m in STEP_LINE.finditer(proc.stdout)}
    if proc.returncode != 0 or args.steps not in times:
        return {"variant": "reference_train_gpt", "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    return {"variant": "reference_train_gpt", "ms_per_step": window_ms(times), "wall_seconds": time.perf_counter() - started,
            "steps": args.steps}


def run_underpar(name: str, sets: list[str], args: argparse.Namespace) -> dict:
    import torch

    torch._dynamo.reset()
    common = [f"data.out={args.data}", f"train.max_steps={args.steps}", "train.max_wallclock_seconds=0",
              "train.val_every_steps=0", f"train.runs_root={args.runs}", f"name={name.replace('_', '-')}"]
    started = time.perf_counter()
    summary = track.run(cfglib.resolve("pretrain", "golf-baseline", common + sets))
    rows = RunDir(summary.run_dir).metrics()
    times = {r["step"]: 1000 * r["elapsed"] for r in rows if "train_loss" in r}
    return {"variant": name, "sets": sets, "ms_per_step": window_ms(times), "median_ms_per_step": summary.median_ms_per_step,
            "wall_seconds": time.perf_counter() - started, "steps": summary.steps,
            "first_losses": [r["train_loss"] for r in rows if "train_loss" in r][:4]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="the reference train_gpt.py")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/reference_speed_runs")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=list(UNDERPAR), help="underpar variants to run after the reference")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "reference_speed", "tokens_per_step": 524_288, "steps": args.steps, "rows": [], **environment()}
    path = out / f"reference_speed-{device_tag()}.json"
    record["rows"].append(run_reference(args, out))
    path.write_text(json.dumps(record, indent=2) + "\n")
    for name in args.only:
        record["rows"].append(run_underpar(name, UNDERPAR[name], args))
        path.write_text(json.dumps(record, indent=2) + "\n")
    ref = record["rows"][0].get("ms_per_step")
    for row in record["rows"]:
        if ref and "ms_per_step" in row:
            row["speedup_vs_reference"] = ref / row["ms_per_step"]
        print(json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
