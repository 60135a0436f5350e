"""Multi-GPU scaling: the same work on 1, 2, 4 and 8 processes, one GPU each, through NCCL.

  pretrain  golf-baseline at its global batch (524,288 tokens/step) for a fixed number of steps
            on each world size: median ms/step, tokens/s, speedup and scaling efficiency
            tokens/s(n) / (n x tokens/s(1)); the round-trip val_bpb should agree across world
            sizes (same global batch, same data).
  share     one GPU, one process, training each world size's per-rank share of that batch
            (524,288 / n tokens/step): the compute floor of an n-GPU step with no communication
            and all of Muon's orthogonalization, so 1 / (n x share time) bounds the efficiency
            that communication-free data parallelism could reach.
  randopt   seeds/s of the same RandOpt population on each world size (seed-parallel ranks),
            how many candidates' train rewards equal the one-GPU run's, and from the one-GPU
            run's per-candidate seconds the bound that per-round gathering puts on 2, 4, 8.

Every run is the underpar CLI under torchrun, with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1). The JSON records the NCCL version,
every NCCL_* variable, and `nvidia-smi topo -m`. A world size that fails is recorded with its
log tail and the next one still runs.

    PYTHONPATH=src python3 benchmarks/scaling.py pretrain --data .data/builtin_sp1024 --out $OUT [--gpus 1 2 4 8] [--steps 60]
    PYTHONPATH=src python3 benchmarks/scaling.py share --data .data/builtin_sp1024 --out $OUT
    PYTHONPATH=src python3 benchmarks/scaling.py randopt --out $OUT [--population 128]

On a CPU (gloo; a dry run of the whole path): --device cpu --preset tiny-cpu --set train.micro_batch_tokens=2048
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.runs.rundir import device_tag, environment

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
PRESETS = {"pretrain": "golf-baseline", "share": "golf-baseline", "randopt": "randopt-smollm2"}


def launch(nproc: int, track: str, preset: str, sets: list[str], runs_root: Path, log: Path) -> dict:
    """Run `underpar <track>` on nproc ranks; its summary.json, or {"error": log tail}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "underpar", track, "--preset", preset]
    for s in sets + [f"{'' if track == 'randopt' else 'train.'}runs_root={runs_root}"]:
        cmd += ["--set", s]
    env = {**os.environ, **NO_MULTICAST}
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    wall = round(time.perf_counter() - started, 1)
    summaries = sorted(runs_root.glob("*/summary.json"))
    if proc.returncode != 0 or not summaries:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:], "wall_seconds": wall}
    return {**json.loads(summaries[-1].read_text()), "wall_seconds": wall}


def pretrain_row(n: int, s: dict, base: dict | None, share: bool) -> dict:
    row = {"gpus": n}
    if "error" in s:
        return {**row, **s}
    row.update(ms_per_step=s["median_ms_per_step"], tokens_per_second=s["tokens_per_second"],
               steps=s["steps"], val_bpb=s["val_bpb"], val_bpb_pre_quant=s["val_bpb_pre_quant"],
               compile_seconds=s["compile_seconds"], peak_memory_bytes=s["peak_memory_bytes"],
               wall_seconds=s["wall_seconds"], world_size=s["world_size"])
    if base is not None and "error" not in base:
        if share:  # one rank at 1/n of the batch: the communication-free bound
            row["efficiency_bound"] = base["median_ms_per_step"] / (n * s["median_ms_per_step"])
        else:  # n ranks at the full batch: measured speedup and efficiency
            row["speedup"] = s["tokens_per_second"] / base["tokens_per_second"]
            row["efficiency"] = row["speedup"] / n
    return row


def randopt_row(n: int, s: dict, base: dict | None) -> dict:
    row = {"gpus": n}
    if "error" in s:
        return {**row, **s}
    lines = (Path(s["run_dir"]) / "population.jsonl").read_text().splitlines()
    candidates = sorted((json.loads(line) for line in lines), key=lambda c: c["index"])
    row.update(seeds_per_second=s["search"]["seeds_per_second"], search_seconds=s["search"]["seconds"],
               scored=s["search"]["scored"], world_size=s["world_size"], timing=s["timing"],
               wall_seconds=s["wall_seconds"], rewards=[c["reward"] for c in candidates],
               candidate_seconds=[c["seconds"] for c in candidates])
    if n == 1:
        row["round_bound"] = {k: round_bound(row["candidate_seconds"], k) for k in (2, 4, 8)}
    if base is not None and "error" not in base:
        row["speedup"] = row["seeds_per_second"] / base["seeds_per_second"]
        row["efficiency"] = row["speedup"] / n
        row["rewards_equal_to_1"] = sum(a == b for a, b in zip(row["rewards"], base["rewards"]))
    return row


def round_bound(seconds: list[float], n: int) -> float:
    """Efficiency of n seed-parallel ranks if each candidate took the time it took on one GPU:
    candidates run in rounds of n (candidate i on rank i % n) and a round lasts as long as its
    slowest candidate, so the bound is (total / n) / sum of the rounds' maxima."""
    rounds = [max(seconds[i : i + n]) for i in range(0, len(seconds), n)]
    return sum(seconds) / n / sum(rounds)


def interconnect() -> dict:
    info = {"nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")} | NO_MULTICAST}
    if torch.cuda.is_available():
        info["gpus_visible"] = torch.cuda.device_count()
        info["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
        if shutil.which("nvidia-smi"):
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=False)
            info["nvidia_smi_topo"] = topo.stdout or topo.stderr
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=sorted(PRESETS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="world sizes (share: the per-rank shares); more than are visible are skipped")
    parser.add_argument("--preset", help="default: golf-baseline (pretrain, share), randopt-smollm2 (randopt)")
    parser.add_argument("--data", help="prepared data folder for pretrain/share (data.out)")
    parser.add_argument("--steps", type=int, default=60, help="pretrain/share: timed steps per world size")
    parser.add_argument("--population", type=int, default=128, help="randopt: candidates per world size")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    track = "randopt" if args.mode == "randopt" else "pretrain"
    preset = args.preset or PRESETS[args.mode]
    cpu = args.device == "cpu"
    available = torch.cuda.device_count()
    sizes = sorted(set(args.gpus))
    skipped = [n for n in sizes if n > available and not cpu and args.mode != "share"]
    sizes = [n for n in sizes if n not in skipped]

    if track == "pretrain":
        sets = [f"train.max_steps={args.steps}", "train.max_wallclock_seconds=0", "train.val_every_steps=0",
                "train.checkpoint_every_steps=0", f"train.device={args.device}"]
        sets += [f"data.out={args.data}"] if args.data else []
    else:
        sets = [f"population={args.population}", "test_tasks=[\"gsm_symbolic\"]", "test_examples=16",
                "diagnostics.k1_seeds=0", "diagnostics.merge_pairs=0", "diagnostics.bpb_documents=0",
                f"device={args.device}"]
    sets += args.sets
    full_batch = cfglib.resolve(track, preset, sets).train.tokens_per_step if args.mode == "share" else None
    runs = Path(os.environ.get("TMPDIR", "/tmp")) / f"underpar-scaling-{os.getpid()}"

    rows, base = [], None
    for n in sizes:
        nproc, extra = (1, [f"train.tokens_per_step={full_batch // n}"]) if args.mode == "share" else (n, [])
        print(f"{args.mode}: {n} ...", flush=True)
        summary = launch(nproc, track, preset, sets + extra, runs / str(n), out / "logs" / f"{args.mode}-{n}.log")
        if n == 1:
            base = summary if track == "pretrain" else randopt_row(1, summary, None)
        if track == "randopt":
            rows.append(randopt_row(n, summary, base))
        else:
            rows.append(pretrain_row(n, summary, base, share=args.mode == "share"))
        print(table(args.mode, rows[-1:]), flush=True)
    shutil.rmtree(runs, ignore_errors=True)

    result = {"benchmark": f"scaling_{args.mode}", "preset": preset, "overrides": sets, "skipped_world_sizes": skipped,
              "rows": rows, "interconnect": interconnect(), **environment()}
    tag = "cpu" if cpu else f"{device_tag()}x{available}"
    (out / f"scaling_{args.mode}-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(args.mode, rows))
    if track == "randopt" and rows and "round_bound" in rows[0]:
        print("rounds waiting for their slowest candidate, from the 1-GPU times: efficiency bound "
              + ", ".join(f"{k} GPUs {100 * v:.1f}%" for k, v in rows[0]["round_bound"].items()))
    if skipped:
        print(f"skipped world sizes {skipped}: only {available} GPUs here")


def table(mode: str, rows: list[dict]) -> str:
    def pct(x):
        return "" if x is None else f"{100 * x:.1f}%"

    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | failed: {r['error']} (see logs/{mode}-{r['gpus']}.log) |")
        elif mode == "randopt":
            lines.append(f"| {r['gpus']} | {r['seeds_per_second']:.3f} | {r['search_seconds']:.1f} | "
                         f"{r.get('speedup', 1.0):.2f}x | {pct(r.get('efficiency', 1.0))} | {r.get('rewards_equal_to_1', '')} |")
        elif mode == "share":
            lines.append(f"| {r['gpus']} | {r['ms_per_step']:.1f} | {r['tokens_per_second'] / 1e6:.3f} M | "
                         f"{pct(r.get('efficiency_bound'))} |")
        else:
            lines.append(f"| {r['gpus']} | {r['ms_per_step']:.1f} | {r['tokens_per_second'] / 1e6:.3f} M | "
                         f"{r.get('speedup', 1.0):.2f}x | {pct(r.get('efficiency', 1.0))} | {r['val_bpb']:.4f} |")
    head = {"pretrain": "| GPUs | ms/step | tokens/s | speedup | efficiency | val_bpb (round trip) |\n|---|---|---|---|---|---|",
            "share": "| share 1/n | ms/step | tokens/s | efficiency bound 1/(n x share time) |\n|---|---|---|---|",
            "randopt": "| GPUs | seeds/s | search s | speedup | efficiency | rewards equal to 1 GPU |\n|---|---|---|---|---|---|"}[mode]
    return "\n".join([head, *lines])


if __name__ == "__main__":
    main()
