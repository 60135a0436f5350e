"""Benchmark: the largest model that fits 16,000,000 bytes (code + model) with the best export
scheme, trained and scored against golf-baseline at equal wallclock (issue 14's last row).

1. Plan: code bytes = the larger of the counted source as a self-extracting script
   (quant/artifact.account) and the generated single-file train_gpt.py wrapped the same way
   (runs/script.py); model bytes estimated as parameters x `--bytes-per-param` (the best
   scheme's measured value, benchmarks/quant_export.py). Shapes: width a multiple of 128 with
   64-dim heads (heads = width / 64, KV heads half of them), `--layers`, `--mlp-mults`;
   parameters counted on the meta device. A shape fits when code + estimate <=
   16,000,000 x (1 - `--margin`); the largest fitting shape is trained (`--plan-only`: stop
   after printing the plan).
2. Train the largest shape and the preset itself (golf-baseline) for the same `--seconds` of
   timed steps (compile warmup untimed), same data order, same tokens per step, the QAT stage
   of `--qat-run` (a run of quant_export.RUNS) from `--qat-start` on; export both with
   `--scheme`, load the artifact back, score val_bpb. The real artifact (code + model) must be
   <= 16,000,000 bytes: a candidate over it is reported as over, and with `--step-down` the
   next smaller shape that fits at the measured bytes per parameter is trained instead.
Memorization: the built-in corpus has ~7M training tokens; at 524,288 tokens per step the
baseline starts memorizing after ~200 steps (~55 s on an H200). The default 45 s keeps the
baseline (the faster of the two) under that; each model's row reports its epochs over the
training tokens and its last training loss beside its validation loss (a large gap = memorized).
The JSON and a preset (golf-max16mb.toml, for the chosen shape and scheme) go to --out.

    PYTHONPATH=src python3 benchmarks/quant_largest.py --data .data/builtin_sp1024 --out $OUT
    PYTHONPATH=src python3 benchmarks/quant_largest.py --data .data/builtin_sp1024 --out /tmp/l --plan-only
    PYTHONPATH=src python3 benchmarks/quant_largest.py --preset tiny-cpu --seconds 3 --val-tokens 8192 \\
        --calibration-batches 2 --limit 2000000 --widths 384 --layers 2,3,4 --mlp-mults 2 --out /tmp/l
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
from underpar.model.gpt import build, num_params
from underpar.quant import artifact, codewrap
from underpar.quant.config import QuantConfig
from underpar.runs import script
from underpar.runs.rundir import device_tag, environment

from quant_export import RUNS, SCHEMES, score_scheme, train


def shape_sets(width: int, layers: int, mult: int) -> list[str]:
    heads = max(width // 64, 1)
    return [f"model.model_dim={width}", f"model.num_layers={layers}", f"model.mlp.mult={mult}",
            f"model.attention.num_heads={heads}", f"model.attention.num_kv_heads={max(heads // 2, 1)}"]


def count_params(preset: str, sets: list[str]) -> int:
    cfg = cfglib.resolve("pretrain", preset, sets)
    with torch.device("meta"):
        return num_params(build(cfg.model))


def code_bytes(preset: str, sets: list[str]) -> dict:
    """What a submission ships as code, both ways of counting it; `counted` is the larger."""
    acct = artifact.account(0, limit=10**12)
    cfg = cfglib.resolve("pretrain", preset, sets)
    method, wrapped = codewrap.smallest_wrapper(script.generate(cfglib.to_dict(cfg), preset, None))
    return {"source_wrapped": acct.code, "source_raw": acct.code_raw, "source_wrapper": acct.code_wrapper,
            "train_gpt_wrapped": len(wrapped), "train_gpt_wrapper": method, "counted": max(acct.code, len(wrapped))}


def plan(args, sets: list[str], code: int, bpp: float) -> list[dict]:
    """Every shape with its parameters and estimated artifact, largest first; `fits` marks the
    ones under the limit with the margin."""
    rows = []
    for width in args.widths:
        for layers in args.layers:
            for mult in args.mlp_mults:
                s = shape_sets(width, layers, mult)
                params = count_params(args.preset, [*sets, *s])
                estimate = code + round(params * bpp)
                rows.append({"shape": f"{width}x{layers}, mlp {mult}", "sets": s, "parameters": params,
                             "estimated_bytes": estimate, "fits": estimate <= args.limit * (1 - args.margin)})
    return sorted(rows, key=lambda r: -r["parameters"])


def run_one(label, args, env, data, sets, qcfg, code: int, val_tokens: int, out: Path) -> dict:
    cfg = cfglib.resolve("pretrain", args.preset, sets)
    torch._dynamo.reset()
    trainer, info = train(cfg, env, data, args.seconds)
    pre = trainer.validate(val_tokens)
    weights = copy.deepcopy(trainer.model.state_dict())
    params = num_params(trainer.model)
    r = score_scheme(trainer, data, qcfg, weights, out, val_tokens)
    del trainer
    total = code + r["model_bytes"]
    train_tokens = data.train_token_count
    tokens = info["steps"] * cfg.train.tokens_per_step
    row = {"label": label, "sets": sets, **info, "parameters": params, "tokens_seen": tokens,
           "epochs": round(tokens / train_tokens, 2),
           "val_bpb_pre_quant": pre.bpb, "val_loss_pre_quant": pre.loss, "val_bpb": r["val_bpb"],
           "bpb_penalty": r["val_bpb"] - pre.bpb, "model_bytes": r["model_bytes"], "code_bytes": code,
           "artifact_bytes": total, "fits": total <= args.limit, "headroom": args.limit - total,
           "bytes_per_parameter": r["model_bytes"] / params, "quantize_seconds": r["quantize_seconds"],
           "encode_seconds": r["encode_seconds"], "report": r["report"]}
    print(f"{label:24s} {params:>11,} params  {info['steps']} steps ({row['epochs']} epochs, train loss "
          f"{info['train_loss_last']:.3f} / val loss {pre.loss:.3f})  bpb {pre.bpb:.4f} -> {r['val_bpb']:.4f}  "
          f"artifact {total:,} B ({'fits' if row['fits'] else 'OVER the limit'}, "
          f"{row['bytes_per_parameter']:.4f} B/param)", flush=True)
    return row


def preset_text(row: dict, scheme: dict, run_sets: list[str], base: str) -> str:
    """A preset for the chosen shape and scheme, on top of `base`'s TOML."""
    _, base_dict = cfglib.load_preset(base)
    model = {k.split("=")[0]: k.split("=")[1] for k in row["sets"]}
    lines = [f"# The largest model that fit 16,000,000 bytes (benchmarks/quant_largest.py): "
             f"{row['parameters']:,} parameters, artifact {row['artifact_bytes']:,} bytes, round-trip "
             f"val_bpb {row['val_bpb']:.4f} after {row['train_seconds']} s.", 'track = "pretrain"', 'name = "golf-max16mb"', "",
             "[data]", f'source = "{base_dict.get("data", {}).get("source", "builtin")}"',
             f'vocab_size = {base_dict.get("data", {}).get("vocab_size", 1024)}', "", "[model]",
             f"num_layers = {model['model.num_layers']}", f"model_dim = {model['model.model_dim']}", "",
             "[model.attention]", f"num_heads = {model['model.attention.num_heads']}",
             f"num_kv_heads = {model['model.attention.num_kv_heads']}", "", "[model.mlp]",
             f"mult = {model['model.mlp.mult']}", ""]
    for section in ("train", "optim"):
        if section in base_dict:
            lines += _toml_section(section, base_dict[section])
    quant = {k: v for k, v in scheme.items() if k not in ("clip",)}
    quant.update({s.split("=")[0].removeprefix("quant."): s.split("=")[1] for s in run_sets
                  if s.startswith("quant.") and not s.startswith("quant.clip.")})
    lines += _toml_section("quant", quant)
    clip = scheme.get("clip")
    if isinstance(clip, dict):
        lines += _toml_section("quant.clip", clip)
    return "\n".join(lines) + "\n"


def _toml_section(name: str, table: dict) -> list[str]:
    lines, subs = [f"[{name}]"], []
    for k, v in table.items():
        if isinstance(v, dict):
            subs.append((f"{name}.{k}", v))
            continue
        value = json.dumps(v) if isinstance(v, (bool, str, list)) else v
        if isinstance(v, str) and v.replace(".", "", 1).isdigit():
            value = v  # a number given as text by a --set
        elif isinstance(v, str) and v in ("true", "false"):
            value = v
        lines.append(f"{k} = {value}")
    lines.append("")
    for sub, t in subs:
        lines += _toml_section(sub, t)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--preset", default="golf-baseline")
    parser.add_argument("--data", default=".data/builtin_sp1024")
    parser.add_argument("--seconds", type=float, default=45.0, help="timed training per model (equal wallclock)")
    parser.add_argument("--scheme", default="int6_gptq_lqer_best", help=f"export scheme, of: {', '.join(SCHEMES)}")
    parser.add_argument("--qat-run", default="qat6", help=f"training run whose QAT stage both use, of: {', '.join(RUNS)}")
    parser.add_argument("--qat-start", type=float, default=0.5)
    parser.add_argument("--bytes-per-param", type=float, default=0.456,
                        help="the scheme's measured model bytes per parameter (int6 GPTQ + LQER, 40 s golf-baseline: 0.456)")
    parser.add_argument("--margin", type=float, default=0.03, help="safety margin on the estimate (fraction of the limit)")
    parser.add_argument("--limit", type=int, default=artifact.LIMIT_BYTES)
    parser.add_argument("--widths", type=ints, default=[512, 640, 768, 896, 1024])
    parser.add_argument("--layers", type=ints, default=list(range(8, 21)))
    parser.add_argument("--mlp-mults", type=ints, default=[2, 3, 4])
    parser.add_argument("--step-down", action="store_true", help="if the candidate is over, train the next that fits")
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--val-tokens", type=int, default=0)
    parser.add_argument("--compressors", default="zlib,lzma,brotli,zstd")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], help="pretrain config overrides (both models)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.scheme not in SCHEMES or args.qat_run not in RUNS:
        parser.error(f"--scheme of: {', '.join(SCHEMES)}; --qat-run of: {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    sets = [f"data.out={args.data}", *args.set]
    run_sets = RUNS[args.qat_run][0]
    run_sets = [*run_sets, f"quant.qat_start={args.qat_start}"] if run_sets else []
    scheme = SCHEMES[args.scheme]
    qcfg = cfglib.from_dict(QuantConfig, {"compressors": args.compressors.split(","),
                                          "gptq_calibration_batches": args.calibration_batches, **scheme}
                            if scheme else {})
    cfglib.validate(qcfg)
    code = code_bytes(args.preset, sets)
    rows = plan(args, sets, code["counted"], args.bytes_per_param)
    fitting = [r for r in rows if r["fits"]]
    results: dict = {"environment": environment(), "preset": args.preset, "sets": sets, "seconds": args.seconds,
                     "scheme": args.scheme, "qat_run_sets": run_sets, "bytes_per_param_estimate": args.bytes_per_param,
                     "margin": args.margin, "limit": args.limit, "code_bytes": code, "plan": rows, "models": []}
    print(f"code {code['counted']:,} B (source {code['source_wrapped']:,}, train_gpt.py {code['train_gpt_wrapped']:,}); "
          f"{len(fitting)} of {len(rows)} shapes fit at {args.bytes_per_param} B/param with a {args.margin:.0%} margin")
    for r in fitting[:8]:
        print(f"  {r['shape']:18s} {r['parameters']:>11,} params  est. {r['estimated_bytes']:,} B")
    path = out / f"quant_largest-{device_tag()}.json"
    if not fitting:
        raise SystemExit(f"no shape fits {args.limit:,} bytes at {args.bytes_per_param} B/param")
    if not args.plan_only:
        env = dist.setup()
        data = PreparedData.open(cfglib.resolve("pretrain", args.preset, sets).data)
        candidate = fitting[0]
        while True:
            row = run_one(f"largest {candidate['shape']}", args, env, data, [*sets, *candidate["sets"], *run_sets],
                          qcfg, code["counted"], args.val_tokens, out)
            results["models"].append(row)
            if row["fits"] or not args.step_down:
                break
            measured = row["bytes_per_parameter"]  # step down at the candidate's real bytes per parameter
            smaller = [r for r in fitting if r["parameters"] < candidate["parameters"]
                       and code["counted"] + r["parameters"] * measured <= args.limit * (1 - args.margin)]
            if not smaller:
                break
            candidate = smaller[0]
        results["models"].append(run_one(f"{args.preset} (same budget)", args, env, data, [*sets, *run_sets], qcfg,
                                         code["counted"], args.val_tokens, out))
        (out / "artifact.bin").unlink(missing_ok=True)
        best = next((m for m in results["models"][:-1] if m["fits"]), None)
        if best is not None:
            (out / "golf-max16mb.toml").write_text(preset_text(best, scheme, run_sets, args.preset))
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path} ({results['wall_seconds']} s)")


if __name__ == "__main__":
    main()
