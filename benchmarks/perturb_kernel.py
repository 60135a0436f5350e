"""GPU benchmark of the fused sign-perturbation kernel (RandOpt weight switching): bit-exactness
against the torch reference, then bf16 timings at 50M and 200M elements and on the parameter
shapes of SmolLM2-135M, against the materialized baselines and a device copy of the same bytes.

    PYTHONPATH=src python3 benchmarks/perturb_kernel.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from underpar.kernels import perturb as P
from underpar.kernels.perturb_space import PerturbSpace

DEVICE = "cuda"
SIGMA = 1e-3
SEED = 7
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def median_ms(fn) -> float:
    fn()  # compile / allocate outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def wall_ms(fn, repeats: int = 20) -> float:
    """Host wall clock of fn + synchronize: what a seed switch costs the caller."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def correctness() -> dict:
    """Triton == torch reference bit for bit (outputs poisoned with NaN first)."""
    failures, cases = [], 0
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for dtype in DTYPES:
        for n in [1, 4097, 3_000_001]:
            for start in [0, 2**32 - 1000, 3 * 2**32 + 17]:
                base = (torch.randn(n, device=DEVICE, generator=gen) * 3).to(dtype)
                for terms in ([(0, 1e-3)], [(2**32 - 1, 0.1234567)], [(5, 1e-2), (6, -3e-3)]):
                    ref = torch.full_like(base, float("nan"))
                    got = torch.full_like(base, float("nan"))
                    P.perturb(base, ref, terms, start, backend="torch")
                    P.perturb(base, got, terms, start, backend="triton")
                    cases += 1
                    if not torch.equal(bits(got), bits(ref)):
                        failures.append(f"{dtype} n={n} start={start} terms={terms}")
    start, n = 2**32 - 50_000, 100_001  # GPU kernel signs == CPU reference signs
    got = torch.full((n,), float("nan"), device=DEVICE)
    P.perturb_triton(torch.zeros(n, device=DEVICE), got, 77, 1.0, start)
    cases += 1
    if not torch.equal(got.cpu(), P.signs_torch(77, start, n)):
        failures.append("GPU signs != CPU reference signs")
    return {"pass": not failures, "cases": cases, "failures": failures}


def flat_case(n: int) -> dict:
    base = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)
    param = base.clone()

    def materialized_signs():  # noise tensor from the torch reference, add, restore by copy
        noise = P.signs_torch(SEED, 0, n, device=DEVICE, dtype=torch.bfloat16)
        param.add_(SIGMA * noise)
        param.copy_(base)

    def materialized_randn():  # upstream RandOpt: randn perturb, then regenerate and subtract
        g = torch.Generator(device=DEVICE)
        g.manual_seed(SEED)
        param.add_(SIGMA * torch.randn(n, device=DEVICE, dtype=torch.bfloat16, generator=g))
        g.manual_seed(SEED)
        param.add_(-SIGMA * torch.randn(n, device=DEVICE, dtype=torch.bfloat16, generator=g))

    row = {
        "elements": n,
        "fused_ms": median_ms(lambda: P.perturb_triton(base, param, SEED, SIGMA, 0)),
        "fused_two_seed_ms": median_ms(lambda: P.perturb2_triton(base, param, 1, SIGMA, 2, SIGMA, 0)),
        "materialized_signs_ms": median_ms(materialized_signs),
        "materialized_randn_ms": median_ms(materialized_randn),
        "copy_ms": median_ms(lambda: param.copy_(base)),
    }
    return row  # base and param are freed with this frame (the allocator reuses their blocks)


def smollm2_135m_shapes() -> dict[str, tuple[int, ...]]:
    """Llama layout, 30 layers, d=576, MLP 1536, 9 heads / 3 KV heads of 64, vocab 49152, tied."""
    d, ff, kv, vocab = 576, 1536, 3 * 64, 49152
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(30):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
            p + "mlp.down_proj.weight": (d, ff),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        }
    return shapes


def model_case() -> dict:
    params = {name: torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 0.02
              for name, shape in smollm2_135m_shapes().items()}
    space = PerturbSpace(params, flat=False)  # one launch per tensor
    flat_space = PerturbSpace({name: p.clone() for name, p in params.items()})  # one launch in all
    flat_base = torch.randn(space.numel, device=DEVICE, dtype=torch.bfloat16)
    flat = flat_base.clone()
    seeds = iter(range(10**9))

    def randn_per_tensor():
        g = torch.Generator(device=DEVICE)
        for p in space.params:
            g.manual_seed(SEED)
            p.add_(SIGMA * torch.randn(p.shape, device=DEVICE, dtype=p.dtype, generator=g))
            g.manual_seed(SEED)
            p.add_(-SIGMA * torch.randn(p.shape, device=DEVICE, dtype=p.dtype, generator=g))

    row = {
        "tensors": len(space.names),
        "elements": space.numel,
        "base_bytes": space.base_bytes,
        "apply_ms": median_ms(lambda: space.apply(SEED, SIGMA)),
        "apply_wall_ms": wall_ms(lambda: space.apply(next(seeds), SIGMA)),
        "apply_two_seed_ms": median_ms(lambda: space.apply_combination([(1, SIGMA / 2), (2, SIGMA / 2)])),
        "restore_ms": median_ms(space.restore),
        "flat_apply_ms": median_ms(lambda: flat_space.apply(SEED, SIGMA)),
        "flat_apply_wall_ms": wall_ms(lambda: flat_space.apply(next(seeds), SIGMA)),
        "flat_restore_ms": median_ms(flat_space.restore),
        "single_launch_ms": median_ms(lambda: P.perturb_triton(flat_base, flat, SEED, SIGMA, 0)),
        "materialized_randn_ms": median_ms(randn_per_tensor),
        "copy_ms": median_ms(lambda: flat.copy_(flat_base)),
    }
    return row


def gbps(elements: int, ms: float, bytes_per_element: int = 4) -> float:
    return elements * bytes_per_element / (ms * 1e-3) / 1e9


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--sizes", default="50000000,200000000")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    found = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", name.upper().replace("NVIDIA", ""))
    gpu = found.group(1).lower() if found else "cuda"

    check = correctness()
    print(f"correctness (triton == torch, bit for bit, {check['cases']} cases): "
          f"{'PASS' if check['pass'] else 'FAIL'}", *check["failures"], sep="\n  ")
    flat_rows = [flat_case(int(n)) for n in args.sizes.split(",")]
    model = model_case()
    for row in flat_rows:
        row["fused_gbps"] = gbps(row["elements"], row["fused_ms"])
        row["copy_gbps"] = gbps(row["elements"], row["copy_ms"])
    for key in ["apply", "single_launch", "copy"]:
        model[f"{key}_gbps"] = gbps(model["elements"], model[f"{key}_ms"])
    result = {
        "benchmark": "perturb_kernel", "device": name, "gpu": gpu, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "commit": commit(),
        "sigma": SIGMA, "dtype": "bfloat16", "block": P.BLOCK, "correctness": check,
        "flat": flat_rows, "smollm2_135m": model,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"perturb_kernel-{gpu}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}\n")

    print(f"| {name} bf16 | fused ms | GB/s (r+w) | % of copy | two-seed ms | signs+add+copy ms "
          "| randn x2 ms | speedup vs signs | speedup vs randn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in flat_rows:
        print(f"| {r['elements'] / 1e6:.0f}M flat | {r['fused_ms']:.3f} | {r['fused_gbps']:.0f} "
              f"| {100 * r['fused_gbps'] / r['copy_gbps']:.0f}% | {r['fused_two_seed_ms']:.3f} "
              f"| {r['materialized_signs_ms']:.2f} | {r['materialized_randn_ms']:.2f} "
              f"| {r['materialized_signs_ms'] / r['fused_ms']:.1f}x "
              f"| {r['materialized_randn_ms'] / r['fused_ms']:.1f}x |")
    m = model
    print(f"\nSmolLM2-135M shapes ({m['tensors']} tensors, {m['elements'] / 1e6:.1f}M elements, "
          f"base copy {m['base_bytes'] / 2**20:.0f} MiB):\n")
    print("| switch | ms | GB/s (r+w) |\n|---|---|---|")
    for label, key in [("apply, one launch per tensor (events)", "apply_ms"),
                       ("apply, host wall clock incl. sync", "apply_wall_ms"),
                       ("apply two-seed combination", "apply_two_seed_ms"),
                       ("same elements, one flat launch", "single_launch_ms"),
                       ("restore (copy per tensor)", "restore_ms"),
                       ("apply, flat PerturbSpace: one launch (events)", "flat_apply_ms"),
                       ("apply, flat PerturbSpace, host wall clock incl. sync", "flat_apply_wall_ms"),
                       ("restore, flat PerturbSpace (one copy)", "flat_restore_ms"),
                       ("upstream randn perturb+restore per tensor", "materialized_randn_ms"),
                       ("device copy of the same bytes", "copy_ms")]:
        gb = f"{m[key.replace('_ms', '_gbps')]:.0f}" if key.replace("_ms", "_gbps") in m else ""
        print(f"| {label} | {m[key]:.3f} | {gb} |")
    print(f"\ncorrectness: {'PASS' if check['pass'] else 'FAIL'}")
    if not check["pass"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
