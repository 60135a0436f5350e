"""Fine-tuning on 1 and 2 GPUs (issue 19, item 4): `underpar finetune` under torchrun on random-init
Qwen2.5 shapes (as benchmarks/chaos_speed.py), bf16, sequence length 2048, the same global batch
(2 sequences per step: 2 micro-batches on one GPU, 1 per rank on two).

  3b-full    Qwen2.5-3B shape, full fine-tuning, DDP: ms/step and peak memory per GPU on 1 and 2
  3b-chaos   the same with the Deep Chaos Scheduler (hoist, sticky blocks of 5 steps), DDP
  7b-fsdp    Qwen2.5-7B shape, full fine-tuning, FSDP2 on 2 GPUs; one GPU runs it plain (or OOMs)
  search     the largest depth of the 7B shape whose full fine-tuning fits 2 GPUs with FSDP but not
             one: peak memory at 28 and 56 layers on 2 GPUs gives the bytes per layer, the
             predicted largest depth (95% of the GPU's memory) is probed on 2 GPUs (and the next
             larger one, or the next smaller one if it does not fit), and on 1 GPU.

Every run is a fresh torchrun process group with NVLink multicast off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1); an out-of-memory run is recorded as
"oom". The JSON (written after every run) records the NCCL version and `nvidia-smi topo -m`.

    PYTHONPATH=src python3 benchmarks/finetune_scaling.py --out $OUT
    PYTHONPATH=src python3 benchmarks/finetune_scaling.py --out /tmp/fs --device cpu --arch3 tiny-qwen2 \
        --arch7 tiny-qwen2 --seq-len 64 --search-layers 3 6      # a dry run of the whole path (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from scaling import NO_MULTICAST, interconnect  # noqa: E402  (benchmarks/ is the script's folder)
from underpar.runs.rundir import device_tag, environment

RUNS = Path(tempfile.mkdtemp(prefix="finetune-scaling-"))
BATCH = ["train.micro_batch_size=1", "train.grad_accum_steps=2", "eval.heldout_examples=0", "train.save=false"]
HEADROOM = 0.95  # the search aims at this share of the GPU's memory


def launch(name: str, nproc: int, sets: list[str], args, warmup: int) -> dict:
    """`underpar finetune` on nproc ranks: a row with ms/step after `warmup` steps and peak memory
    per GPU (the maximum over ranks), or status "oom" / "error" with the log's tail."""
    root = RUNS / f"{name}-{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "underpar", "finetune", "--preset", "chaos-qwen2.5-3b"]
    for s in BATCH + [f"data.max_length={args.seq_len}", f"train.device={args.device}",
                      f"train.runs_root={root}", *sets]:
        cmd += ["--set", s]
    env = {**os.environ, **NO_MULTICAST}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = f"{e.stdout or ''}{e.stderr or ''}timed out after {args.timeout} s", -1
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    (args.out / "logs" / f"{name}-{nproc}.log").write_text(f"$ {' '.join(cmd)}\n{out}")
    row = {"name": name, "gpus": nproc, "sets": sets, "wall_seconds": round(time.perf_counter() - started, 1)}
    summaries = sorted(root.glob("*/summary.json"))
    if code != 0 or not summaries:
        oom = "out of GPU memory" in out or "OutOfMemoryError" in out
        return {**row, "status": "oom" if oom else "error", "log_tail": out[-2000:]}
    summary = json.loads(summaries[-1].read_text())
    metrics = [json.loads(line) for line in (summaries[-1].parent / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms"] for r in metrics if "ms" in r][warmup:] or [summary["median_ms_per_step"]]
    return {**row, "status": "ok", "ms_per_step": statistics.mean(ms), "median_ms_per_step": statistics.median(ms),
            "peak_memory_bytes": summary["peak_memory_bytes"], "final_loss": summary["final_loss"],
            "steps": summary["steps"]}


def search(args, rows: list[dict], record) -> dict:
    """The largest depth of the 7B shape that fits 2 GPUs (FSDP), and whether it fits one."""
    def probe(layers: int, nproc: int) -> dict:
        row = launch(f"search-L{layers}", nproc, [*fsdp7(args), "train.steps=3", f"model.num_layers={layers}"],
                     args, warmup=1)
        rows.append({**row, "layers": layers})
        record()
        print(line(rows[-1]), flush=True)
        return rows[-1]

    if args.search_layers:  # explicit depths (a CPU dry run has no memory to predict from)
        found = {n: [probe(layers, n) for layers in args.search_layers] for n in (2, 1)}
        fits2 = [r["layers"] for r in found[2] if r["status"] == "ok"]
        return {"largest_fitting_2": max(fits2, default=None), "probes": "explicit"}
    base = next((r for r in rows if r["name"] == "7b-fsdp" and r["gpus"] == 2 and r["status"] == "ok"), None)
    if base is None or not base["peak_memory_bytes"]:
        return {"skipped": "7b-fsdp did not run on 2 GPUs"}
    deeper = probe(2 * args.layers7, 2)
    if deeper["status"] != "ok":
        return {"skipped": f"{2 * args.layers7} layers did not fit 2 GPUs ({deeper['status']})"}
    per_layer = (deeper["peak_memory_bytes"] - base["peak_memory_bytes"]) / args.layers7
    capacity = torch.cuda.get_device_properties(0).total_memory
    guess = 2 * args.layers7 + int((HEADROOM * capacity - deeper["peak_memory_bytes"]) / per_layer)
    result = {"bytes_per_layer_2gpus": per_layer, "capacity_bytes": capacity, "predicted_layers": guess}
    first = probe(guess, 2)
    step = max(2, guess // 20)
    other = probe(guess + step if first["status"] == "ok" else guess - step, 2)
    fitting = [r["layers"] for r in (first, other, deeper) if r["status"] == "ok"]
    result["largest_fitting_2"] = largest = max(fitting)
    result["smallest_oom_2"] = min((r["layers"] for r in (first, other) if r["status"] == "oom"), default=None)
    result["on_1_gpu"] = probe(largest, 1)["status"]
    return result


def fsdp7(args) -> list[str]:
    return ["method=full", f"model.architecture={args.arch7}", "train.parallel=fsdp"]


def line(r: dict) -> str:
    gib = "-" if not r.get("peak_memory_bytes") else f"{r['peak_memory_bytes'] / 2**30:.1f}"
    if r["status"] != "ok":
        return f"| {r['name']} | {r['gpus']} | {r['status']} | | | {r['wall_seconds']} |"
    speed = f"{r['ms_per_step']:.1f}"
    return f"| {r['name']} | {r['gpus']} | {speed} | {r.get('speedup', '')} | {gib} | {r['wall_seconds']} |"


def table(rows: list[dict]) -> str:
    head = "| run | GPUs | ms/step | speedup vs 1 GPU | peak GiB per GPU | wall s |\n|---|---|---|---|---|---|"
    return "\n".join([head, *(line(r) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--only", nargs="+", default=["3b-full", "3b-chaos", "7b-fsdp", "search"],
                        choices=["3b-full", "3b-chaos", "7b-fsdp", "search"])
    parser.add_argument("--arch3", default="qwen2.5-3b")
    parser.add_argument("--arch7", default="qwen2.5-7b")
    parser.add_argument("--layers7", type=int, default=28, help="the depth of --arch7 (the search starts there)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="3B runs (the first 2 are warm-up)")
    parser.add_argument("--interval", type=int, default=5, help="chaos sticky_interval (the first block is warm-up)")
    parser.add_argument("--search-layers", type=int, nargs="*", default=[], help="explicit depths instead of the search")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per run")
    parser.add_argument("--tag", default="", help="prefix of the result file's name (split runs: --only ...)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        "3b-full": (["method=full", f"model.architecture={args.arch3}", f"train.steps={args.steps}"], 2),
        "3b-chaos": (["method=chaos", f"method.sticky_interval={args.interval}", f"model.architecture={args.arch3}",
                      f"train.steps={3 * args.interval}"], args.interval),
        "7b-fsdp": ([*fsdp7(args), "train.steps=6"], 2),
    }
    rows: list[dict] = []
    result = {"benchmark": "finetune_scaling", "seq_len": args.seq_len, "global_batch": 2, "rows": rows,
              "interconnect": interconnect(), **environment()}
    tag = "cpu" if args.device == "cpu" else f"{device_tag()}x{torch.cuda.device_count()}"

    def record() -> None:
        for row in rows:  # n GPUs against one, the same global batch
            one = next((r for r in rows if r["name"] == row["name"] and r["gpus"] == 1 and r["status"] == "ok"), None)
            if row["status"] == "ok" and row["gpus"] > 1 and one is not None:
                row["speedup"] = f"{one['ms_per_step'] / row['ms_per_step']:.2f}x"
        (args.out / f"finetune_scaling-{args.tag}{tag}.json").write_text(json.dumps(result, indent=2) + "\n")

    for name, (sets, warmup) in runs.items():
        if name not in args.only:
            continue
        for n in sorted(args.gpus, reverse=name == "7b-fsdp"):  # 7B: 2 GPUs first (the search needs it)
            rows.append(launch(name, n, sets, args, warmup))
            record()
            print(line(rows[-1]), flush=True)
    if "search" in args.only:
        result["search"] = search(args, rows, record)
        record()
    print(table(rows))
    print("search:", json.dumps(result.get("search")))


if __name__ == "__main__":
    main()
