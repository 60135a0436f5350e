"""GPU benchmark of one optimizer step of golf-baseline (Muon for the 54 block matrices, fused
Adam for the rest) on random gradients: the batched Muon (one Newton-Schulz iteration per
shape stack, eager and compiled) against the per-matrix loop it replaced, timed in the same
run. The loop is rebuilt here from the reference `newton_schulz`, as Muon computed it before.

    PYTHONPATH=src python3 benchmarks/optimizer_step.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.model.gpt import build
from underpar.model.precision import cast_for_bf16_training
from underpar.optim import build_optimizers
from underpar.optim.muon import NS_COEFFICIENTS, Muon, muon_scale, newton_schulz
from underpar.runs.rundir import device_tag, environment


@torch.no_grad()
def per_matrix_step(opt: Muon) -> None:
    """Muon's step as a loop over matrices (the pre-batching implementation, one process)."""
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
            buf.mul_(group["momentum"]).add_(p.grad)
            g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            update = newton_schulz(g, group["backend_steps"], NS_COEFFICIENTS[group["ns"]])
            p.add_((update * muon_scale(*p.shape)).to(p.dtype), alpha=-group["lr"])


def time_ms(fn, repeats: int) -> list[float]:
    for _ in range(5):
        fn()
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - started))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    cfg = cfglib.resolve("pretrain", "golf-baseline", [])
    model = build(cfg.model).cuda()
    cast_for_bf16_training(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon, adam = build_optimizers(model, cfg.optim, cfg.model.embeddings.tied)
    shapes = sorted({tuple(p.shape) for g in muon.param_groups for p in g["params"]})

    def batched(compiled: bool):
        def step():
            muon.compile = compiled
            muon.step()
        return step

    variants = {
        "muon per-matrix loop": lambda: per_matrix_step(muon),
        "muon batched by shape": batched(False),
        "muon batched by shape, compiled iteration": batched(True),
        "adam (fused)": adam.step,
    }
    times = {name: time_ms(fn, args.repeats) for name, fn in variants.items()}
    rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}
    loop = rows["muon per-matrix loop"]["median_ms"]
    result = {"benchmark": "optimizer_step", "preset": "golf-baseline",
              "muon_matrices": sum(len(g["params"]) for g in muon.param_groups), "muon_shapes": shapes,
              "rows": rows, "speedup_vs_loop": {name: loop / r["median_ms"] for name, r in rows.items() if "batched" in name},
              **environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"optimizer_step-{device_tag()}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| optimizer step | median ms | min ms |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['min_ms']:.2f} |")
    for name, x in result["speedup_vs_loop"].items():
        print(f"{name}: {x:.1f}x the loop ({result['muon_matrices']} matrices, shapes {shapes})")


if __name__ == "__main__":
    main()
