"""What a hoisted Deep Chaos block costs the pretrained SmolLM2-135M-Instruct before any
training, and how much the opt-in mean stubs give back: held-out loss (gsm_symbolic validation
solutions) of the full model and of the hoisted network of many block plans, with the published
random stubs (x + N(0, 0.01^2)), with mean stubs (x + the removed run's mean contribution,
calibrated on training micro-batches) and with mean stand-ins for skipped halves too. No
training: the loss jump every block change makes.

    PYTHONPATH=src python3 benchmarks/chaos_stubs.py --out $OUT [--seeds 0 1 2] [--blocks 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from underpar.data.sft import collate, encode_sft_examples
from underpar.data.tasks import get_task
from underpar.model import hf
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.chaos import ChaosConfig, ChaosController
from underpar.tracks.finetune_heldout import FULL, TRAINED, HeldOut

VARIANTS = {
    "random stub (published)": {},
    "mean stub": {"stub": "mean"},
    "mean stubs for skipped halves too": {"stub": "mean_halves"},
    "random stub, identity hoisted too": {"hoist_identity": True},
    "mean stub, identity hoisted too": {"hoist_identity": True, "stub": "mean"},
}


def rows(task_name: str, split: str, n: int, tokenizer, max_length: int) -> list[dict]:
    task = get_task(task_name)
    encoded, _ = encode_sft_examples(tokenizer, task.load(split, limit=n, seed=0), task, max_length)
    return encoded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blocks", type=int, default=8, help="block plans per seed")
    parser.add_argument("--heldout", type=int, default=32, help="gsm_symbolic validation examples")
    parser.add_argument("--calibration", type=int, default=4, help="training micro-batches of --batch rows")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = hf.load_model("smollm2-135m")
    model.train()  # as it trains (no dropout in this model)
    device, pad = next(model.parameters()).device, tokenizer.pad_token_id
    held = rows("gsm_symbolic", "validation", args.heldout, tokenizer, args.max_length)
    heldout = HeldOut([collate(held[i : i + args.batch], pad) for i in range(0, len(held), args.batch)], device)
    train = rows("gsm_symbolic", "train", args.calibration * args.batch, tokenizer, args.max_length)
    calibration = [collate(train[i : i + args.batch], pad) for i in range(0, len(train), args.batch)]
    full = heldout.loss(model)
    print(f"full model: held-out loss {full:.4f} on {heldout.tokens} tokens", flush=True)
    plans = []
    for seed in args.seeds:
        for block in range(args.blocks):
            row = {"seed": seed, "block": block}
            for name in args.only:
                ctl = ChaosController(model, ChaosConfig(seed=seed, strategy="hoist", **VARIANTS[name]))
                ctl.use_calibration(calibration)
                plan = ctl.begin_block(block)
                measured = heldout.measure(ctl)
                ctl.end()
                assert abs(measured[FULL] - full) < 1e-3, "the restored model must be the full model"
                row[name] = measured[TRAINED]
                row["modes"] = {m: plan.modes.count(m) for m in ("both", "attn", "mlp", "identity", "dead")}
            plans.append(row)
            print(json.dumps(row), flush=True)
    summary = {name: {"mean": statistics.mean(p[name] for p in plans),
                      "median": statistics.median(p[name] for p in plans),
                      "better_than_published": sum(p[name] < p.get("random stub (published)", float("nan"))
                                                   for p in plans)}
               for name in args.only}
    record = {"benchmark": "chaos_stubs", "model": "smollm2-135m", "heldout_tokens": heldout.tokens,
              "full_model_loss": full, "calibration_rows": len(train), "plans": plans, "summary": summary,
              **environment(), "seconds": time.time() - started}
    (out / f"chaos_stubs-{device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| hoisted network ({len(plans)} plans) | mean held-out loss | median | plans better than published |")
    print("|---|---|---|---|")
    print(f"| full model (for reference) | {full:.3f} | | |")
    for name, s in summary.items():
        print(f"| {name} | {s['mean']:.3f} | {s['median']:.3f} | {s['better_than_published']}/{len(plans)} |")


if __name__ == "__main__":
    main()
