"""GPU benchmark: which stack of technique switches beats golf-baseline at equal wallclock on
the built-in corpus, and by how much (issue 12's golf-best).

Protocol (the built-in corpus has ~6.9M training tokens: at the full 524,288-token batch a
model starts to memorize it after ~200 steps): every run trains at 131,072 tokens/step under
the same wallclock cap (default 20 s, a few passes over the data; each run's `epochs` is
recorded), then is scored by round-trip val_bpb as `underpar pretrain` scores it.

1. Pilot: golf-baseline and each candidate stack on seed 1; the stack with the lowest
   round-trip val_bpb is chosen (a choice made on the validation split: step 2 uses fresh
   seeds so the reported difference is not the one the choice was made on).
2. Final: golf-baseline and the chosen stack on seeds 2, 3, 4; one-sided Welch t-test
   (scipy) of chosen < baseline.

All runs in one process (dynamo reset between runs; inductor's cache makes repeats compile
faster). Raw summaries and the test to --out/golf_quality.json.

    PYTHONPATH=src python3 benchmarks/golf_quality.py --data .data/builtin_sp1024 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import traceback
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.runs.rundir import environment
from underpar.tracks import pretrain as track

# The 131-run log's H1 without its head-diversity loss (as golf-best measured it); the full
# H1 (golf-log-h1) is the candidate log_h1_head_diversity.
H1 = ["model.embeddings.tied=false", "model.embeddings.logit_softcap=15.0", "model.attention.rope_base=5000.0",
      "model.residual.parallel_start=0", "model.mlp.activation=silu2", "optim.embed_lr=0.8", "optim.matrix_lr=0.11",
      "model.residual.encoder_layers=0", "model.attention.num_kv_heads=2", "optim.schedule=tidal"]
# The records' cheap input-side and attention switches, and Polar Express.
RECORD_EXTRAS = ["model.embeddings.smear_gate=true", "model.embeddings.bigram_buckets=2048",
                 "model.attention.rotary_dims=16", "model.attention.qk_gain_init=5.0", "optim.ns_coefficients=polar_express"]
CANDIDATES: dict[str, list[str]] = {
    "log_h1": H1,
    "log_h1_record_extras": H1 + RECORD_EXTRAS,
    "log_h1_head_diversity": H1 + ["model.loss.head_diversity=1e-4"],
    "records_short": RECORD_EXTRAS + ["model.mlp.activation=leaky_relu2", "model.residual.layerwise_ln_scale=true",
                                      "optim.matrix_lr=0.06", "optim.schedule={name = 'warmdown', warmdown_fraction = 0.5}"],
}


def run_one(name: str, sets: list[str], seed: int, args: argparse.Namespace) -> dict:
    torch._dynamo.reset()
    protocol = [f"data.out={args.data}", f"train.tokens_per_step={args.tokens_per_step}", "train.micro_batch_tokens=65536",
                f"train.max_wallclock_seconds={args.seconds}", "train.val_every_steps=0", f"train.seed={seed}",
                f"train.runs_root={args.runs}", f"name=q-{name.replace('_', '-')}-s{seed}"]
    started = time.perf_counter()
    try:
        summary = track.run(cfglib.resolve("pretrain", args.preset, protocol + sets))
    except Exception as e:  # one broken stack must not lose the others' results
        traceback.print_exc()
        return {"stack": name, "seed": seed, "sets": sets, "error": f"{type(e).__name__}: {e}"}
    row = {"stack": name, "seed": seed, "sets": sets, "wall_seconds": round(time.perf_counter() - started, 1)}
    row.update(dataclasses.asdict(summary))
    print(f"{name} seed {seed}: val_bpb {summary.val_bpb:.4f} ({summary.steps} steps, {summary.epochs:.2f} epochs)", flush=True)
    return row


def welch(a: list[float], b: list[float]) -> dict:
    """One-sided Welch t-test of mean(b) < mean(a) (scipy, on the GPU box)."""
    from scipy import stats

    test = stats.ttest_ind(b, a, equal_var=False, alternative="less")
    return {"t": float(test.statistic), "p_one_sided": float(test.pvalue),
            "mean_baseline": statistics.mean(a), "mean_chosen": statistics.mean(b),
            "std_baseline": statistics.stdev(a), "std_chosen": statistics.stdev(b),
            "difference": statistics.mean(b) - statistics.mean(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/builtin_sp1024")
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default="/tmp/golf_quality_runs")
    ap.add_argument("--preset", default="golf-baseline")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--tokens-per-step", type=int, default=131072)
    ap.add_argument("--only", nargs="*", help="candidate stacks to try (default: all)")
    ap.add_argument("--final-seeds", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--extra", nargs="*", default=[], help="--set overrides for every run (e.g. a CPU smoke test)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = {k: v + args.extra for k, v in CANDIDATES.items() if not args.only or k in args.only}
    result = {"benchmark": "golf_quality", "protocol": {"seconds": args.seconds, "tokens_per_step": args.tokens_per_step,
              "preset": args.preset, "extra": args.extra}, "candidates": candidates, **environment(), "pilot": [], "final": []}

    def save() -> None:
        (out / "golf_quality.json").write_text(json.dumps(result, indent=1) + "\n")

    result["pilot"].append(run_one("baseline", args.extra, 1, args))
    for name, sets in candidates.items():
        result["pilot"].append(run_one(name, sets, 1, args))
        save()
    scored = [r for r in result["pilot"][1:] if "val_bpb" in r]
    if not scored:
        raise SystemExit("every candidate failed")
    chosen = min(scored, key=lambda r: r["val_bpb"])["stack"]
    result["chosen"] = chosen
    for seed in args.final_seeds:
        result["final"].append(run_one("baseline", args.extra, seed, args))
        result["final"].append(run_one(chosen, candidates[chosen], seed, args))
        save()
    base = [r["val_bpb"] for r in result["final"] if r["stack"] == "baseline" and "val_bpb" in r]
    best = [r["val_bpb"] for r in result["final"] if r["stack"] == chosen and "val_bpb" in r]
    if len(base) >= 2 and len(best) >= 2:
        result["welch"] = welch(base, best)
        print(json.dumps(result["welch"], indent=1))
    save()


if __name__ == "__main__":
    main()
