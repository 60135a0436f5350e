"""Where the population engine's decode step spends its time (issue 18). SmolLM2-135M's shape with
random weights (no download), --size candidates x --rows prompts of gsm_symbolic's chat-prompt
lengths (99-212 tokens, SmolLM2's tokenizer), --new-tokens greedy steps. Per variant (randopt_speed.py's
form, ATTENTION:GROUPS:BUCKET[:compact][:fuse][:prefill=ATTENTION], or its aliases):

- the CUDA-graph decode step (median of --repeats replays, CUDA events) at three cache lengths,
  the prompt's end, half way and the end, as the engine's length buckets round them;
- the decode time of one chunk predicted from those (linear in the length), the number to set
  against randopt_speed.py's measured seconds per chunk;
- the prefill and one whole chunk (prefill + --new-tokens steps, no EOS) timed end to end, and
  the greedy tokens of one step against the first variant's (same weights and prompts);
- with --profile, torch.profiler's kernel tables of a step at the half-way length and of the
  prefill, for every variant: which kernels take the time.

And the bytes floor: the KV cache slots and weights a step must read, at the device's copy rate.

    PYTHONPATH=src python3 benchmarks/randopt_step_profile.py --out $OUT [--size 32] [--rows 128] [--profile]
    PYTHONPATH=src python3 benchmarks/randopt_step_profile.py --out /tmp/sp --size 2 --rows 4 --layers 2 \\
        --new-tokens 32 --repeats 2 --profile   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from underpar.eval.generate import DecodeConfig
from underpar.kernels.perturb_space import PerturbSpace
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.randopt_population import ALIGN, PopulationDecoder
from randopt_speed import variant  # noqa: E402 - the scripts' folder is on the path

CUDA = torch.cuda.is_available()
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               max_position_embeddings=8192)
VARIANTS = ["matmul:1:64", "fused_decode:1:64", "fused_decode:1:64:fuse", "fused_decode:1:64:fuse:prefill=sdpa_efficient"]


def prompt_lengths(rows: int, shortest: int = 99, longest: int = 212) -> list[int]:
    """Longest first, evenly spread over gsm_symbolic's range (the engine sorts a batch so)."""
    return [round(longest - (longest - shortest) * r / max(1, rows - 1)) for r in range(rows)]


def timed_step(decoder: PopulationDecoder, length: int, repeats: int) -> float:
    """Median ms of one decode step reading `length` cache slots (graph replay on CUDA)."""
    decoder.slot.fill_(length - 1)
    decoder._replay(length)  # capture
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decoder._replay(length)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            decoder._replay(length)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernel_table(fn, *args, top: int = 25) -> list[dict]:
    """The kernels of 3 calls of fn(*args) (eager), per call."""
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * CUDA
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            fn(*args)
        if CUDA:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if CUDA and device_us and not e.key.startswith("aten::"):  # kernels, not the ops that launch them
            rows.append({"kernel": e.key[:160], "calls": e.count // 3, "ms_per_call": device_us / 3e3})
        elif not CUDA and e.key.startswith("aten::"):
            rows.append({"kernel": e.key, "calls": e.count // 3, "ms_per_call": e.self_cpu_time_total / 3e3})
    return sorted(rows, key=lambda r: -r["ms_per_call"])[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    device = "cuda" if CUDA else "cpu"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": args.layers}))
    model = model.to(device, torch.bfloat16 if CUDA else torch.float32).eval()
    space = PerturbSpace(model)
    lengths = prompt_lengths(args.rows)
    W = lengths[0]
    max_len = -(-(W + args.new_tokens) // ALIGN) * ALIGN
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.rows, W), device=device)
    mask = torch.arange(W, device=device)[None, :] >= torch.tensor([W - n for n in lengths], device=device)[:, None]
    c = model.config
    kv_bytes_per_slot = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * space.params[0].element_size()
    record = {"benchmark": "randopt_step_profile", "shape": "smollm2-135m (random weights)", "size": args.size,
              "rows": args.rows, "prompt_tokens": {"min": min(lengths), "max": W, "mean": statistics.mean(lengths)},
              "new_tokens": args.new_tokens, "layers": args.layers, **environment(), "variants": {}}
    path = out / f"randopt_step_profile-{device_tag()}.json"
    reference = None  # the first variant's greedy tokens of the third step
    for spec in args.variants:
        settings = variant(spec)
        bucket = settings["bucket"]
        fuse = "inductor" if settings.pop("fuse") and CUDA else None
        decoder = PopulationDecoder(model, space, args.size, args.rows, max_len, graphs=CUDA, fuse=fuse, **settings)
        decoder.load([[(seed, 1e-3)] for seed in range(args.size)])
        with torch.no_grad():
            decoder.decode(ids, mask, [], 0, DecodeConfig(max_new_tokens=2), None)  # prefill, the row groups' starts
            decoder.slot.fill_(W + 1)  # the third token's step, eager: its greedy tokens against the first variant's
            tokens = decoder._step(min(max_len, -(-(W + 2) // 64) * 64))[0]
            agree = None if reference is None else (tokens == reference).float().mean().item()
            reference = tokens if reference is None else reference
            points = sorted({min(max_len, -(-(W + t) // bucket) * bucket)
                             for t in (1, args.new_tokens // 2, args.new_tokens)})
            steps_ms = {n: timed_step(decoder, n, args.repeats) for n in points}
            # one chunk's decode: every step t reads the bucket-rounded W + t slots
            predicted = sum(_interpolate(steps_ms, min(max_len, -(-(W + t) // bucket) * bucket))
                            for t in range(1, args.new_tokens)) / 1e3
            prefill = _seconds(decoder._prefill, ids, mask)
            chunk = _seconds(decoder.decode, ids, mask, [], 0, DecodeConfig(max_new_tokens=args.new_tokens), None)
            row = {"steps_ms": steps_ms, "predicted_decode_seconds": predicted, "graphs": len(decoder._graphs),
                   "prefill_seconds": prefill, "chunk_seconds": chunk, "tokens_equal_to_first_variant": agree}
            if args.profile:
                decoder.slot.fill_(points[len(points) // 2] - 1)
                row["kernels"] = kernel_table(decoder._step, points[len(points) // 2])
                row["prefill_kernels"] = kernel_table(decoder._prefill, ids, mask)
        # the bytes a step must read at the half-way length: K and V of every row from its group's start, the weights
        half = points[len(points) // 2]
        starts = decoder._starts
        rows_per_group = -(-args.rows // len(starts))
        slots = sum(min(rows_per_group, args.rows - g * rows_per_group) * (half - s) for g, s in enumerate(starts))
        row["bytes_per_step"] = {"kv": slots * args.size * args.layers * kv_bytes_per_slot,
                                 "weights": args.size * space.numel * space.params[0].element_size()}
        record["variants"][spec] = row
        print(spec, json.dumps({k: v for k, v in row.items() if not k.endswith("kernels")}), flush=True)
        for part in ("kernels", "prefill_kernels"):
            for k in row.get(part, [])[:12]:
                print(f"  {part[:7]} {k['ms_per_call']:8.3f} ms  {k['calls']:5d}x  {k['kernel'][:100]}", flush=True)
        del decoder
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


def _seconds(fn, *args) -> float:
    if CUDA:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    if CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _interpolate(points: dict[int, float], n: int) -> float:
    xs = sorted(points)
    lo = max([x for x in xs if x <= n], default=xs[0])
    hi = min([x for x in xs if x >= n], default=xs[-1])
    return points[lo] if hi == lo else points[lo] + (points[hi] - points[lo]) * (n - lo) / (hi - lo)


if __name__ == "__main__":
    main()
