"""The population engine's one-pass decode attention (kernels/decode_attention.py) at SmolLM2's decode
shape, P = 32 candidates x 128 prompt rows (96 heads of 3 query rows per row, head size 64), rows'
first valid slots spread like gsm_symbolic's prompts (0-113), the current token 16 slots before
the length bucket's end: ms per layer call (CUDA events, median) and the rate at which it reads
the K and V it must read, for each kernel setting (BLOCK_L, STAGES, num_warps), against the
materialized-score reference.

    PYTHONPATH=src python3 benchmarks/decode_attention.py --out $OUT   # ~1 min on one H200
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from underpar.kernels import decode_attention as da
from underpar.runs.rundir import device_tag, environment
from randopt_speed import median_ms  # noqa: E402 - the scripts' folder is on the path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--heads", type=int, default=96)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 384, 480])
    args = parser.parse_args()
    if not torch.cuda.is_available() or da.triton is None:
        raise SystemExit("needs CUDA and Triton")
    n, H, M, D, cache = args.rows, args.heads, 3, 64, max(args.lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(n, H, M, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(n, H, cache, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    first = torch.linspace(0, 113, n, device="cuda").long()
    record = {"benchmark": "decode_attention", "rows": n, "heads": H, "query_rows": M, "head_dim": D,
              **environment(), "lengths": {}}
    settings = list(itertools.product([32, 64, 128], [1, 2, 3], [2, 4, 8]))
    default = dict(da.CONFIG)
    for L in args.lengths:
        slots = torch.arange(L, device="cuda")
        allowed = (slots[None, :] >= first[:, None]) & (slots[None, :] <= L - 16)
        mask = torch.zeros(n, L, device="cuda", dtype=torch.bfloat16).masked_fill_(~allowed, float("-inf"))[:, None, None]
        k, v = k_cache[:, :, :L], v_cache[:, :, :L]
        read = int(allowed.sum()) * H * D * 2 * 2  # K and V bytes of the allowed slots
        want = da.decode_attention_reference(q, k, v, mask)
        rows = {"reference_ms": median_ms(lambda: da.decode_attention_reference(q, k, v, mask)), "settings": []}
        for block, stages, warps in settings:
            da.CONFIG.update(BLOCK_L=block, STAGES=stages, num_warps=warps)
            try:
                got = da.decode_attention(q, k, v, mask)
                ms = median_ms(lambda: da.decode_attention(q, k, v, mask))
            except Exception as e:  # noqa: BLE001 - a setting that cannot compile is recorded
                rows["settings"].append({"BLOCK_L": block, "STAGES": stages, "num_warps": warps, "error": str(e)[:200]})
                continue
            err = (got.float() - want.float()).abs().max().item()
            rows["settings"].append({"BLOCK_L": block, "STAGES": stages, "num_warps": warps, "ms": ms,
                                     "tb_per_s": read / ms / 1e9, "max_abs_err": err})
        da.CONFIG.clear()
        da.CONFIG.update(default)
        best = min((r for r in rows["settings"] if "ms" in r), key=lambda r: r["ms"])
        rows["best"] = best
        record["lengths"][L] = rows
        print(L, f"reference {rows['reference_ms']:.2f} ms", "best", json.dumps(best), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"decode_attention-{device_tag()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
