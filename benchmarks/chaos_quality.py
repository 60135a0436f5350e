"""Deep Chaos quality, like with like: SmolLM2-135M-Instruct fine-tuned on gsm_symbolic worked
solutions (preset chaos-smollm2) by full fine-tuning, LISA and Deep Chaos (mask, the published
mask settings, hoist, slice) at equal steps -- the same training batches for every method -- and,
with --equal-wallclock, each non-full method again for as many steps as fit in full fine-tuning's
training time of the same seed.

Per run: held-out loss (nats, gsm_symbolic validation) of the full model -- the one that is saved
and evaluated -- before and after training and at every block end, beside that of the network
that trains (chaos: the hoisted / masked / sliced sub-network, a different network); greedy
accuracy with Wilson intervals on two held-out tasks; ms/step and training peak memory. Per
method: mean and 95% t-interval over seeds, Welch tests against full.

    PYTHONPATH=src python3 benchmarks/chaos_quality.py --out $OUT [--seeds 0 1 2] [--steps 100]
        [--methods full chaos-mask ...] [--equal-wallclock] [--tag a] [--set key=value ...]
    python3 benchmarks/chaos_quality.py --out $OUT --merge a.json b.json   # one table of several runs

One process and one model object: the base weights are copied back before every run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from underpar import config as cfglib
from underpar.data.tasks import get_task
from underpar.errors import ConfigError
from underpar.eval.accuracy import evaluate_task
from underpar.eval.generate import DecodeConfig
from underpar.eval.stats import mean_ci, welch_test
from underpar.model import hf
from underpar.runs.rundir import RunDir, device_tag, environment
from underpar.tracks import finetune

METHODS = {
    "full": ["method=full"],
    "lisa": ["method=lisa"],
    "chaos-mask": ["method=chaos", "method.strategy=mask"],
    "chaos-mask-published": ["method=chaos", "method.strategy=mask", "method.masked_params=zero_grad",
                             "method.active_count=round"],
    "chaos-hoist": ["method=chaos", "method.strategy=hoist"],
    "chaos-slice": ["method=chaos", "method.strategy=slice"],
    # opt-in repairs (each one change against chaos-hoist)
    "chaos-hoist-mean-stub": ["method=chaos", "method.strategy=hoist", "method.stub=mean"],
    "chaos-hoist-mean-halves": ["method=chaos", "method.strategy=hoist", "method.stub=mean_halves"],
    "chaos-slice-mean-halves": ["method=chaos", "method.strategy=slice", "method.stub=mean_halves"],
    "chaos-hoist-frozen-identity": ["method=chaos", "method.strategy=hoist", "method.train_identity=false"],
    "chaos-hoist-dead-cap": ["method=chaos", "method.strategy=hoist", "method.active_fraction_min=0.5"],
    # memory rather than quality: AdamW moments of parameters that sit a block out dropped (restart at 0)
    "chaos-hoist-moments-reset": ["method=chaos", "method.strategy=hoist", "method.optimizer_state=reset"],
    # the configuration that meets the speed/memory target (chaos_speed-pack-*-h200.json): packed
    # sub-networks (entries not kept do not move), identity layers hoisted, idle moments dropped
    "chaos-slice-pack-identity-reset": ["method=chaos", "method.strategy=slice", "method.slice_form=pack",
                                        "method.hoist_identity=true", "method.optimizer_state=reset"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["full", "chaos-mask", "chaos-hoist", "chaos-slice"],
                        choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of 16 sequences (1 epoch = 63)")
    parser.add_argument("--interval", type=int, default=50, help="chaos sticky_interval and LISA interval")
    parser.add_argument("--eval-tasks", nargs=2, default=["asdiv", "basic_arithmetic"],
                        help="gsm_symbolic is in-distribution but at the floor for this model, and slow (it rambles)")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--equal-wallclock", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--merge", nargs="+", help="result files of earlier runs: one table, no training")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        records = [json.loads(Path(f).read_text()) for f in args.merge]
        record = {**records[0], "runs": [r for rec in records for r in rec["runs"]], "merged": args.merge}
        record["stats"] = stats(record["runs"], record["eval_tasks"])
        write(out, record, "merged", device_tag(record["device"]))  # where the runs ran
        return
    started = time.time()
    model, tokenizer = hf.load_model("smollm2-135m")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def config(method: str, seed: int, steps: int) -> finetune.FinetuneConfig:
        block = {"lisa": "method.interval", "full": None}.get(method, "method.sticky_interval")
        sets = [*METHODS[method], f"train.seed={seed}", f"train.steps={steps}", "train.save=false",
                f"train.runs_root={tempfile.mkdtemp(prefix='chaos-quality-')}", f"eval.examples={args.eval_examples}",
                f"eval.tasks={json.dumps(args.eval_tasks)}", *([f"method.seed={seed}", f"{block}={args.interval}"]
                                                               if block else []), *args.sets]
        return cfglib.resolve("finetune", "chaos-smollm2", sets)

    reference = config("full", 0, args.steps)
    decode = DecodeConfig(max_new_tokens=reference.eval.max_new_tokens, batch_size=reference.eval.batch_size,
                          engine=reference.eval.engine, compile=reference.eval.compile)
    base = {}
    for name in args.eval_tasks:
        task = get_task(name)
        base[name] = evaluate_task(model, tokenizer, task, task.load("test", limit=args.eval_examples,
                                                                     seed=reference.data.seed), decode)
        print(f"base {name}: {base[name]['accuracy']['mean']:.3f}", flush=True)

    def one(method: str, seed: int, steps: int, label: str) -> dict:
        model.load_state_dict(base_state)
        summary = finetune.run(config(method, seed, steps), model, tokenizer)
        rows = RunDir(summary.run_dir).metrics()
        row = {"method": label, "seed": seed, "steps": summary.steps,
               "median_ms_per_step": summary.median_ms_per_step, "training_seconds": summary.training_seconds,
               "peak_memory_bytes": summary.peak_memory_bytes,
               "heldout_loss_before": summary.heldout_loss_before, "heldout_loss": summary.heldout_loss,
               "heldout_loss_trained_net": summary.heldout_loss_trained_net,
               "heldout_by_block": [{k: r[k] for k in r if k == "step" or k.startswith("heldout")}
                                    for r in rows if any(k.startswith("heldout") for k in r)],
               "train_loss_first": summary.first_loss, "train_loss_final": summary.final_loss,
               "accuracy": {n: summary.eval[n]["accuracy"] for n in args.eval_tasks},
               "strict": {n: summary.eval[n]["strict"]["mean"] for n in args.eval_tasks}}
        print(json.dumps({k: v for k, v in row.items() if k != "heldout_by_block"}), flush=True)
        return row

    record = {"benchmark": "chaos_quality", "model": "smollm2-135m", "train_task": reference.data.task,
              "steps": args.steps, "interval": args.interval, "eval_tasks": args.eval_tasks,
              "eval_examples": args.eval_examples, "config": cfglib.to_dict(reference), **environment(),
              "base": {n: {k: base[n][k] for k in ("accuracy", "strict", "n")} for n in args.eval_tasks}, "runs": []}
    for method in args.methods:
        for seed in args.seeds:
            record["runs"].append(one(method, seed, args.steps, method))
            write(out, record, args.tag)  # after every run: a cut-off job keeps what it measured
    if args.equal_wallclock:
        full_ms = {r["seed"]: r["median_ms_per_step"] for r in record["runs"] if r["method"] == "full"}
        if not full_ms:
            raise ConfigError("--equal-wallclock needs 'full' among --methods (its step time sets the budget)")
        for r in [r for r in record["runs"] if r["method"] != "full" and r["seed"] in full_ms]:
            steps = max(1, round(args.steps * full_ms[r["seed"]] / r["median_ms_per_step"]))
            record["runs"].append(one(r["method"], r["seed"], steps, f"{r['method']}@wallclock"))
            write(out, record, args.tag)
    record["seconds"] = time.time() - started
    write(out, record, args.tag)


def stats(runs: list[dict], tasks: list[str]) -> dict:
    """Per method: mean [95% CI] over seeds of each accuracy and the held-out losses; Welch
    tests of each method against full (where both have >= 2 seeds)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    metrics = {f"accuracy/{n}": lambda r, n=n: r["accuracy"][n]["mean"] for n in tasks}
    metrics |= {key: lambda r, key=key: r[key] for key in
                ("heldout_loss", "heldout_loss_trained_net", "median_ms_per_step", "peak_memory_bytes")}
    out: dict = {}
    for name, get in metrics.items():
        values = {m: [get(r) for r in runs if r["method"] == m and get(r) is not None] for m in methods}
        out[name] = {m: mean_ci(v) for m, v in values.items() if v}
        for m, v in values.items():
            if m != "full" and len(v) > 1 and len(values.get("full", [])) > 1:
                out[name][f"{m}_vs_full_welch"] = welch_test(v, values["full"])
    return out


def write(out: Path, record: dict, tag: str, device: str | None = None) -> None:
    record["stats"] = stats(record["runs"], record["eval_tasks"])
    (out / f"chaos_quality{'-' + tag if tag else ''}-{device or device_tag()}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(record), flush=True)


def table(record: dict) -> str:
    tasks, s = record["eval_tasks"], record["stats"]
    lines = ["| method | seeds | steps | held-out loss, full model | held-out loss, network that trains (different) | "
             + " | ".join(f"{n} accuracy" for n in tasks) + " | ms/step | peak GiB (training) |", "|---" * (7 + len(tasks)) + "|"]
    before = next((r["heldout_loss_before"] for r in record["runs"] if r.get("heldout_loss_before") is not None), None)
    lines.append(f"| base | | 0 | {'-' if before is None else f'{before:.3f}'} | - | "
                 + " | ".join(f"{record['base'][n]['accuracy']['mean']:.3f}" for n in tasks) + " | | |")

    def cell(metric: str, m: str, fmt: str = ".3f") -> str:
        c = s.get(metric, {}).get(m)
        if not c:
            return "-"
        return f"{c['mean']:{fmt}}" + ("" if c["n"] < 2 else f" [{c['lo']:{fmt}}, {c['hi']:{fmt}}]")

    for m in dict.fromkeys(r["method"] for r in record["runs"]):
        runs = [r for r in record["runs"] if r["method"] == m]
        steps = sorted({r["steps"] for r in runs})
        peak = s.get("peak_memory_bytes", {}).get(m)
        gib = "-" if not peak else f"{peak['mean'] / 2**30:.2f}"
        lines.append(f"| {m} | {len(runs)} | {'/'.join(map(str, steps))} | {cell('heldout_loss', m)} | "
                     f"{cell('heldout_loss_trained_net', m)} | " + " | ".join(cell(f'accuracy/{n}', m) for n in tasks)
                     + f" | {cell('median_ms_per_step', m, '.0f')} | {gib} |")
    for metric in ("heldout_loss", *(f"accuracy/{n}" for n in tasks)):
        for key, w in s.get(metric, {}).items():
            if key.endswith("_welch"):
                lines.append(f"Welch {key.removesuffix('_vs_full_welch')} vs full, {metric}: t = {w['t']:.2f}, p = {w['p']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
