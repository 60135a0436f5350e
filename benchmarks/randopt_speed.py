"""RandOpt at the hardware's pace (issue 18), one process and one model load: SmolLM2-135M-Instruct,
`--prompts` chat prompts x <= `--max-new-tokens` greedy tokens per candidate.

- switch: whole-model switch to a new candidate, flat PerturbSpace (one launch) vs one launch
  per tensor (CUDA events, median of 20; and host wall clock incl. sync).
- candidates/s of `model.generate` (engine hf), today's engine (flat switch + the static engine
  with the compiled CUDA-graph decode step, what `underpar randopt` runs with decode.population=1)
  and the population engine (P candidates in one forward, stacked weights, one CUDA graph per
  step) for each P in --sizes and each of --variants,
  ATTENTION:GROUPS:BUCKET[:compact][:fuse][:prefill=ATTENTION] (the decoder's attention kernel,
  prompt-row groups, length bucket, finished-row compaction, Inductor-compiled layers, the
  prefill's attention kernel):
  `before` = matmul:1:64 (the engine of issue 18's first measurement: materialized scores,
  every row reads from slot 0, 64-slot buckets; measured fastest, the default again),
  `after` = sdpa_efficient:8:16 (the attention rework), `compact` = after + compaction,
  `fast` = fused_decode:1:64:fuse:prefill=sdpa_efficient (one-pass decode attention that skips
  finished candidates, compiled layers, SDPA prefill). Each
  engine gets an untimed warm-up (compile, graph capture); a variant that fails (out of
  memory, a kernel that cannot run) is recorded and skipped.
- reward equality: the candidates that every engine scored, by reward and completion digest
  (bf16: near-ties may split greedy paths); and in fp32 (a fresh fp32 load, --fp32-prompts x
  --fp32-tokens) token for token, the static engine eager vs the population engine.
- reproducibility: the population engine rescored with the chunk's candidates in another order
  (same process), and a child process (same command, --child, its own fresh Inductor cache) that
  rescores the population engine's first chunk at the largest P for each variant
  (and, with --child-static, today's engine compiled as today and in Inductor's deterministic
  mode, `decode.deterministic`): digests equal across processes or not.
- matmul form: on SmolLM2's linear shapes at the largest P, one decode step's matmuls as stacked
  per-candidate weights (bmm) vs the base read once plus a materialized sign matrix,
  x @ W0^T + s (x @ R^T).

    PYTHONPATH=src python3 benchmarks/randopt_speed.py --out $OUT   # ~5 min on one H200
    PYTHONPATH=src python3 benchmarks/randopt_speed.py --out /tmp/rs --model <tiny folder> --prompts 4 \\
        --max-new-tokens 8 --sizes 2 --static-candidates 2 --fp32-prompts 3 --fp32-tokens 6 --chunks 1   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from underpar.data.tasks import get_task
from underpar.eval.generate import DecodeConfig
from underpar.kernels.perturb_space import PerturbSpace
from underpar.model import hf
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.randopt_population import PopulationScorer
from underpar.tracks.randopt_search import Answerer, draw_population, score_candidate, tokenize_prompts

CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


REPEATS = 20 if CUDA else 1  # a CPU run is a smoke test: the torch hash path takes seconds per switch


def median_ms(fn, repeats: int = REPEATS) -> float:
    """CUDA-event time of fn (median), or wall time on a CPU."""
    fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def wall_ms(fn, repeats: int = REPEATS) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return 1e3 * (time.perf_counter() - t0) / repeats


def switch_times(model, flat: PerturbSpace) -> dict:
    per_tensor = PerturbSpace(model, flat=False)  # the same live tensors, one launch per tensor
    seeds = iter(range(1, 10**9))
    row = {"tensors": len(flat.names), "elements": flat.numel, "bytes": flat.base_bytes,
           "flat_ms": median_ms(lambda: flat.apply(next(seeds), 1e-3)),
           "flat_wall_ms": wall_ms(lambda: flat.apply(next(seeds), 1e-3)),
           "per_tensor_ms": median_ms(lambda: per_tensor.apply(next(seeds), 1e-3)),
           "per_tensor_wall_ms": wall_ms(lambda: per_tensor.apply(next(seeds), 1e-3)),
           "restore_ms": median_ms(flat.restore)}
    flat.apply(5, 1e-3)
    got = [p.detach().clone() for p in flat.params]
    per_tensor.apply(5, 1e-3)
    row["flat_equals_per_tensor"] = all(torch.equal(a, p) for a, p in zip(got, flat.params))
    flat.restore()
    return row


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def one_at_a_time(model, tokenizer, space, prompts, drawn, engine: str, compile_: bool, max_new: int,
                  deterministic: bool = False) -> dict:
    """Today's path: switch the live weights, decode the set with `engine` (untimed warm-up first)."""
    decode = DecodeConfig(max_new_tokens=max_new, batch_size=len(prompts.ids), engine=engine, compile=compile_,
                          deterministic=deterministic)
    answerer = Answerer(model, tokenizer, decode, len(prompts.ids))
    # hf compiles nothing: its first call is timed as it comes (the device is warm by then)
    _, warmup = timed(lambda: answerer.warm_up([prompts]) if engine != "hf" else None)
    rows, seconds = timed(lambda: [score_candidate(answerer, space, prompts, seed, sigma) for seed, sigma in drawn])
    space.restore()
    return {"engine": engine, "compile": compile_, "deterministic": deterministic, "candidates": len(drawn),
            "seconds": seconds, "warmup_seconds": warmup, "candidates_per_second": len(drawn) / seconds, "rows": rows}


VARIANT_ALIASES = {"before": "matmul:1:64", "after": "sdpa_efficient:8:16", "compact": "sdpa_efficient:8:16:compact",
                   "fast": "fused_decode:1:64:fuse:prefill=sdpa_efficient"}
VARIANT_FORM = "ATTENTION:GROUPS:BUCKET[:compact][:fuse][:prefill=ATTENTION]"


def variant(spec: str) -> dict:
    """VARIANT_FORM (or an alias) -> PopulationScorer keywords."""
    fields = VARIANT_ALIASES.get(spec, spec).split(":")
    options = fields[3:]
    prefill = [o.removeprefix("prefill=") for o in options if o.startswith("prefill=")]
    if len(fields) < 3 or not set(options) <= {"compact", "fuse", *(f"prefill={a}" for a in prefill)} or len(prefill) > 1:
        raise SystemExit(f"--variants: {spec!r} is not {VARIANT_FORM} or one of {list(VARIANT_ALIASES)}")
    return {"attention": fields[0], "groups": int(fields[1]), "bucket": int(fields[2]), "compact": "compact" in options,
            "fuse": "fuse" in options, "prefill_attention": (prefill or ["matmul"])[0]}


def population_engine(model, tokenizer, space, prompts, drawn, size: int, max_new: int, spec: str,
                      shuffle: bool = True) -> dict:
    decode = DecodeConfig(max_new_tokens=max_new, batch_size=len(prompts.ids), compile=True)
    scorer = PopulationScorer(model, tokenizer, space, decode, len(prompts.ids), size, "auto", [prompts],
                              **variant(spec))
    _, warmup = timed(lambda: scorer.score(drawn[:size], prompts))  # graph capture, allocator
    chunks = [drawn[k:k + size] for k in range(0, len(drawn), size)]
    stats = []
    rows, seconds = timed(lambda: [r for chunk in chunks for r in scorer.score(chunk, prompts, stats)])
    row = {"engine": f"population-{spec}-{size}", "variant": spec, **variant(spec), "size": size,
           "candidates": len(drawn), "seconds": seconds, "warmup_seconds": warmup,
           "candidates_per_second": len(drawn) / seconds, "decode_steps": sum(s.decode_steps for s in stats),
           "graphs": len(scorer.decoder._graphs), "compactions": scorer.decoder.compactions, "rows": rows}
    if CUDA:
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if shuffle:
        shuffled = drawn[:size][::-1]  # the same candidates in other slots, with other neighbours
        again = scorer.score(shuffled, prompts)[::-1]
        row["same_digests_in_other_slots"] = sum(a["digest"] == b["digest"] for a, b in zip(again, rows[:size]))
    return row


def free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()  # a decoder's caches and graphs go with it
        torch.cuda.reset_peak_memory_stats()


def agreement(a: list[dict], b: list[dict]) -> dict:
    n = min(len(a), len(b))
    return {"candidates": n, "same_reward": sum(a[i]["reward"] == b[i]["reward"] for i in range(n)),
            "same_digest": sum(a[i]["digest"] == b[i]["digest"] for i in range(n))}


def fp32_check(args, drawn) -> dict:
    """Token-for-token equality in fp32: static engine eager, one candidate at a time, vs the
    population engine in each variant."""
    model, tokenizer = hf.load_model(args.model, dtype="float32")
    prompts = load_prompts(tokenizer, args, args.fp32_prompts)
    space = PerturbSpace(model)
    decode = DecodeConfig(max_new_tokens=args.fp32_tokens, batch_size=len(prompts.ids), engine="static", compile=False)
    answerer = Answerer(model, tokenizer, decode, len(prompts.ids))
    singles = []
    for seed, sigma in drawn:
        space.apply(seed, sigma)
        singles.append(answerer.texts(prompts))
    space.restore()
    out = {"prompts": len(prompts.ids), "max_new_tokens": args.fp32_tokens, "candidates": len(drawn),
           "completions": len(drawn) * len(prompts.ids), "identical_completions": {}}
    for spec in args.variants:
        scorer = PopulationScorer(model, tokenizer, space, decode, len(prompts.ids), len(drawn), "auto", [prompts],
                                  **variant(spec))
        batched = scorer.texts(drawn, prompts)
        out["identical_completions"][spec] = sum(a == b for s, p in zip(singles, batched) for a, b in zip(s, p))
    return out


def matmul_forms(model, size: int, rows: int) -> dict:
    """One decode step's linear layers for `size` candidates x `rows` tokens: stacked weights (bmm)
    vs x @ W0^T + s (x @ R^T) with R materialized per candidate (bf16 +-1)."""
    c = model.config
    d, ff, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    shapes = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]
    dtype, dev = next(model.parameters()).dtype, next(model.parameters()).device
    out = {"size": size, "rows": rows, "layers": c.num_hidden_layers, "shapes": shapes}
    stacked_ms = base_once_ms = 0.0
    for o, i in shapes:
        x = torch.randn(size, rows, i, dtype=dtype, device=dev)
        w = torch.randn(size, o, i, dtype=dtype, device=dev)
        w0, r = w[0], torch.sign(torch.randn(size, o, i, device=dev)).to(dtype)
        s = torch.full((size, 1, 1), 1e-3, dtype=dtype, device=dev)
        stacked_ms += median_ms(lambda: torch.bmm(x, w.transpose(1, 2)))
        base_once_ms += median_ms(lambda: (x.view(-1, i) @ w0.t()).view(size, rows, o) + s * torch.bmm(x, r.transpose(1, 2)))
    out["stacked_ms_per_step"] = stacked_ms * c.num_hidden_layers
    out["base_once_materialized_ms_per_step"] = base_once_ms * c.num_hidden_layers
    return out


def load_prompts(tokenizer, args, count: int):
    examples = get_task(args.task).load(args.split, limit=count)
    return tokenize_prompts(tokenizer, args.task, examples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="gsm_symbolic")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32],
                        help="population engine: candidates per forward (64 does not fit an H200 at 128 x 256)")
    parser.add_argument("--variants", nargs="+", default=["before", "fast"],
                        help=f"population engine settings {VARIANT_FORM}, or an alias: "
                        + ", ".join(f"{k} ({v})" for k, v in VARIANT_ALIASES.items()))
    parser.add_argument("--chunks", type=int, default=1, help="timed chunks per population size")
    parser.add_argument("--static-candidates", type=int, default=2)
    parser.add_argument("--deterministic-static", action="store_true",
                        help="also time today's engine in Inductor's deterministic mode (~40 s more)")
    parser.add_argument("--child-static", action="store_true",
                        help="the child also rescores today's engine, both modes (~90 s more)")
    parser.add_argument("--hf-candidates", type=int, default=1)
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--fp32-prompts", type=int, default=32)
    parser.add_argument("--fp32-tokens", type=int, default=64)
    parser.add_argument("--no-child", action="store_true", help="skip the cross-process reproducibility check")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # a fresh Inductor cache per process: a shared one would hand the child the parent's tuning choices
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="randopt-speed-inductor-")
    started = time.time()
    model, tokenizer = hf.load_model(args.model)
    prompts = load_prompts(tokenizer, args, args.prompts)
    space = PerturbSpace(model)  # flat: before any decoder captures parameter addresses
    for spec in args.variants:
        variant(spec)  # a bad spec fails here, before any work
    drawn = draw_population(max(args.sizes) * args.chunks, [args.sigma], 0)
    n_static = min(args.static_candidates, len(drawn))
    static_modes = [("static", False)] + [("static-deterministic", True)] * args.deterministic_static
    if args.child:  # rescore in a fresh process: the largest population's first chunk (and today's engine)
        rows = {}
        for name, det in static_modes if args.child_static else []:
            rows[name] = one_at_a_time(model, tokenizer, space, prompts, drawn[:n_static], "static", CUDA,
                                       args.max_new_tokens, deterministic=det)["rows"]
        size = max(args.sizes)
        for spec in args.variants:
            rows[f"population-{spec}-{size}"] = population_engine(
                model, tokenizer, space, prompts, drawn[:size], size, args.max_new_tokens, spec, shuffle=False)["rows"]
            free_memory()
        (out / "child.json").write_text(json.dumps(rows))
        return
    record = {"benchmark": "randopt_speed", "model": args.model, "task": args.task, "split": args.split,
              "prompts": len(prompts.ids), "max_new_tokens": args.max_new_tokens, "sigma": args.sigma,
              "dtype": str(space.params[0].dtype), "load_seconds": time.time() - started, **environment()}
    path = out / f"randopt_speed-{device_tag()}.json"

    def save(stage: str) -> None:
        record["seconds"] = time.time() - started
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{stage} done at {record['seconds']:.0f} s", flush=True)

    record["switch"] = switch_times(model, space)
    save("switch")
    engines = {}
    if args.hf_candidates:
        engines["generate"] = one_at_a_time(model, tokenizer, space, prompts, drawn[:args.hf_candidates], "hf", False,
                                            args.max_new_tokens)
        save("model.generate")
    for name, det in static_modes:
        engines[name] = one_at_a_time(model, tokenizer, space, prompts, drawn[:n_static], "static", CUDA,
                                      args.max_new_tokens, deterministic=det)
        save(name)
    record["engines"] = engines
    for size in args.sizes:
        for spec in args.variants:
            try:
                engines[f"population-{spec}-{size}"] = population_engine(
                    model, tokenizer, space, prompts, drawn[:size * args.chunks], size, args.max_new_tokens, spec,
                    shuffle=spec != "before")
            except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
                record.setdefault("failed", {})[f"population-{spec}-{size}"] = f"{type(e).__name__}: {str(e)[:300]}"
            free_memory()
            save(f"population {spec} {size}")
    record["agreement_vs_static"] = {name: agreement(engines["static"]["rows"], e["rows"]) for name, e in engines.items()}
    record["agreement_vs_before"] = {name: agreement(engines[f"population-before-{e['size']}"]["rows"], e["rows"])
                                     for name, e in engines.items()
                                     if "size" in e and f"population-before-{e['size']}" in engines}
    record["matmul_forms"] = matmul_forms(model, max(args.sizes), len(prompts.ids))
    save("matmul forms")
    del model, space
    if CUDA:
        torch.cuda.empty_cache()
    record["fp32"] = fp32_check(args, drawn[:min(4, len(drawn))])
    save("fp32 check")
    if not args.no_child:
        child_out = out / "child"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", "--out", str(child_out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=os.environ.copy())
        if proc.returncode == 0:
            child = json.loads((child_out / "child.json").read_text())
            record["cross_process"] = {name: agreement(engines[name]["rows"], rows) for name, rows in child.items()}
        else:
            record["cross_process"] = {"error": proc.stderr[-2000:]}
        save("child process")
    print(f"wrote {path}")
    print(table(record))


def table(r: dict) -> str:
    s = r["switch"]
    lines = [f"switch ({s['tensors']} tensors, {s['elements'] / 1e6:.1f}M elements): flat {s['flat_ms']:.3f} ms "
             f"(wall {s['flat_wall_ms']:.3f}), per tensor {s['per_tensor_ms']:.3f} ms (wall {s['per_tensor_wall_ms']:.3f}), "
             f"restore {s['restore_ms']:.3f} ms; bit-equal {s['flat_equals_per_tensor']}", "",
             "| engine | candidates | seconds | candidates/s | speedup vs generate | same reward / digest as today's "
             "| same reward / digest as before |", "|---|---|---|---|---|---|---|"]
    ref = r["engines"].get("generate", r["engines"]["static"])["candidates_per_second"]
    for name, e in r["engines"].items():
        a, b = r["agreement_vs_static"][name], r.get("agreement_vs_before", {}).get(name)
        vs_before = f"{b['same_reward']}/{b['candidates']} / {b['same_digest']}/{b['candidates']}" if b else ""
        lines.append(f"| {name} | {e['candidates']} | {e['seconds']:.2f} | {e['candidates_per_second']:.3f} | "
                     f"{e['candidates_per_second'] / ref:.1f}x | {a['same_reward']}/{a['candidates']} / "
                     f"{a['same_digest']}/{a['candidates']} | {vs_before} |")
    m = r["matmul_forms"]
    lines.append(f"\nmatmuls per decode step, P={m['size']} x {m['rows']} rows: stacked bmm {m['stacked_ms_per_step']:.2f} ms, "
                 f"base once + materialized R {m['base_once_materialized_ms_per_step']:.2f} ms")
    f = r["fp32"]
    lines.append(f"fp32: completions identical to one at a time, of {f['completions']}: {f['identical_completions']}")
    for name, error in r.get("failed", {}).items():
        lines.append(f"failed: {name}: {error}")
    if "cross_process" in r:
        lines.append(f"cross-process: {json.dumps(r['cross_process'])[:300]}")
    lines.append(f"{r['device']}, torch {r['torch']}, {r['dtype']}, {r['seconds']:.0f} s in all")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
