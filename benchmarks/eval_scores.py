"""GPU benchmark (issue 15): a trained golf-baseline model scored by plain, sliding-window
(stride 64) and score-first TTT val_bpb, each with its evaluation seconds, as
`underpar eval bpb --run` scores it (the artifact after its round trip).

Protocol: golf-baseline trains at 131,072 tokens/step under a short wallclock cap (default
45 s; the built-in corpus is small, REFERENCE.md section 6) and writes its artifact; then each
evaluation variant loads the artifact into a fresh model and scores the whole validation split
(plain and sliding share the scored tokens and bytes, so their val_bpb compare directly).
Variants: plain and sliding stride 64; sliding at 2048 with NTK RoPE scaling; TTT with the
PR #461 recipe (SGD lr 0.005, momentum 0.9, 3 epochs per 32,768-token chunk, cosine across
chunks, clip 1.0; sliding stride 64 inside); phased (3 phases over the first 25% of the
stream); the records' per-document LoRA TTT (rank 80, Adam lr 1e-4, 48-token chunks); with
--only also TTT at lr 0.002 (PR #549's value). Raw numbers to --out/eval_scores-<device>.json.

    PYTHONPATH=src python3 benchmarks/eval_scores.py --data .data/builtin_sp1024 --out $OUT
    # CPU check of the script: --preset tiny-cpu --seconds 0 --steps 20 --tokens-per-step 8192 --stride 64
    #   --chunk 2048 --data <a small prepared folder> --set data.vocab_size=V --set model.vocab_size=V --tag cpu-check
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.eval.config import eval_config
from underpar.eval.score import score_run
from underpar.runs.rundir import device_tag, environment
from underpar.tracks import pretrain as track


def variants(stride: int, chunk: int) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """name -> (eval.* settings, run config changes, scores not to repeat)."""
    ttt = ["ttt.enabled=true", f"stride={stride}", f"ttt.chunk_tokens={chunk}"]
    return {
        f"sliding_{stride}": ([f"stride={stride}"], [], []),  # with the plain score
        f"sliding_{stride}_at_2048_ntk": ([f"stride={stride}", "seq_len=2048"], ["model.attention.rope_scaling=ntk"], []),
        "ttt_sgd_lr0.005": (ttt, [], ["plain", "sliding"]),
        "ttt_phased_3": (ttt + ["ttt.phases=3", "ttt.phase_fraction=0.25"], [], ["plain", "sliding"]),
        # The records' per-document LoRA TTT (rank 80; Adam lr 1e-4, beta1 0, weight decay 0.5; 48-token chunks).
        "ttt_document_lora80": (["ttt.enabled=true", "ttt.scope=document", "ttt.params=lora", "ttt.lora_rank=80",
                                 "ttt.optimizer=adam", "ttt.lr=0.0001", "ttt.momentum=0", "ttt.weight_decay=0.5"],
                                [], ["plain", "sliding"]),
        "ttt_sgd_lr0.002": (ttt + ["ttt.lr=0.002"], [], ["plain", "sliding"]),
    }


DEFAULT = 5  # the first five variants fit the few minutes of GPU time; --only names others


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=".data/builtin_sp1024")
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="golf-baseline")
    parser.add_argument("--seconds", type=float, default=45.0, help="training wallclock cap")
    parser.add_argument("--steps", type=int, default=0, help="step cap instead (0: none)")
    parser.add_argument("--tokens-per-step", type=int, default=131_072)
    parser.add_argument("--stride", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=32_768)
    parser.add_argument("--only", nargs="*", default=None, help="variant names")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more config changes (CPU checks)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    micro = min(65_536, args.tokens_per_step)
    protocol = [f"data.out={args.data}", f"train.tokens_per_step={args.tokens_per_step}", f"train.micro_batch_tokens={micro}",
                f"train.max_wallclock_seconds={args.seconds}", f"train.max_steps={args.steps}", "train.val_every_steps=0",
                "train.warmup_steps=3", f"train.runs_root={out / 'runs'}", "name=eval-scores", *args.sets]
    started = time.perf_counter()
    summary = track.run(cfglib.resolve("pretrain", args.preset, protocol))
    result = {
        "benchmark": "eval_scores", "preset": args.preset, "protocol": protocol, **environment(),
        "training": {k: getattr(summary, k) for k in ("steps", "training_seconds", "compile_seconds", "val_bpb",
                                                      "val_loss", "val_bpb_pre_quant", "eval_seconds", "epochs")},
        "training_wall_seconds": round(time.perf_counter() - started, 1),
        "scores": {}, "errors": {},
    }
    print(f"trained: {summary.steps} steps, round-trip val_bpb {summary.val_bpb:.4f}", flush=True)
    chosen = args.only or list(variants(args.stride, args.chunk))[:DEFAULT]
    for name, (evals, sets, skip) in variants(args.stride, args.chunk).items():
        if name not in chosen:
            continue
        try:
            scored = score_run(summary.run_dir, None, None, eval_config(evals), sets, skip=skip)
            result["scores"][name] = {"eval": evals, "sets": sets, **scored["scores"]}
            line = "  ".join(f"{k} {v['val_bpb']:.4f} ({v['seconds']:.1f} s)" for k, v in scored["scores"].items())
            print(f"{name:28s} {line}", flush=True)
        except Exception as e:  # one failing variant must not lose the others
            result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    suffix = f"-{args.tag}" if args.tag else ""
    path = out / f"eval_scores-{device_tag()}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
