"""GPU benchmark: where one pretraining step's time goes. Builds the trainer of a preset (default
golf-baseline, any --set), runs the untimed compile warmup and a few steps, then profiles --steps
steps with torch.profiler: device time per kernel, summed into groups (matmuls, attention,
inductor/Triton fused kernels, communication, copies, other), against the wall time of the same
steps (wall minus device time is where the GPU waited for the host). Under torchrun each rank
trains its share as `underpar pretrain` does and rank 0's step is profiled (its all-reduces and
the waits inside them show up as communication). Writes step_profile-<device>[-<tag>].json with
the groups and the top kernels.

    PYTHONPATH=src python3 benchmarks/step_profile.py --data .data/builtin_sp1024 --out $OUT \\
        [--set train.micro_batch_tokens=524288] [--tag micro]
    PYTHONPATH=src torchrun --standalone --nproc_per_node=2 benchmarks/step_profile.py --data .data/builtin_sp1024 \\
        --out $OUT --tag 2gpu      # NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    PYTHONPATH=src python3 benchmarks/step_profile.py --preset tiny-cpu --out /tmp/sp --steps 2   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.pretrain import Trainer

GROUPS = [  # first match wins
    ("communication", r"nccl|gloo|c10d|all_?reduce|all_?gather|reduce_?scatter"),
    ("attention", r"flash|fmha|attention|cudnn_sdpa|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|matmul|\bmm\b|addmm|bmm"),
    ("fused (inductor/Triton)", r"^triton|_kernel$"),
    ("copies and fills", r"memcpy|memset|copy|fill"),
]


def group_of(name: str) -> str:
    return next((g for g, pattern in GROUPS if re.search(pattern, name, re.IGNORECASE)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="golf-baseline")
    parser.add_argument("--data", help="prepared data folder (data.out)")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after warmup and 3 more)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sets = ([f"data.out={args.data}"] if args.data else []) + args.set
    cfg = cfglib.resolve("pretrain", args.preset, sets)
    env = dist.setup(cfg.train.device)
    cuda = env.device.type == "cuda"
    trainer = Trainer(cfg, env, PreparedData.ready(cfg.data, env))
    compile_seconds = trainer.warm_up()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        trainer.step(1.0, cfg.optim.muon_momentum)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.step(1.0, cfg.optim.muon_momentum)
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / args.steps
    events = [e for e in prof.key_averages() if (e.device_type.name == "CUDA") == cuda]
    per_step = {e.key: (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / args.steps
                for e in events}
    kernels = sorted(((ms, name) for name, ms in per_step.items() if ms > 0), reverse=True)
    groups: dict[str, float] = {}
    for ms, name in kernels:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    busy = sum(groups.values())
    record = {
        "benchmark": "step_profile", "preset": args.preset, "sets": sets, "steps": args.steps, "world_size": env.world_size,
        "compile_seconds": round(compile_seconds, 1), "wall_ms_per_step": round(wall_ms, 2),
        "device_ms_per_step": round(busy, 2), "host_wait_ms_per_step": round(wall_ms - busy, 2) if cuda else None,
        "groups": {g: {"ms": round(ms, 2), "share": round(ms / busy, 4)} for g, ms in sorted(groups.items(), key=lambda x: -x[1])},
        "top_kernels": [{"name": name[:200], "group": group_of(name), "ms": round(ms, 3), "share": round(ms / busy, 4)}
                        for ms, name in kernels[: args.top]],
        **environment(),
    }
    dist.teardown()
    if not env.is_main:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_profile-{device_tag()}{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.preset} {' '.join(args.set)}: {wall_ms:.1f} ms/step wall, {busy:.1f} ms "
          f"{'device' if cuda else 'CPU op'} time")
    for g, v in record["groups"].items():
        print(f"  {g:26s} {v['ms']:8.2f} ms  {v['share']:6.1%}")
    for k in record["top_kernels"][:15]:
        print(f"  {k['ms']:8.3f} ms  {k['group']:24s} {k['name'][:90]}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
