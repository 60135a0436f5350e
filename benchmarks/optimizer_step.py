"""Benchmark of one optimizer step of golf-baseline (Muon for the 54 block matrices, fused
Adam for the rest) on random gradients, every variant timed in the same run:
- the per-matrix loop Muon replaced (rebuilt here from the reference `newton_schulz`);
- the batched Muon (one Newton-Schulz iteration per shape stack), eager and compiled: the
  unfused step, today's default;
- PR #1584's fused step (optim.muon_fused: momentum + Nesterov + Newton-Schulz as one compiled
  graph per shape stack), with and without MuonEq-R row normalization;
- NuMuon (optim.numuon: a batched SVD per stack instead of Newton-Schulz; its cost does not
  depend on k; fused, only its momentum part would be compiled, so it is left out).
It also records how far the fused update is from the unfused one (same start, grads and
momentum, 3 steps) and how many graphs a changing momentum compiles (0 expected).

    PYTHONPATH=src python3 benchmarks/optimizer_step.py --out $OUT
    PYTHONPATH=src python3 benchmarks/optimizer_step.py --out /tmp/x --preset tiny-cpu --repeats 3   # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from underpar import config as cfglib
from underpar.model.gpt import build
from underpar.model.precision import cast_for_bf16_training
from underpar.optim import build_optimizers, set_muon_progress
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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):  # compiles, first SVD workspace, allocator
        fn()
    out = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        out.append(1000 * (time.perf_counter() - started))
    return out


def muon_for(model, cfg, sets: list[str]) -> Muon:
    optim = cfg.optim
    for setting in sets:
        optim = cfglib.override(optim, setting)
    cfglib.validate(optim, prefix="optim")
    return build_optimizers(model, optim, cfg.model.embeddings.tied)[0]


def fused_vs_unfused(model, cfg, steps: int = 3) -> dict:
    """||fused - unfused|| / ||unfused|| of the weight change after `steps` steps from the same
    weights, grads and (fresh) momentum; both compiled as on CUDA. Weights are put back."""
    params = [p for p in model.parameters() if p.grad is not None]
    start = [p.detach().clone() for p in params]
    moved = []
    for sets in ([], ["muon_fused=true"]):
        opt = muon_for(model, cfg, sets)
        for step in range(steps):
            set_muon_progress([opt], step / steps)
            for group in opt.param_groups:
                group["momentum"] = 0.85 + 0.05 * step
            opt.step()
        moved.append([p.detach().float() - s.float() for p, s in zip(params, start)])
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    num = sum(float((f - u).norm() ** 2) for u, f in zip(*moved)) ** 0.5
    den = sum(float(u.norm() ** 2) for u in moved[0]) ** 0.5
    return {"relative_difference": num / den, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--preset", default="golf-baseline")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    cfg = cfglib.resolve("pretrain", args.preset, [])
    model = build(cfg.model)
    if cuda:
        model = cast_for_bf16_training(model.cuda())
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon, adam = build_optimizers(model, cfg.optim, cfg.model.embeddings.tied)
    shapes = sorted({tuple(p.shape) for g in muon.param_groups for p in g["params"]})
    # compiled on CUDA (Muon's default there); eager on a CPU check run
    fused = muon_for(model, cfg, ["muon_fused=true"])
    fused_rows = muon_for(model, cfg, ["muon_fused=true", "muon_row_normalize=true"])
    numuon = muon_for(model, cfg, ["numuon=true"])

    def batched(compiled: bool):
        def step():
            muon.compile = compiled
            muon.step()
        return step

    def numuon_step():
        set_muon_progress([numuon], 0.5)  # k is half way down its schedule; the SVD is full either way
        numuon.step()

    variants = {
        "muon per-matrix loop": lambda: per_matrix_step(muon),
        "muon batched by shape": batched(False),
        "muon batched by shape, compiled iteration": batched(True),
        "muon fused step": fused.step,
        "muon fused step + row normalize": fused_rows.step,
        "numuon (svd per stack)": numuon_step,
        "adam (fused)" if cuda else "adam": adam.step,
    }
    times = {}
    for name, fn in variants.items():
        # an SVD step may take ~100x a Newton-Schulz one: fewer of them keep the run short
        slow = name.startswith("numuon")
        times[name] = time_ms(fn, max(3, args.repeats // 5) if slow else args.repeats, warmup=2 if slow else 5)
        print(f"{name}: {statistics.median(times[name]):.2f} ms", flush=True)
    rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t)} for name, t in times.items()}

    # A momentum warmup changes the value every step: the fused step must not recompile.
    graphs_before = counters["stats"]["unique_graphs"]
    for k in range(3):
        for group in fused.param_groups:
            group["momentum"] = 0.9 + 0.01 * k
        fused.step()
    sync()
    recompiles = counters["stats"]["unique_graphs"] - graphs_before

    unfused = rows["muon batched by shape, compiled iteration"]["median_ms"]
    loop = rows["muon per-matrix loop"]["median_ms"]
    result = {"benchmark": "optimizer_step", "preset": args.preset, "fused_and_unfused_compiled": cuda,
              "repeats": {name: len(t) for name, t in times.items()},
              "muon_matrices": sum(len(g["params"]) for g in muon.param_groups), "muon_shapes": shapes,
              "rows": rows,
              "speedup_vs_loop": {name: loop / r["median_ms"] for name, r in rows.items() if name.startswith("muon ")},
              "ratio_vs_unfused_compiled": {name: r["median_ms"] / unfused for name, r in rows.items()},
              "fused_vs_unfused_update": fused_vs_unfused(model, cfg),
              "fused_graphs_compiled_by_momentum_changes": recompiles,
              **environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "optimizer_step" if args.preset == "golf-baseline" else f"optimizer_step-{args.preset}"
    (out / f"{name}-{device_tag()}.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| optimizer step | median ms | min ms | x unfused compiled |\n|---|---|---|---|")
    for row, r in rows.items():
        print(f"| {row} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {result['ratio_vs_unfused_compiled'][row]:.2f} |")
    print(f"{result['muon_matrices']} matrices, shapes {shapes}; fused vs unfused update: "
          f"{result['fused_vs_unfused_update']['relative_difference']:.2e} relative; "
          f"graphs compiled by momentum changes: {recompiles}")


if __name__ == "__main__":
    main()
