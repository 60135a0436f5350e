"""Benchmark: bytes per parameter and round-trip bpb penalty of each export scheme on a model
trained briefly on the built-in data (issue 14's table), measured in one process.

Training runs (`--runs`; each `--seconds` of timed steps after an untimed compile warmup):
"plain", "qat8" (int8 fake quantization from half of training on) and "qat6" (int6). Each
run's final weights go through its export schemes (`--schemes` narrows them); every scheme is
scored by val_bpb after export -> file -> load, against the same weights before quantization.

    PYTHONPATH=src python3 benchmarks/quant_export.py --data .data/builtin_sp1024 --out $OUT
    PYTHONPATH=src python3 benchmarks/quant_export.py --data .data/builtin_sp1024 --out $OUT --runs qat8,qat6
    PYTHONPATH=src python3 benchmarks/quant_export.py --preset tiny-cpu --seconds 2 --val-tokens 8192 \
        --calibration-batches 2 --runs plain,qat6 --schemes int8_zlib_baseline,int6_gptq_lqer_best --out /tmp/q
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.model.gpt import num_params
from underpar.model.precision import CONTROL_PATTERNS
from underpar.optim import muon_momentum_at
from underpar.quant import artifact
from underpar.quant.base import QUANTIZERS
from underpar.quant.calibrate import Calibration, gptq_quantize
from underpar.quant.config import QuantConfig
from underpar.quant.qat import set_qat
from underpar.runs.rundir import device_tag, environment
from underpar.tracks.pretrain import Trainer

# name -> quant settings (on top of --compressors); "gptq" ones calibrate on training tokens.
SCHEMES: dict[str, dict] = {
    "int8_zlib_baseline": {},
    "int8_best": {"scheme": "mixed", "container": "grouped", "matrix_bits": 8, "clip": "percentile"},
    "int6_rtn_best": {"scheme": "mixed", "container": "grouped"},
    "int6_gptq_best": {"scheme": "mixed", "container": "grouped", "gptq": True},
    "int6_gptq_int7emb_best": {"scheme": "mixed", "container": "grouped", "gptq": True, "embed_bits": 7},
    "int6_gptq_lqer_best": {"scheme": "mixed", "container": "grouped", "gptq": True, "lqer_rank": 4},
}
RUNS = {"plain": (0, list(SCHEMES)), "qat8": (8, ["int8_zlib_baseline", "int8_best"]),
        "qat6": (6, ["int6_gptq_best", "int6_gptq_lqer_best"])}


def train(cfg, env, data, seconds: float, qat: QuantConfig | None) -> tuple[Trainer, dict]:
    trainer = Trainer(cfg, env, data)
    compile_seconds = trainer.warm_up()
    if qat is not None:  # compile the QAT graph too, untimed (warm_up puts everything back)
        set_qat(trainer.model, qat, True)
        compile_seconds += trainer.warm_up()
        set_qat(trainer.model, qat, False)
    schedule, step, qat_on = cfg.optim.schedule, 0, False
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        progress = elapsed / seconds
        if qat is not None and not qat_on and progress >= qat.qat_start:
            set_qat(trainer.model, qat, True)
            qat_on = True
        trainer.step(schedule(progress), muon_momentum_at(cfg.optim, step))
        step += 1
        trainer.averager.update(step, progress)
        sync()
    trainer.averager.apply()
    if qat is not None:
        set_qat(trainer.model, qat, False)  # export and score the plain forward
    return trainer, {"steps": step, "train_seconds": round(time.perf_counter() - started, 2),
                     "compile_seconds": round(compile_seconds, 2)}


def score_scheme(trainer: Trainer, data: PreparedData, cfg: QuantConfig, weights: dict, out: Path,
                 val_tokens: int) -> dict:
    started = time.perf_counter()
    if cfg.gptq:
        train_cfg = trainer.cfg.train
        calibration = Calibration.from_loader(data.train_loader(), cfg.gptq_calibration_batches,
                                              train_cfg.micro_batch_tokens, train_cfg.seq_len, data=data)
        obj, stats = gptq_quantize(trainer.model, calibration, cfg)
    else:
        obj, stats = QUANTIZERS[cfg.scheme].quantize(weights, CONTROL_PATTERNS, cfg)
    quantized = time.perf_counter()
    path = out / "artifact.bin"
    exported = artifact.export_quantized(obj, cfg, path, stats)
    encoded = time.perf_counter()
    loaded = artifact.load_model(path, cfg)
    trainer.model.load_state_dict({k: v.to(trainer.env.device) for k, v in loaded.items()})
    post = trainer.validate(val_tokens)
    trainer.model.load_state_dict(weights)
    report = {k: v for k, v in exported.report.items() if k != "tensors"}
    return {"model_bytes": exported.model_bytes, "val_bpb": post.bpb, "stats": stats,
            "quantize_seconds": round(quantized - started, 2), "encode_seconds": round(encoded - quantized, 2),
            "report": report, "tensors": exported.report["tensors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="golf-baseline")
    parser.add_argument("--data", default=".data/builtin_sp1024")
    parser.add_argument("--seconds", type=float, default=40.0, help="timed training per run")
    parser.add_argument("--val-tokens", type=int, default=0, help="validation tokens scored (0: all)")
    parser.add_argument("--compressors", default="zlib,lzma,brotli,zstd")
    parser.add_argument("--packings", default="int8,bits")
    parser.add_argument("--runs", default="plain", help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--schemes", default="", help="only these export schemes (default: each run's own)")
    parser.add_argument("--calibration-batches", type=int, default=16, help="GPTQ calibration micro-batches")
    parser.add_argument("--set", action="append", default=[], help="pretrain config overrides")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    env = dist.setup()
    sets = [f"data.out={args.data}", *args.set]
    cfg = cfglib.resolve("pretrain", args.preset, sets)
    data = PreparedData.open(cfg.data)
    common = {"compressors": args.compressors.split(","), "packings": args.packings.split(","),
              "gptq_calibration_batches": args.calibration_batches}
    only = set(args.schemes.split(",")) - {""}
    results: dict = {"environment": environment(), "preset": args.preset, "sets": sets, "seconds": args.seconds,
                     "val_tokens": args.val_tokens, "runs": {}}
    for run_name in args.runs.split(","):
        qat_bits, schemes = RUNS[run_name]
        schemes = [name for name in schemes if not only or name in only]
        qat = QuantConfig(qat_bits=qat_bits, qat_start=0.5) if qat_bits else None
        torch._dynamo.reset()
        trainer, info = train(cfg, env, data, args.seconds, qat)
        pre = trainer.validate(args.val_tokens)
        weights = copy.deepcopy(trainer.model.state_dict())
        params = num_params(trainer.model)
        run = {**info, "parameters": params, "val_bpb_pre_quant": pre.bpb, "schemes": {}}
        for name in schemes:
            qcfg = cfglib.from_dict(QuantConfig, {**(common if SCHEMES[name] else {}), **SCHEMES[name]})
            cfglib.validate(qcfg)
            r = score_scheme(trainer, data, qcfg, weights, out, args.val_tokens)
            r["bytes_per_parameter"] = r["model_bytes"] / params
            r["bpb_penalty"] = r["val_bpb"] - pre.bpb
            run["schemes"][name] = r
            print(f"{run_name:6s} {name:24s} {r['model_bytes']:>11,} B  {r['bytes_per_parameter']:.4f} B/param  "
                  f"bpb {pre.bpb:.4f} -> {r['val_bpb']:.4f} ({r['bpb_penalty']:+.4f})  "
                  f"quantize {r['quantize_seconds']:.1f} s, encode {r['encode_seconds']:.1f} s", flush=True)
        results["runs"][run_name] = run
        del trainer
    (out / "artifact.bin").unlink(missing_ok=True)
    acct = artifact.account(0, limit=10**12)
    results["code_bytes"] = {"raw": acct.code_raw, "compressed": acct.code, "wrapper": acct.code_wrapper}
    path = out / f"quant_export-{device_tag()}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"code: {acct.code_raw:,} B raw -> {acct.code:,} B ({acct.code_wrapper} wrapper); wrote {path}")


if __name__ == "__main__":
    main()
