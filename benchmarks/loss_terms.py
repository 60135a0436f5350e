"""GPU benchmark: what the 131-run log's training-loss terms (model.loss.*, model/loss.py) cost
per step at the golf-baseline shape (compiled with inductor under fullgraph, bf16), against
the baseline in the same process, and that each compiles (random draws and top-k included).
Each variant is built, compiled in the trainer's untimed warmup (state restored), then timed
over --steps steps; the training loss of the last step is recorded (it includes the terms).

    PYTHONPATH=src python3 benchmarks/loss_terms.py --data .data/builtin_sp1024 --out $OUT [--only a b ...]

CPU smoke run (tiny model, eager): add --device cpu --tiny --tokens-per-step 1024 --steps 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.pretrain import Trainer

# The log's coefficients (Phase 1, N3/H1, E1).
VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "head_diversity": ["model.loss.head_diversity=1e-4"],
    "token_dropout": ["model.loss.token_dropout=0.05"],
    "embed_mixup": ["model.loss.embed_mixup=0.1"],
    "all_terms": ["model.loss.z_loss=1e-4", "model.loss.logit_penalty=1e-5", "model.loss.token_dropout=0.05",
                  "model.loss.embed_mixup=0.1", "model.loss.label_smoothing=0.1", "model.loss.head_diversity=1e-4"],
    "fused_ce_terms": ["model.embeddings.fused_ce=true", "model.loss.token_dropout=0.05",
                       "model.loss.embed_mixup=0.1", "model.loss.head_diversity=1e-4"],
}
TINY = ["model.num_layers=2", "model.model_dim=64", "model.attention.num_heads=4", "model.attention.num_kv_heads=2",
        "train.seq_len=64", "train.micro_batch_tokens=512", "train.compile=false", "train.device=cpu"]


def time_variant(sets: list[str], data: PreparedData, env: dist.Env, steps: int) -> dict:
    torch._dynamo.reset()  # a fresh dynamo per variant: the same forward code, many graphs
    cfg = cfglib.resolve("pretrain", "golf-baseline", sets)
    trainer = Trainer(cfg, env, data)
    compile_seconds = trainer.warm_up()
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(steps):
        sync()
        started = time.perf_counter()
        loss = trainer.step(1.0, 0.95, 0.5)
        sync()
        times.append(1000 * (time.perf_counter() - started))
    peak = torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else 0.0
    return {"median_ms_per_step": statistics.median(times), "compile_seconds": compile_seconds,
            "last_loss": loss, "peak_memory_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens-per-step", type=int, default=131_072)
    parser.add_argument("--only", nargs="*", default=None, help="variant names (baseline always runs first)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2 x 64 model on 512-token micro-steps (CPU smoke run)")
    args = parser.parse_args()
    env = dist.setup(args.device)
    common = [f"data.out={args.data}", f"train.tokens_per_step={args.tokens_per_step}", "train.warmup_steps=3"]
    common += TINY if args.tiny else []
    data = PreparedData.ready(cfglib.resolve("pretrain", "golf-baseline", common).data, env)
    names = ["baseline"] + [n for n in (args.only or VARIANTS) if n != "baseline"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    record = {"benchmark": "loss_terms", "steps": args.steps, "tokens_per_step": args.tokens_per_step,
              "tiny": args.tiny, "rows": rows, **environment()}
    for name in names:
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            row = {"variant": name, "sets": VARIANTS[name], **time_variant(common + VARIANTS[name], data, env, args.steps)}
        except Exception as e:  # a variant that fails is recorded; the rest still run
            row = {"variant": name, "sets": VARIANTS[name], "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        if "median_ms_per_step" in row and rows and "median_ms_per_step" in rows[0]:
            row["vs_baseline"] = row["median_ms_per_step"] / rows[0]["median_ms_per_step"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / f"loss_terms-{device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


def table(record: dict) -> str:
    lines = ["| variant | ms/step | vs baseline | last loss | compile s |", "|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['variant']} | {r['median_ms_per_step']:.1f} | {r.get('vs_baseline', 1.0):.3f} | "
                         f"{r['last_loss']:.4f} | {r['compile_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
