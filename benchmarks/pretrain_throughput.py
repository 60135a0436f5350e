"""GPU benchmark of the pretraining track: golf-baseline on the built-in shards at the baseline
batch, one wallclock-capped run (default 240 s). Reports median ms/step, tokens/s, model FLOP
utilization, steps, val_bpb before/after the round trip and artifact bytes.

    PYTHONPATH=src python3 benchmarks/pretrain_throughput.py --data .data/builtin_sp1024 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.tracks import pretrain

H100_BF16_DENSE_TFLOPS = 989.4  # datasheet, SXM


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The achievable bf16 matrix-product rate on this device, measured now."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def flops_per_token(cfg: pretrain.PretrainConfig, params: int) -> float:
    """6N for the weights (the tied head's matmul included) + 6 L T d for causal attention."""
    m = cfg.model
    return 6 * params + 6 * m.num_layers * cfg.train.seq_len * m.model_dim


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="prepared built-in data folder (underpar data prepare --out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    peak = matmul_tflops()
    sets = [
        f"data.out={args.data}",
        f"train.max_wallclock_seconds={args.seconds}",
        f"train.runs_root={out / 'runs'}",
        *args.sets,
    ]
    cfg = cfglib.resolve("pretrain", "golf-baseline", sets)
    summary = dataclasses.asdict(pretrain.run(cfg))
    flops = flops_per_token(cfg, summary["parameters"]) * summary["tokens_per_second"]
    result = {
        "benchmark": "pretrain_throughput",
        "preset": "golf-baseline",
        "overrides": sets[1:2] + args.sets,
        "matmul_tflops_measured": peak,
        "model_tflops": flops / 1e12,
        "mfu_vs_datasheet": flops / 1e12 / H100_BF16_DENSE_TFLOPS,
        "mfu_vs_measured_matmul": flops / 1e12 / peak,
        "summary": summary,
    }
    name = f"pretrain_throughput-{torch.cuda.get_device_name().split()[1].lower()}.json"
    (out / name).write_text(json.dumps(result, indent=2) + "\n")
    run_dir = Path(summary["run_dir"])
    for file in ("metrics.jsonl", "train.log", "loss.png"):
        shutil.copy(run_dir / file, out / file)
    shutil.rmtree(out / "runs")
    print(table(result))


def table(result: dict) -> str:
    s = result["summary"]
    rows = [
        ("device", s["device"]),
        ("steps in the cap", f"{s['steps']} in {s['training_seconds']:.0f} s"),
        ("median ms/step", f"{s['median_ms_per_step']:.1f}"),
        ("tokens/s", f"{s['tokens_per_second'] / 1e6:.2f} M"),
        ("MFU (datasheet 989 TFLOP/s)", f"{100 * result['mfu_vs_datasheet']:.1f}%"),
        ("MFU (measured matmul peak)", f"{100 * result['mfu_vs_measured_matmul']:.1f}% of {result['matmul_tflops_measured']:.0f}"),
        ("val_bpb before / after round trip", f"{s['val_bpb_pre_quant']:.4f} / {s['val_bpb']:.4f}"),
        ("artifact bytes (code + model)", f"{s['artifact_bytes']['total']:,} ({s['artifact_bytes']['code']:,} + {s['artifact_bytes']['model']:,})"),
        ("epochs over the training data", f"{s['epochs']:.1f}"),
        ("compile / eval seconds", f"{s['compile_seconds']:.0f} / {s['eval_seconds']:.0f}"),
        ("peak memory", f"{s['peak_memory_bytes'] / 2**30:.1f} GiB"),
    ]
    return "\n".join(["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


if __name__ == "__main__":
    main()
