"""GPU check of `underpar record`'s generated train_gpt.py (issue 16): the same short golf-baseline
run twice, once through the package (in this process) and once as the generated single file
under torchrun with the package NOT importable (PYTHONPATH cleared), then the step-by-step
train losses, the round-trip val_bpb, and the script's bytes (lzma wrapper, the code bytes its
artifact counts) against the reference train_gpt.py's 47,642.

    PYTHONPATH=src python3 benchmarks/record_script.py --out $OUT            # H200, ~2-3 min
    PYTHONPATH=src python3 benchmarks/record_script.py --out /tmp/x --preset tiny-cpu --steps 2 \\
        --set data.source=text --set data.path=CORPUS ...                     # a CPU check

Raw results to --out/record_script-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from underpar import config as cfglib
from underpar.runs import script
from underpar.runs.rundir import RunDir, device_tag, environment
from underpar.tracks import pretrain

REFERENCE_SCRIPT_BYTES = 47_642  # openai/parameter-golf train_gpt.py (the baseline)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="golf-baseline")
    ap.add_argument("--data", default=".data/builtin_sp1024")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    sets = [f"data.out={Path(args.data).absolute()}", "train.max_wallclock_seconds=0", f"train.max_steps={args.steps}",
            f"train.runs_root={out / 'package-runs'}", *args.sets]
    cfg = cfglib.resolve("pretrain", args.preset, sets)

    started = time.perf_counter()
    package = pretrain.run(cfg)
    package_seconds = time.perf_counter() - started

    shipped = script.write(out / "train_gpt.py", cfglib.to_dict(cfg), args.preset, environment()["git_commit"])
    raw = script.write(out / "train_gpt_source.py", cfglib.to_dict(cfg), args.preset, None, wrapper=None)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle alone must do
    env["RUNS_ROOT"] = str(out / "script-runs")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                             str(out / "train_gpt.py")], cwd=out, env=env, capture_output=True, text=True, timeout=1200)
    script_seconds = time.perf_counter() - started
    (out / "script_stdout.txt").write_text(result.stdout[-20000:] + "\n--- stderr ---\n" + result.stderr[-20000:])

    record = {"benchmark": "record_script", **environment(), "preset": args.preset, "steps": args.steps,
              "nproc": args.nproc, "script_bytes": shipped["bytes"], "script_source_bytes": raw["bytes"],
              "modules": shipped["modules"], "reference_script_bytes": REFERENCE_SCRIPT_BYTES,
              "package": {"val_bpb": package.val_bpb, "val_loss": package.val_loss, "steps": package.steps,
                          "seconds": round(package_seconds, 1), "code_bytes_counted": package.artifact_bytes["code"]},
              "script_returncode": result.returncode, "script_seconds": round(script_seconds, 1)}
    runs = [p for p in (out / "script-runs").iterdir() if p.is_dir()] if (out / "script-runs").is_dir() else []
    if result.returncode == 0 and len(runs) == 1:
        summary = json.loads((runs[0] / "summary.json").read_text())
        ours = {r["step"]: r["train_loss"] for r in RunDir(package.run_dir).metrics() if r.get("train_loss") is not None}
        theirs = {r["step"]: r["train_loss"] for r in RunDir(runs[0]).metrics() if r.get("train_loss") is not None}
        common = sorted(set(ours) & set(theirs))
        record["script"] = {"val_bpb": summary["val_bpb"], "val_loss": summary["val_loss"], "steps": summary["steps"],
                            "code_bytes_counted": summary["artifact_bytes"]["code"],
                            "artifact_total": summary["artifact_bytes"]["total"]}
        record["train_loss_max_abs_diff"] = max((abs(ours[s] - theirs[s]) for s in common), default=None)
        record["train_loss_identical_steps"] = sum(ours[s] == theirs[s] for s in common)
        record["compared_steps"] = len(common)
        record["val_bpb_abs_diff"] = abs(summary["val_bpb"] - package.val_bpb)
    else:
        record["script_error"] = result.stderr[-3000:]
    path = out / f"record_script-{device_tag()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "script_error"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
