"""GPU benchmark of the fused softcapped cross-entropy and the preallocated train loader, every
variant in one process.

Loss: forward + backward of cap * tanh(x / cap) -> mean cross-entropy at the golf shape
(65,536 tokens of bf16 logits, V = 1024 and 8192): eager torch and compiled torch as the model
computes it today (softcap in the logits' dtype, then F.cross_entropy on .float()), and the
Triton kernel (eager and inside torch.compile); once on the logits alone and once with the
tied-head matmul in front (hidden [N, 512] @ W[V, 512]^T), as in the model. Median ms of
--reps after warm-up, and the peak memory above the inputs. Loader: host ms per next_batch of
65,536 tokens, the old path (concatenate, astype, pageable .to(cuda)) against the new one
(pinned double buffer, asynchronous copy), with the GPU idle and with the stream busy.

    PYTHONPATH=src python3 benchmarks/ce_kernel.py --out $OUT [--data .data/builtin_sp1024]
    PYTHONPATH=src python3 benchmarks/ce_kernel.py --out /tmp/ce --tokens 512 --reps 3   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from underpar.data.config import DataConfig
from underpar.data.dataset import PreparedData
from underpar.kernels import softcap_ce as S
from underpar.model.embeddings import softcap
from underpar.runs.rundir import device_tag, environment

CAP = 30.0
MODEL_DIM = 512


def today(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GPT.forward's loss: softcap in the compute dtype, then fp32 cross-entropy."""
    return F.cross_entropy(softcap(logits, CAP).float(), targets, reduction="mean")


def fused(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return S.softcap_cross_entropy(logits, targets, CAP)


def with_head(loss_fn: Callable) -> Callable:
    def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(F.linear(hidden, weight), targets)
    return head_loss


def variants(part: str, with_fused: bool) -> dict[str, Callable]:
    """torch_eager, torch_compiled (the model today), fused_eager, fused_compiled."""
    losses = {"torch": today, "fused": fused} if with_fused else {"torch": today}
    out = {}
    for name, loss_fn in losses.items():
        fn = loss_fn if part == "loss" else with_head(loss_fn)
        out[f"{name}_eager"] = fn
        out[f"{name}_compiled"] = torch.compile(fn, fullgraph=True, dynamic=False)
    return out


def timed(fn: Callable, reps: int, warmup: int, cuda: bool) -> list[float]:
    times = []
    for i in range(warmup + reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            started = time.perf_counter()
            fn()
            ms = 1000 * (time.perf_counter() - started)
        if i >= warmup:
            times.append(ms)
    return times


def loss_rows(tokens: int, vocab: int, reps: int, warmup: int, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator(device=device).manual_seed(vocab)
    hidden = torch.randn(tokens, MODEL_DIM, device=device, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, MODEL_DIM, device=device, generator=g) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    logits = F.linear(hidden, weight).detach().requires_grad_()  # std ~1.1, like a trained head
    # Exact answer for the error columns: fp64 softcap + cross-entropy on the same bf16 logits.
    exact = logits.detach().double().requires_grad_()
    want = F.cross_entropy(softcap(exact, CAP), targets)
    want.backward()
    with_fused = not cuda or S.triton_available()  # on the CPU the op runs its torch reference
    torch._dynamo.reset()  # each vocabulary compiles afresh, far from the recompile limit
    rows = []
    for part in ("loss", "head+loss"):
        inputs = [logits] if part == "loss" else [hidden, weight]
        for name, fn in variants(part, with_fused).items():
            row = {"part": part, "variant": name, "tokens": tokens, "vocab": vocab, "dtype": str(dtype)}
            try:
                def step(fn=fn):
                    for t in inputs:
                        t.grad = None
                    fn(*inputs, targets).backward()

                def forward(fn=fn):
                    fn(*inputs, targets)

                step()
                if part == "loss":
                    loss = fn(logits, targets)
                    row["loss_abs_error"] = abs(float(loss) - float(want))
                    row["grad_max_abs_error"] = float((logits.grad.double() - exact.grad).abs().max())
                if cuda:  # above the inputs: their old gradients are dropped before the baseline
                    for t in inputs:
                        t.grad = None
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    torch.cuda.synchronize()
                    row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                times = timed(step, reps, warmup, cuda)
                row["fwd_bwd_median_ms"] = statistics.median(times)
                row["fwd_median_ms"] = statistics.median(timed(forward, reps, warmup, cuda))
            except Exception as e:  # a variant that fails is recorded; the rest still run
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                row["traceback"] = traceback.format_exc()[-3000:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for part in ("loss", "head+loss"):
        ref = next((r for r in rows if r["part"] == part and r["variant"] == "torch_compiled"), {})
        for r in rows:
            if r["part"] == part and "fwd_bwd_median_ms" in r and "fwd_bwd_median_ms" in ref:
                r["speedup_vs_torch_compiled"] = ref["fwd_bwd_median_ms"] / r["fwd_bwd_median_ms"]
    return rows


KERNEL_CONFIGS = [(4096, 4096, 8), (2048, 2048, 4), (4096, 4096, 4), (8192, 4096, 8), (8192, 8192, 16),
                  (16384, 8192, 16)]  # (ELEMENTS_PER_PROGRAM, MAX_BLOCK_V, NUM_WARPS); the first is the default


def kernel_config_rows(tokens: int, vocab: int, reps: int, warmup: int) -> list[dict]:
    """fwd+bwd of the kernel alone under other launch shapes, to pick the defaults."""
    g = torch.Generator(device="cuda").manual_seed(vocab)
    logits = torch.randn(tokens, vocab, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    default = (S.ELEMENTS_PER_PROGRAM, S.MAX_BLOCK_V, S.NUM_WARPS)
    rows = []
    for config in KERNEL_CONFIGS:
        S.ELEMENTS_PER_PROGRAM, S.MAX_BLOCK_V, S.NUM_WARPS = config

        def step():
            logits.grad = None
            fused(logits, targets).backward()

        row = {"part": "kernel_config", "vocab": vocab, "tokens": tokens, "elements_per_program": config[0],
               "max_block_v": config[1], "num_warps": config[2],
               "fwd_bwd_median_ms": statistics.median(timed(step, reps, warmup, True))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    S.ELEMENTS_PER_PROGRAM, S.MAX_BLOCK_V, S.NUM_WARPS = default
    return rows


def old_next_batch(loader, tokens: int, seq_len: int, device: torch.device):
    """The loader before preallocation: per-piece views, concatenate, astype, two pageable copies."""
    span = tokens + 1
    loader._skip(loader.rank * span)
    pieces = [loader._tokens(i)[a : a + k] for i, a, k in loader._pieces(span)]
    loader._skip((loader.world_size - loader.rank - 1) * span)
    local = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
    x, y = local[:-1].reshape(-1, seq_len), local[1:].reshape(-1, seq_len)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def loader_rows(data: str, tokens: int, seq_len: int, reps: int, device: torch.device) -> list[dict]:
    prepared = PreparedData.open(DataConfig(out=data))
    cuda = device.type == "cuda"
    size = 4096 if cuda else 64
    busy = torch.randn(size, size, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    rows = []
    for gpu_state in ("idle", "busy"):
        for name in ("old", "new"):
            loader = prepared.train_loader()
            host_ms = []
            for i in range(reps + 5):
                if gpu_state == "busy":  # ~5 ms of queued work (H200) the copy must wait behind
                    for _ in range(24):
                        busy = torch.tanh(busy @ busy * (1 / size))
                started = time.perf_counter()
                if name == "old":
                    x, y = old_next_batch(loader, tokens, seq_len, device)
                else:
                    x, y = loader.next_batch(tokens, seq_len, device=device)
                elapsed = 1000 * (time.perf_counter() - started)
                if cuda:
                    torch.cuda.synchronize()
                if i >= 5:
                    host_ms.append(elapsed)
            row = {"part": "loader", "variant": name, "gpu": gpu_state, "tokens": tokens,
                   "host_median_ms": statistics.median(host_ms), "host_max_ms": max(host_ms)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    # Same tokens either way (the golden test checks this on the CPU path).
    a, b = prepared.train_loader(), prepared.train_loader()
    for _ in range(3):
        xo, yo = old_next_batch(a, tokens, seq_len, device)
        xn, yn = b.next_batch(tokens, seq_len, device=device)
        assert torch.equal(xo, xn) and torch.equal(yo, yn)
    return rows


def table(record: dict) -> str:
    lines = ["| part | V | variant | fwd+bwd ms | fwd ms | vs compiled | peak extra MiB | loss err | grad err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if r["part"] in ("loader", "kernel_config"):
            continue
        if "error" in r:
            lines.append(f"| {r['part']} | {r['vocab']} | {r['variant']} | failed: {r['error'][:60]} | | | | | |")
            continue
        lines.append(f"| {r['part']} | {r['vocab']} | {r['variant']} | {r['fwd_bwd_median_ms']:.3f} | "
                     f"{r['fwd_median_ms']:.3f} | {r.get('speedup_vs_torch_compiled', float('nan')):.2f}x | "
                     f"{r.get('peak_extra_mib', float('nan')):.0f} | {r.get('loss_abs_error', float('nan')):.1e} | "
                     f"{r.get('grad_max_abs_error', float('nan')):.1e} |")
    lines += ["", "| V | elements/program | max block V | warps | fwd+bwd ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['elements_per_program']} | {r['max_block_v']} | {r['num_warps']} | "
              f"{r['fwd_bwd_median_ms']:.3f} |" for r in record["rows"] if r["part"] == "kernel_config"]
    lines += ["", "| loader | gpu | host ms (median) | host ms (max) |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['gpu']} | {r['host_median_ms']:.3f} | {r['host_max_ms']:.3f} |"
              for r in record["rows"] if r["part"] == "loader"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=".data/builtin_sp1024")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "ce_kernel", "cap": CAP, "reps": args.reps, "rows": [], **environment()}
    path = out / f"ce_kernel-{device_tag()}.json"
    for vocab in args.vocabs:
        record["rows"] += loss_rows(args.tokens, vocab, args.reps, args.warmup, device)
        if device.type == "cuda" and S.triton_available():
            record["rows"] += kernel_config_rows(args.tokens, vocab, args.reps, args.warmup)
        path.write_text(json.dumps(record, indent=2) + "\n")
    if Path(args.data, "manifest.json").exists():
        record["rows"] += loader_rows(args.data, args.tokens, min(args.seq_len, args.tokens), args.reps, device)
    else:
        print(f"no prepared data at {args.data}: loader timings skipped")
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(table(record))


if __name__ == "__main__":
    main()
