"""Greedy generation throughput on SmolLM2-135M-Instruct (bf16): the same 128 chat prompts
(gsm_symbolic test), up to 256 new tokens, one batch of 128, with `model.generate` defaults
(engine "hf"), our "loop" engine (DynamicCache), and our "static" engine eager and compiled
(CUDA graph of the decode step). Each engine gets one untimed warm-up call (compilation), then
`--repeats` timed calls; tokens/s counts the tokens kept in the completions (up to and
including EOS). Completions are compared token for token with the "hf" reference.

    PYTHONPATH=src python3 benchmarks/generate_throughput.py --out $OUT [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from underpar.data.sft import prompt_ids
from underpar.data.tasks import get_task
from underpar.eval.generate import DecodeConfig, GenerationStats, generate
from underpar.model import hf
from underpar.runs.rundir import device_tag, environment

VARIANTS = {  # name -> (engine, compile)
    "hf": ("hf", False),
    "loop": ("loop", False),
    "static": ("static", False),
    "static+compile": ("static", True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = hf.load_model("smollm2-135m", dtype="bf16" if torch.cuda.is_available() else None)
    task = get_task("gsm_symbolic")
    examples = task.load("test", limit=args.prompts)
    prompts = [prompt_ids(tokenizer, task.prompt_messages(e)) for e in examples]

    results, completions = {}, {}
    for name in args.variants:
        engine, compile_ = VARIANTS[name]
        cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, batch_size=len(prompts), engine=engine, compile=compile_)
        t0 = time.perf_counter()
        generate(model, tokenizer, prompts, cfg)  # warm-up: compilation, allocator, kernels
        warmup = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            stats = GenerationStats()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            completions[name] = generate(model, tokenizer, prompts, cfg, stats)
            runs.append({"seconds": stats.seconds, "generated_tokens": stats.generated_tokens,
                         "decode_steps": stats.decode_steps, "tokens_per_second": stats.tokens_per_second})
        best = max(runs, key=lambda r: r["tokens_per_second"])
        results[name] = {"engine": engine, "compile": compile_, "compiled": stats.compiled, "warmup_seconds": warmup,
                         "runs": runs, "tokens_per_second": best["tokens_per_second"], "seconds": best["seconds"],
                         "generated_tokens": best["generated_tokens"],
                         "finished": sum(c.finished for c in completions[name])}
        print(f"{name}: {best['tokens_per_second']:.0f} tokens/s ({best['seconds']:.2f} s, warm-up {warmup:.1f} s)", flush=True)

    reference = args.variants[0]
    for name in args.variants:
        results[name]["vs_" + reference] = compare(completions[reference], completions[name])
        results[name]["speedup_vs_" + reference] = results[name]["tokens_per_second"] / results[reference]["tokens_per_second"]
    record = {"benchmark": "generate_throughput", "model": "smollm2-135m", "dtype": str(next(model.parameters()).dtype),
              "prompts": len(prompts), "batch_size": len(prompts), "max_new_tokens": args.max_new_tokens,
              "prompt_tokens": sum(map(len, prompts)), "reference": reference, "results": results,
              "seconds": time.time() - started, **environment()}
    import transformers
    record["transformers"] = transformers.__version__
    path = out / f"generate_throughput-{device_tag()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    print(table(record))


def compare(reference: list, other: list) -> dict:
    """How many completions are identical token for token, and where the others first differ."""
    firsts = []
    for a, b in zip(reference, other, strict=True):
        if a.token_ids != b.token_ids:
            firsts.append(next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                               min(len(a.token_ids), len(b.token_ids))))
    return {"identical": len(reference) - len(firsts), "mismatches": len(firsts),
            "identical_text": sum(a.text == b.text for a, b in zip(reference, other)),
            "first_difference_positions": sorted(firsts)}


def table(record: dict) -> str:
    ref = record["reference"]
    lines = [f"| engine | tokens/s | seconds | generated tokens | speedup vs {ref} | identical to {ref} | first differences at |",
             "|---|---|---|---|---|---|---|"]
    for name, r in record["results"].items():
        c = r["vs_" + ref]
        where = ", ".join(map(str, c["first_difference_positions"][:8])) or "-"
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {r['seconds']:.2f} | {r['generated_tokens']} | "
                     f"{r['speedup_vs_' + ref]:.2f}x | {c['identical']}/{record['prompts']} | {where} |")
    lines.append(f"\n{record['device']}, torch {record['torch']}, transformers {record['transformers']}, "
                 f"{record['dtype']}, {record['prompts']} prompts x <= {record['max_new_tokens']} new tokens")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
