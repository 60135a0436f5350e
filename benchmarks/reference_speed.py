"""GPU benchmark: ms/step of the reference `train_gpt.py` (openai/parameter-golf, run unchanged)
against `underpar pretrain --preset golf-baseline` and its speed switches, at the full 524,288-token
batch on the built-in shards, in one call (issue 12's speed target: 1.25x).

Both sides log their training clock per step; the statistic is the same for both: (train time at
the last step - train time at step 10) / (steps - 10), so compile and the first steps are left
out. Each underpar variant is its own `python -m underpar pretrain` process (its own compile, its
own inductor settings: some switches are environment variables). The variants:

    reference        the reference script, 8 micro-steps of 65,536 tokens (its own split on 1 GPU)
    golf_baseline    golf-baseline as it is: the reference's 8 micro-steps
    micro            the same global batch in one micro-step (--micro tokens): the same mean
                     gradient up to summation order, so the same learning curve up to rounding
    <switch>         micro + one switch (SWITCHES below: SDPA kernel, fused QKV, inductor tuning)
    best             micro + every switch measured in this call that beat micro by more than 1%
                     (per group the fastest: one SDPA kernel); skipped when fewer than two did

    PYTHONPATH=src python3 benchmarks/reference_speed.py --reference .ref/train_gpt.py \\
        --data .data/builtin_sp1024 --out $OUT [--variants reference golf_baseline micro cudnn ...]

CPU dry run of the underpar side (no reference, no compile; a micro model on a small prepared text
corpus, since the final evaluation of the built-in validation split alone takes minutes on a CPU):

    underpar data prepare --source text --path CORPUS --vocab 512 --out /tmp/rs_data
    PYTHONPATH=src python3 benchmarks/reference_speed.py --data /tmp/rs_data --out /tmp/rs --preset tiny-cpu \\
        --micro 512 --steps 12 --variants golf_baseline micro fused_qkv cudnn best --set data.source=text \\
        --set data.path=CORPUS --set data.vocab_size=512 --set model.vocab_size=512 --set model.model_dim=64 \\
        --set model.num_layers=2 --set train.seq_len=128 --set train.tokens_per_step=1024 \\
        --set train.micro_batch_tokens=256 --set train.warmup_steps=1
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

from underpar.runs.rundir import device_tag, environment

# name -> (group, --set assignments, environment); each measured on top of `micro`. One switch
# per group joins `best` (the SDPA kernels exclude each other).
SWITCHES: dict[str, tuple[str, list[str], dict[str, str]]] = {
    "cudnn": ("sdpa", ["model.attention.sdpa_backend=cudnn"], {}),
    "cudnn_expand_kv": ("sdpa", ["model.attention.sdpa_backend=cudnn", "model.attention.expand_kv=true"], {}),
    "efficient_expand_kv": ("sdpa", ["model.attention.sdpa_backend=efficient", "model.attention.expand_kv=true"], {}),
    "flash_expand_kv": ("sdpa", ["model.attention.sdpa_backend=flash", "model.attention.expand_kv=true"], {}),
    "fused_qkv": ("qkv", ["model.attention.fused_qkv=true"], {}),
    "fused_ce_muon": ("fused", ["model.embeddings.fused_ce=true", "optim.muon_fused=true"], {}),
    "coordinate_descent": ("inductor", [], {"TORCHINDUCTOR_COORDINATE_DESCENT_TUNING": "1"}),
    "max_autotune": ("inductor", [], {"TORCHINDUCTOR_MAX_AUTOTUNE": "1"}),  # slow to compile (minutes)
}
NAMES = ["reference", "golf_baseline", "micro", *SWITCHES, "best"]
DEFAULT = ["reference", "golf_baseline", "micro", "cudnn", "fused_qkv", "best"]
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
        return {"variant": "reference", "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    return {"variant": "reference", "ms_per_step": window_ms(times), "wall_seconds": time.perf_counter() - started,
            "steps": args.steps}


def run_underpar(name: str, sets: list[str], env_extra: dict[str, str], args: argparse.Namespace, out: Path) -> dict:
    """One `underpar pretrain` process; its ms/step from the run's metrics.jsonl."""
    root = Path(args.runs) / name
    common = [f"data.out={args.data}", f"train.max_steps={args.steps}", "train.max_wallclock_seconds=0",
              "train.val_every_steps=0", f"train.runs_root={root}", f"name={name.replace('_', '-')}"]
    cmd = [sys.executable, "-m", "underpar", "pretrain", "--preset", args.preset]
    for assignment in common + args.set + sets:
        cmd += ["--set", assignment]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env_extra}, capture_output=True, text=True)
    (out / f"reference_speed.{name}.log").write_text(proc.stdout[-100_000:] + proc.stderr[-100_000:])
    row = {"variant": name, "sets": sets, "env": env_extra, "wall_seconds": round(time.perf_counter() - started, 1)}
    runs = sorted(root.glob("*/summary.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if proc.returncode != 0 or not runs:
        return {**row, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
    summary = json.loads(runs[-1].read_text())
    rows = [json.loads(line) for line in (runs[-1].parent / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "train_loss" in r]
    times = {r["step"]: 1000 * r["elapsed"] for r in train_rows}
    return {**row, "ms_per_step": window_ms(times), "median_ms_per_step": summary.get("median_ms_per_step"),
            "steps": summary.get("steps"), "compile_seconds": summary.get("compile_seconds"),
            "recompiles_in_timed_region": summary.get("recompiles_in_timed_region"),
            "first_losses": [r["train_loss"] for r in train_rows][:4], "last_loss": train_rows[-1]["train_loss"],
            "val_bpb": summary.get("val_bpb")}


def best_switches(rows: list[dict], threshold: float = 0.01) -> list[str]:
    """The switches measured on top of `micro` that beat it by more than `threshold`, the
    fastest of each group."""
    micro = next((r["ms_per_step"] for r in rows if r["variant"] == "micro" and "ms_per_step" in r), None)
    if micro is None:
        return []
    fastest: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["variant"] in SWITCHES and r.get("ms_per_step", micro) < (1 - threshold) * micro:
            group = SWITCHES[r["variant"]][0]
            fastest[group] = min(fastest.get(group, (float("inf"), "")), (r["ms_per_step"], r["variant"]))
    return [name for _, name in fastest.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", help="the reference train_gpt.py (needed for the 'reference' variant)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/reference_speed_runs")
    ap.add_argument("--preset", default="golf-baseline")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--micro", type=int, default=524_288, help="micro-batch tokens of 'micro' and what builds on it")
    ap.add_argument("--set", action="append", default=[], help="a --set for every underpar run (e.g. a CPU dry run)")
    ap.add_argument("--variants", nargs="*", default=DEFAULT, choices=NAMES, help="in this order; default: %(default)s")
    args = ap.parse_args()
    if "reference" in args.variants and not args.reference:
        ap.error("the 'reference' variant needs --reference")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "reference_speed", "preset": args.preset, "steps": args.steps, "micro": args.micro,
              "extra_sets": args.set, "rows": [], **environment()}
    path = out / f"reference_speed-{device_tag()}.json"
    micro = [f"train.micro_batch_tokens={args.micro}"]
    for name in args.variants:
        if name == "reference":
            row = run_reference(args, out)
        elif name == "golf_baseline":
            row = run_underpar(name, [], {}, args, out)
        elif name == "micro":
            row = run_underpar(name, micro, {}, args, out)
        elif name in SWITCHES:
            _, sets, env = SWITCHES[name]
            row = run_underpar(name, micro + sets, env, args, out)
        else:  # best
            chosen = best_switches(record["rows"])
            if len(chosen) < 2:
                row = {"variant": "best", "skipped": f"fewer than two switches beat micro by 1%: {chosen}"}
            else:
                sets = micro + [s for c in chosen for s in SWITCHES[c][1]]
                env = {k: v for c in chosen for k, v in SWITCHES[c][2].items()}
                row = {**run_underpar(name, sets, env, args, out), "switches": chosen}
        record["rows"].append(row)
        ref = next((r["ms_per_step"] for r in record["rows"] if r["variant"] == "reference" and "ms_per_step" in r), None)
        for r in record["rows"]:
            if ref and "ms_per_step" in r:
                r["speedup_vs_reference"] = round(ref / r["ms_per_step"], 4)
        print(json.dumps({k: v for k, v in row.items() if k != "stderr"}), flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
