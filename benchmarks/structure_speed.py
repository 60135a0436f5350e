"""GPU benchmark: the 131-run log's Phase 3 structure experiments (model.structure.*, which
crashed under torch.compile(fullgraph=True) in the log) compiled with inductor at the
golf-baseline shape, bf16: for each, the graphs its untimed warmup compiles (one per training
stage that changes the graph), ms/step in every training stage against the baseline in the
same process, and the graphs compiled inside the timed steps (must be 0).

    PYTHONPATH=src python3 benchmarks/structure_speed.py --data .data/builtin_sp1024 --out $OUT [--only a b ...]
    # CPU check: --device cpu --preset tiny-cpu --steps 2 --tokens-per-step 8192 --set train.compile=false
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.runs.rundir import device_tag, environment
from underpar.stages import compiled_graphs
from underpar.tracks.pretrain import Trainer
from variant_runs import common_sets, run_variants, variant_names, variant_parser

# The log's U1-U6 at its numbers where they fit the 9 x 512, 8-head baseline: growing starts
# at 8 of 9 layers (2 graphs; the log's start at 3 would compile 7), pruning keeps 4 of 8 heads.
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "layer_dropout_0.2": ["model.structure.layer_dropout=0.2"],
    "share_groups_of_3": ["model.structure.share_group=3"],
    "grow_8_to_9": ["model.structure.grow={name = 'progressive', start_layers = 8, at = [0.5]}"],
    "attention_twice": ["model.structure.attention_passes=2"],
    "mirror_0.5": ["model.structure.mirror=0.5"],
    "prune_8_to_4_heads": ["model.structure.prune_heads_to=4", "model.structure.prune_at=0.42"],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(sets: list[str], preset: str, data: PreparedData, env: dist.Env, steps: int) -> dict:
    # A fresh dynamo per variant: the same forward code recompiled for every variant would
    # otherwise reach its recompile limit.
    torch._dynamo.reset()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cfg = cfglib.resolve("pretrain", preset, sets)
    trainer = Trainer(cfg, env, data)
    before = compiled_graphs()
    compile_seconds = trainer.warm_up()
    warmup_graphs = compiled_graphs() - before
    stages, loss = [], float("nan")
    for start in trainer.stages.starts:
        progress = min(start + 0.01, 0.999)
        changes = trainer.stages.enter(progress)
        times = []
        for _ in range(steps):
            _sync(env.device)
            started = time.perf_counter()
            loss = trainer.step(1.0, 0.95, progress)
            _sync(env.device)
            times.append(1000 * (time.perf_counter() - started))
        stages.append({"progress": progress, "changes": changes, "median_ms_per_step": statistics.median(times),
                       "layers_run": len(trainer.model.current_layout().order)})
    return {"stages": stages, "median_ms_per_step": statistics.median(s["median_ms_per_step"] for s in stages),
            "compile_seconds": compile_seconds, "warmup_graphs": warmup_graphs,
            "recompiles_in_timed_steps": compiled_graphs() - before - warmup_graphs, "last_loss": loss,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None}


def main() -> None:
    args = variant_parser(15, "timed steps per training stage").parse_args()
    env = dist.setup(args.device)
    common = common_sets(args)
    data = PreparedData.ready(cfglib.resolve("pretrain", args.preset, common).data, env)
    names = variant_names(args.only, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "structure_speed", "preset": args.preset, "steps_per_stage": args.steps,
              "tokens_per_step": args.tokens_per_step, "common_sets": common, "rows": [], **environment()}
    run_variants(names, VARIANTS, lambda sets: time_variant(common + sets, args.preset, data, env, args.steps),
                 record, out / f"structure_speed{args.tag}-{device_tag()}.json")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| experiment | ms/step by stage (layers run) | vs baseline | parameters | warmup graphs | compile s "
             "| recompiles in timed steps |", "|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | |")
            continue
        by_stage = ", ".join(f"{s['median_ms_per_step']:.1f} ({s['layers_run']})" for s in r["stages"])
        lines.append(f"| {r['variant']} | {by_stage} | {r.get('vs_baseline', 1.0):.3f} | {r['parameters']:,} | "
                     f"{r['warmup_graphs']} | {r['compile_seconds']:.0f} | {r['recompiles_in_timed_steps']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
