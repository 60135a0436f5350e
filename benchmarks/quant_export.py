"""Benchmark: bytes per parameter and round-trip bpb penalty of each export scheme on a model
trained briefly on the built-in data (issue 14's table), measured in one process.

Training runs (`--runs`; each `--seconds` of timed steps after an untimed compile warmup of
every training stage, at the same budget): "plain"; "qat8" (int8 fake quantization on the
abs-max grid from `--qat-start` of training on); "qat6" (int6 on the export's own SDClip grid,
k = 12.85); "qat6w" (int6 QAT and export at a wider SDClip k = 14: a coarser grid, fewer
bytes, the error QAT is there to absorb). QAT is the track's own training stage
(quant.qat_* through the Trainer's Stages); each run records the step and progress at which
it switched on and the graphs compiled inside the timed loop (must be 0). Each run's final
weights go through its export schemes (`--schemes` narrows them); every scheme is scored by
val_bpb after export -> file -> load, against the same weights before quantization
(`bpb_penalty`) and against the plain run's unquantized model (`vs_plain_float`: what the
artifact costs against not quantizing and not doing QAT at all). Issue 14's rows: (a) plain
int8_zlib_baseline, (b) qat8 int8_zlib_baseline, (c) plain int6_gptq_best, (d) qat6
int6_gptq_lqer_best (and qat6w int6k14_gptq_lqer_best).

    PYTHONPATH=src python3 benchmarks/quant_export.py --data .data/builtin_sp1024 --out $OUT
    PYTHONPATH=src python3 benchmarks/quant_export.py --preset tiny-cpu --seconds 3 --val-tokens 8192 \
        --calibration-batches 2 --set model.model_dim=384 --set model.attention.num_heads=6 \
        --set model.attention.num_kv_heads=3 --set model.num_layers=2 --out /tmp/q
A CPU check that the QAT stage switches on (tiny matrices, so QAT covers what the export keeps float):
    PYTHONPATH=src python3 benchmarks/quant_export.py --preset tiny-cpu --seconds 20 --val-tokens 2048 \
        --set quant.keep_float_max_numel=1000 --set train.tokens_per_step=512 --set train.micro_batch_tokens=512 \
        --set train.seq_len=64 --runs qat6 --schemes int6_gptq_best --calibration-batches 1 --out /tmp/q
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
from underpar.runs.rundir import device_tag, environment
from underpar.stages import compiled_graphs
from underpar.tracks.pretrain import Trainer

# name -> quant settings (on top of --compressors); "gptq" ones calibrate on training tokens.
MIXED = {"scheme": "mixed", "container": "grouped"}
WIDE = {"clip": {"name": "sdclip", "matrix_sigmas": 14.0}}
SCHEMES: dict[str, dict] = {
    "int8_zlib_baseline": {},
    "int8_best": {**MIXED, "matrix_bits": 8, "clip": "percentile"},
    "int6_rtn_best": MIXED,
    "int6_gptq_best": {**MIXED, "gptq": True},
    "int6_gptq_int7emb_best": {**MIXED, "gptq": True, "embed_bits": 7},
    "int6_gptq_lqer_best": {**MIXED, "gptq": True, "lqer_rank": 4},
    "int6k14_gptq_best": {**MIXED, **WIDE, "gptq": True},
    "int6k14_gptq_lqer_best": {**MIXED, **WIDE, "gptq": True, "lqer_rank": 4},
}
# name -> (pretrain config overrides of the training run, its export schemes)
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "plain": ([], ["int8_zlib_baseline", "int6_gptq_best", "int6k14_gptq_best"]),
    "qat8": (["quant.qat_bits=8"], ["int8_zlib_baseline"]),
    "qat6": (["quant.qat_bits=6", "quant.qat_clip=sdclip"], ["int6_gptq_best", "int6_gptq_lqer_best"]),
    "qat6w": (["quant.qat_bits=6", "quant.qat_clip=sdclip", "quant.clip.matrix_sigmas=14.0"],
              ["int6k14_gptq_lqer_best"]),
}


def train(cfg, env, data, seconds: float) -> tuple[Trainer, dict]:
    """`seconds` of timed steps through the track's Trainer, its stages (QAT) entered by
    progress = elapsed / seconds, as the track enters them under a wallclock cap."""
    trainer = Trainer(cfg, env, data)
    compile_seconds = trainer.warm_up()  # every stage's graph, untimed; puts everything back
    schedule, step, switched, loss = cfg.optim.schedule, 0, [], float("nan")
    sync = torch.cuda.synchronize if env.device.type == "cuda" else (lambda: None)
    sync()
    graphs = compiled_graphs()
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        progress = elapsed / seconds
        for change in trainer.stages.enter(progress):
            switched.append({"change": change, "step": step, "progress": round(progress, 4)})
        loss = trainer.step(schedule(progress), muon_momentum_at(cfg.optim, step), progress)
        step += 1
        trainer.averager.update(step, progress)
        sync()
    trainer.averager.apply()
    trainer.stages.enter(0.0)  # QAT off: export and score the plain forward
    return trainer, {"steps": step, "train_seconds": round(time.perf_counter() - started, 2),
                     "compile_seconds": round(compile_seconds, 2), "stages": trainer.stages.describe(),
                     "switched": switched, "graphs_compiled_in_timed_loop": compiled_graphs() - graphs,
                     "train_loss_last": loss}


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
    parser.add_argument("--seconds", type=float, default=36.0, help="timed training per run (same for every run)")
    parser.add_argument("--val-tokens", type=int, default=0, help="validation tokens scored (0: all)")
    parser.add_argument("--compressors", default="zlib,lzma,brotli,zstd")
    parser.add_argument("--packings", default="int8,bits")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--qat-start", type=float, default=0.5, help="QAT from this fraction of training on")
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
    runs = args.runs.split(",")
    unknown = [r for r in runs if r not in RUNS] + sorted(only - set(SCHEMES))
    if unknown:
        parser.error(f"unknown run or scheme {', '.join(unknown)}; runs: {', '.join(RUNS)}; schemes: {', '.join(SCHEMES)}")
    results: dict = {"environment": environment(), "preset": args.preset, "sets": sets, "seconds": args.seconds,
                     "qat_start": args.qat_start, "val_tokens": args.val_tokens, "runs": {}}
    plain_float = None
    for run_name in runs:
        run_sets, schemes = RUNS[run_name]
        if run_sets:
            run_sets = [*run_sets, f"quant.qat_start={args.qat_start}"]
        schemes = [name for name in schemes if not only or name in only]
        run_cfg = cfglib.resolve("pretrain", args.preset, [*sets, *run_sets])
        torch._dynamo.reset()
        trainer, info = train(run_cfg, env, data, args.seconds)
        pre = trainer.validate(args.val_tokens)
        if run_name == "plain":
            plain_float = pre.bpb
        weights = copy.deepcopy(trainer.model.state_dict())
        params = num_params(trainer.model)
        run = {"sets": run_sets, **info, "parameters": params, "val_bpb_pre_quant": pre.bpb, "schemes": {}}
        print(f"{run_name:6s} {info['steps']} steps, {info['stages']}, switched {info['switched']}, "
              f"{info['graphs_compiled_in_timed_loop']} graphs compiled in the timed loop, pre-quant bpb {pre.bpb:.4f}",
              flush=True)
        for name in schemes:
            qcfg = cfglib.from_dict(QuantConfig, {**(common if SCHEMES[name] else {}), **SCHEMES[name]})
            cfglib.validate(qcfg)
            r = score_scheme(trainer, data, qcfg, weights, out, args.val_tokens)
            r["bytes_per_parameter"] = r["model_bytes"] / params
            r["bpb_penalty"] = r["val_bpb"] - pre.bpb
            r["vs_plain_float"] = None if plain_float is None else r["val_bpb"] - plain_float
            run["schemes"][name] = r
            vs = "" if plain_float is None else f", vs plain float {r['vs_plain_float']:+.4f}"
            print(f"{run_name:6s} {name:24s} {r['model_bytes']:>11,} B  {r['bytes_per_parameter']:.4f} B/param  "
                  f"bpb {pre.bpb:.4f} -> {r['val_bpb']:.4f} ({r['bpb_penalty']:+.4f}{vs})  "
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
