"""Benchmark: what the 131-run log's training dynamics (optim.weight_dynamics, optim.gradient_trick)
cost per step at the golf-baseline shape, against the baseline step in the same process.

One Trainer is built and compiled (untimed warmup); the dynamics are eager hooks outside the
compiled forward, so each variant swaps only `trainer.dynamics` on the same model and
optimizers: no recompile. Per variant: the median ms of --steps full training steps, and the
median ms of one firing of its hook alone (after_step on a step where it fires, or
after_backward on random gradients), with that cost amortized over its period.

    PYTHONPATH=src python3 benchmarks/dynamics_overhead.py --data .data/builtin_sp1024 --out $OUT
    # CPU check: --device cpu --preset tiny-cpu --steps 3 --tokens-per-step 8192 --set train.compile=false
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.optim import build_dynamics
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.pretrain import Trainer
from variant_runs import common_sets, run_variants, variant_names, variant_parser

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "controlled_burn": ["optim.weight_dynamics=controlled_burn"],  # 5% every 50 steps (N1)
    "mutation": ["optim.weight_dynamics=mutation"],  # 1e-4 every 100 steps (N4)
    "mutation_decay": ["optim.weight_dynamics={name = 'mutation', std = 0.001, decay = 5.0}"],  # NF9
    "synaptic_scaling": ["optim.weight_dynamics=synaptic_scaling"],  # every step (NF5)
    "canopy_light": ["optim.gradient_trick=canopy_light"],  # W1
    "mycorrhizal": ["optim.gradient_trick=mycorrhizal"],  # W4
    "thermal_vent": ["optim.gradient_trick=thermal_vent"],  # W5
    "punctuated_equilibrium": ["optim.gradient_trick=punctuated_equilibrium"],  # W3 (LR only)
    "predator_prey": ["optim.gradient_trick=predator_prey"],  # W2 (LR and weight decay only)
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def measure(trainer: Trainer, preset: str, sets: list[str], steps: int, repeats: int) -> dict:
    cfg = cfglib.resolve("pretrain", preset, sets)
    device = trainer.env.device
    trainer.dynamics = build_dynamics(trainer.model, cfg.optim, cfg.train.seed)
    losses: list[float] = []
    step_ms = _median_ms(lambda: losses.append(trainer.step(1.0, 0.95, 0.5)), device, steps)
    weights = trainer.dynamics.parts["weight_dynamics"]
    trick = trainer.dynamics.parts["gradient_trick"]
    period = getattr(cfg.optim.weight_dynamics, "every_steps", 1)
    fire_weights = _median_ms(lambda: weights.after_step(period, 0.5), device, repeats)
    for p in trainer.model.parameters():
        p.grad = torch.randn_like(p)
    fire_grads = _median_ms(lambda: trick.after_backward(1), device, repeats)
    trainer.model.zero_grad(set_to_none=True)
    return {"median_ms_per_step": step_ms, "weight_hook_ms": fire_weights, "weight_hook_every_steps": period,
            "gradient_hook_ms": fire_grads, "hook_ms_per_step": fire_weights / period + fire_grads,
            "last_loss": losses[-1]}


def table(record: dict) -> str:
    lines = ["| variant | ms/step | vs baseline | weight hook ms (every k) | gradient hook ms | hooks ms/step |",
             "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['median_ms_per_step']:.1f} | {r.get('vs_baseline', 1.0):.3f} | "
                         f"{r['weight_hook_ms']:.2f} ({r['weight_hook_every_steps']}) | {r['gradient_hook_ms']:.2f} | "
                         f"{r['hook_ms_per_step']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = variant_parser(20, "timed training steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = dist.setup(args.device)
    base = common_sets(args)
    cfg = cfglib.resolve("pretrain", args.preset, base)
    trainer = Trainer(cfg, env, PreparedData.ready(cfg.data, env))
    compile_seconds = trainer.warm_up()
    names = variant_names(args.only, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "dynamics_overhead", "preset": args.preset, "steps": args.steps, "repeats": args.repeats,
              "tokens_per_step": args.tokens_per_step, "compile_seconds": compile_seconds,
              "parameters": sum(p.numel() for p in trainer.model.parameters()), "rows": [], **environment()}
    run_variants(names, VARIANTS, lambda sets: measure(trainer, args.preset, base + sets, args.steps, args.repeats),
                 record, out / f"dynamics_overhead{args.tag}-{device_tag()}.json")
    print(table(record))


if __name__ == "__main__":
    main()
