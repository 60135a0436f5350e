"""GPU benchmark: ms/step of each pretraining technique switch at the golf-baseline model shape
(compiled, bf16), against the baseline measured in the same process. Each variant is built,
compiled in an untimed warmup (state restored), then timed over --steps steps.

    PYTHONPATH=src python3 benchmarks/technique_speed.py --data .data/builtin_sp1024 --out $OUT [--only a b ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.pretrain import Trainer
from variant_runs import run_variants, variant_names

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "leaky_relu2": ["model.mlp.activation=leaky_relu2"],
    "silu2": ["model.mlp.activation=silu2"],
    "gelu2": ["model.mlp.activation=gelu2"],
    "swiglu": ["model.mlp.activation=swiglu"],
    "parallel_blocks": ["model.residual.parallel_start=0"],
    "two_lanes_from_5": ["model.residual.two_lane_start=5"],
    "layerwise_ln_scale": ["model.residual.layerwise_ln_scale=true"],
    "smear_gate": ["model.embeddings.smear_gate=true"],
    "bigram_hash_2048": ["model.embeddings.bigram_buckets=2048"],
    "partial_rope_16": ["model.attention.rotary_dims=16"],
    "sparse_attn_gate": ["model.attention.gate=sparse"],
    "xsa_all": ["model.attention.xsa=true"],
    "polar_express": ["optim.ns_coefficients=polar_express"],
    "muon_weight_decay": ["optim.muon_weight_decay=0.04"],
    "ema": ["optim.averaging=ema"],
    # the record's loop (blocks 3-5 twice more: 15 virtual layers of 9), timed once it is on
    "loop_3_5": ["model.recurrence={name = 'loop', start = 3, end = 5, extra_passes = 2, start_at = 0.0}"],
    # PR #38's form at this width: 3 shared blocks x 3 loops + rank-4 adapters (9 virtual layers)
    "shared_3x3": ["model.num_layers=3", "model.residual.encoder_layers=0", "model.recurrence=shared"],
    "fused_ce": ["model.embeddings.fused_ce=true"],
    "muon_fused": ["optim.muon_fused=true"],
    "muon_row_normalize": ["optim.muon_row_normalize=true"],
    "numuon": ["optim.numuon=true"],
    "speed_switches": ["model.embeddings.fused_ce=true", "optim.muon_fused=true"],
    # the 131-run log's training-loss terms (model/loss.py) at its coefficients (Phase 1, N3/H1, E1)
    "head_diversity": ["model.loss.head_diversity=1e-4"],
    "token_dropout": ["model.loss.token_dropout=0.05"],
    "embed_mixup": ["model.loss.embed_mixup=0.1"],
    "all_loss_terms": ["model.loss.z_loss=1e-4", "model.loss.logit_penalty=1e-5", "model.loss.token_dropout=0.05",
                       "model.loss.embed_mixup=0.1", "model.loss.label_smoothing=0.1", "model.loss.head_diversity=1e-4"],
    "fused_ce_loss_terms": ["model.embeddings.fused_ce=true", "model.loss.token_dropout=0.05",
                            "model.loss.embed_mixup=0.1", "model.loss.head_diversity=1e-4"],
}


def time_variant(sets: list[str], data: PreparedData, env: dist.Env, steps: int) -> dict:
    # Each variant is a new model compiled in this one process: start dynamo afresh, or the
    # variants' graphs of the same forward code would hit its recompile limit.
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    cfg = cfglib.resolve("pretrain", "golf-baseline", sets)
    trainer = Trainer(cfg, env, data)
    compile_seconds = trainer.warm_up()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = trainer.step(1.0, 0.95, 0.5)  # progress 0.5: NuMuon mid-schedule
        trainer.averager.update(step + 1, 0.5)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - started))
    return {"median_ms_per_step": statistics.median(times), "compile_seconds": compile_seconds,
            "last_loss": loss, "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens-per-step", type=int, default=131_072)
    parser.add_argument("--only", nargs="*", default=None, help="variant names (baseline always runs first)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    env = dist.setup("cuda")
    common = [f"data.out={args.data}", f"train.tokens_per_step={args.tokens_per_step}", "train.warmup_steps=3"]
    data = PreparedData.ready(cfglib.resolve("pretrain", "golf-baseline", common).data, env)
    names = variant_names(args.only, VARIANTS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "technique_speed", "steps": args.steps, "tokens_per_step": args.tokens_per_step,
              "rows": [], **environment()}
    run_variants(names, VARIANTS, lambda sets: time_variant(common + sets, data, env, args.steps), record,
                 out / f"technique_speed{args.tag}-{device_tag()}.json")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| variant | ms/step | vs baseline | parameters | compile s |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['median_ms_per_step']:.1f} | {r.get('vs_baseline', 1.0):.3f} | "
                         f"{r['parameters']:,} | {r['compile_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
