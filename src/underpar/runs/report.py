"""`underpar report SWEEP`: a markdown experiment log of a sweep, in the form researchers keep
by hand (one table per phase: variant, description, metric, steps, delta versus the baseline,
status; the best config; the progression of phase winners; per-variant mean/std and Welch
p-values when there are several seeds; what broke), with PNG plots (val_bpb against
training time per run, loss curves, delta bars). The conclusions are the user's: the log
leaves a section for them."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import statistics
from pathlib import Path
from typing import Any

from underpar.errors import UnderparError
from underpar.runs import sweep as sweeplib

SIGNIFICANCE = 0.05  # a multi-seed difference with p below this is called better/worse


@dataclasses.dataclass
class Row:
    """One variant of one phase: its runs (per seed) and what they add up to."""

    phase: str
    variant: str
    description: str
    sets: list[str]
    runs: list[dict[str, Any]]  # {"key", "seed", "status", "run" (store row or None)}
    values: list[float]  # the metric of each done run
    steps: list[float]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def collect(sweep: sweeplib.Sweep) -> list[Row]:
    """Every variant's runs, from the store."""
    results = sweeplib.results(sweep)
    rows: dict[tuple[str, str], Row] = {}
    for job in sweep.jobs:
        row = rows.setdefault((job.phase, job.variant), Row(job.phase, job.variant, job.description, job.sets, [], [], []))
        result = results[job.key]
        row.runs.append({"key": job.key, "seed": job.seed, **result})
        metrics = result["run"]["metrics"] if result["run"] else {}
        if result["status"] == "done" and metrics.get(sweep.metric) is not None:
            row.values.append(metrics[sweep.metric])
            if metrics.get("steps") is not None:
                row.steps.append(metrics["steps"])
    return list(rows.values())


def write(sweep: sweeplib.Sweep, out: str | Path | None = None) -> Path:
    """report.md and its plots in `out` (default <runs_root>/sweeps/<name>/); returns report.md."""
    rows = collect(sweep)
    if not any(row.values for row in rows):
        raise UnderparError(f"sweep {sweep.name!r} has no finished run with {sweep.metric!r} yet; run `underpar sweep {sweep.file}` first")
    out = Path(out) if out is not None else Path(sweep.runs_root) / "sweeps" / sweep.name
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    from underpar.runs import report_plots

    pictures = report_plots.draw(sweep, rows, out)
    text = render(sweep, rows, pictures)
    (out / "report.md").write_text(text)
    return out / "report.md"


def check_out(out: str | Path | None) -> None:
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UnderparError(f"--out {out} is a file, not a folder; choose a folder for the report")


def render(sweep: sweeplib.Sweep, rows: list[Row], pictures: list[Path] = ()) -> str:
    by_phase = {p.name: [r for r in rows if r.phase == p.name] for p in sweep.phases}
    baseline = _find(rows, sweep.phases[0].name, sweep.phases[0].baseline)
    better = min if sweep.goal == "min" else max
    done = [r for r in rows if r.mean is not None]
    best = better(done, key=lambda r: r.mean)
    runs = [run for row in rows for run in row.runs]
    finished = [run["run"] for run in runs if run["status"] == "done" and run["run"]]
    lines = [f"# {sweep.name}: experiment log", ""]
    if sweep.description:
        lines += [sweep.description, ""]
    lines += [
        f"- Sweep file: `{sweep.file}`; base: preset `{sweep.preset}` ({sweep.track})"
        + (f" with `{' '.join(sweep.sets)}`" if sweep.sets else ""),
        f"- Device: {_joined(r['device'] for r in finished)}; commit: {_joined(r['git_commit'] for r in finished)}",
        f"- Baseline: {_label(baseline)} = {_value(baseline)}",
        f"- Best result: {_label(best)} = {_value(best)} ({_delta(best, baseline)} vs baseline)",
        f"- Metric: {sweep.metric} ({'lower' if sweep.goal == 'min' else 'higher'} is better); seeds: "
        f"{', '.join(map(str, sweep.seeds)) or 'the preset default'}",
        f"- Runs: {len(runs)} ({_counts(run['status'] for run in runs)}); report written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
    ]
    for phase in sweep.phases:
        lines += ["---", "", f"## Phase: {phase.name}", ""]
        if phase.description:
            lines += [phase.description, ""]
        phase_base = _find(rows, *phase.baseline_key)
        if phase_base.phase != phase.name:  # a stacked phase: its statuses are against the run it builds on
            lines += [f"Status against {_label(phase_base)} = {_value(phase_base)}"
                      f" ({_delta(phase_base, baseline)} vs baseline).", ""]
        lines += _table(sweep, by_phase[phase.name], phase_base, baseline) + [""]
    lines += ["---", "", "## Best config", "", f"{_label(best)}: {sweep.metric} {_value(best)} ({_delta(best, baseline)} vs baseline)",
              "", "```", _command(sweep, best), "```", ""]
    lines += ["## Progression", "", "Each phase's best variant where it beats every result before it (the stacked wins; "
              "phases stack what their `set` carries over):", "", "```"]
    width = max(len(_label(r)) for r in rows) + 16
    lines.append(f"{'Baseline (' + _label(baseline) + '):':{width}s} {_value(baseline, spread=False)}")
    record = baseline.mean
    for phase in sweep.phases:
        winners = [r for r in by_phase[phase.name] if r.mean is not None]
        top = better(winners, key=lambda r: r.mean) if winners else None
        if top is not None and (record is None or (top.mean < record if sweep.goal == "min" else top.mean > record)):
            record = top.mean
            lines.append(f"{'+ ' + _label(top) + ':':{width}s} {_value(top, spread=False)}  ({_delta(top, baseline)})")
    lines += ["```", ""]
    broken = [run for run in runs if run["status"] not in ("done",)]
    if broken:
        lines += ["## What broke", "", "| Job | Status | Run | Error |", "|---|---|---|---|"]
        for run in broken:
            r = run["run"] or {}
            lines.append(f"| {run['key']} | {run['status']} | {r.get('id', '-')} | {_cell(run['error'] or '-')} |")
        lines.append("")
    if pictures:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pictures] + [""]
    lines += ["## Runs", "", f"| Job | Run | Status | {sweep.metric} | Steps | Training s |", "|---|---|---|---|---|---|"]
    for run in runs:
        r = run["run"] or {}
        m = r.get("metrics", {})
        lines.append(f"| {run['key']} | {r.get('id', '-')} | {run['status']} | {_num(m.get(sweep.metric))} | "
                     f"{_num(m.get('steps'), '.0f')} | {_num(m.get('training_seconds'), '.1f')} |")
    lines += ["", "## Conclusions", "", "_Yours to write: what worked, what did not, what to try next._", ""]
    return "\n".join(lines)


def _table(sweep: sweeplib.Sweep, rows: list[Row], phase_base: Row, baseline: Row) -> list[str]:
    seeded = any(len(r.values) > 1 for r in rows)
    head = ["#", "Variant", "Description", sweep.metric, "Steps", "Delta vs baseline"] + (["p vs phase baseline"] if seeded else []) + ["Status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    better = min if sweep.goal == "min" else max
    finished = [r for r in rows if r.mean is not None]
    top = better(finished, key=lambda r: r.mean) if finished else None
    for i, row in enumerate(rows, 1):
        description = row.description or (" ".join(row.sets) if row.sets else "the base config")
        cells = [str(i), row.variant, _cell(description), _value(row), _num(statistics.fmean(row.steps) if row.steps else None, ".0f"),
                 _delta(row, baseline)]
        p = pvalue(row, phase_base)
        if seeded:
            cells.append("-" if p is None else f"{p:.3g}")
        cells.append(status(sweep, row, phase_base, p) + (" (best)" if row is top and len(rows) > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pvalue(row: Row, base: Row) -> float | None:
    """Two-sided Welch t-test of the variant's seeds against the phase baseline's."""
    if row is base or len(row.values) < 2 or len(base.values) < 2:
        return None
    from underpar.eval.stats import welch_test

    p = welch_test(row.values, base.values)["p"]
    return None if math.isnan(p) else p


def status(sweep: sweeplib.Sweep, row: Row, base: Row, p: float | None) -> str:
    """Runs not all done say so; else better / worse / within noise against the phase baseline
    (p < 0.05 with several seeds; |delta| > the sweep's noise with one)."""
    states = [run["status"] for run in row.runs]
    if any(s != "done" for s in states):
        return _counts(states)
    if row is base:
        return "baseline"
    if base.mean is None or row.mean is None:
        return "done"
    gain = (base.mean - row.mean) if sweep.goal == "min" else (row.mean - base.mean)
    noisy = (p is not None and p >= SIGNIFICANCE) or (p is None and abs(gain) <= sweep.noise)
    return "within noise" if noisy else ("better" if gain > 0 else "worse")


def _command(sweep: sweeplib.Sweep, row: Row) -> str:
    sets = " ".join(f"--set {json.dumps(s) if ' ' in s else s}" for s in [*sweep.sets, *row.sets])
    return f"underpar {sweep.track} --preset {sweep.preset} {sets}".rstrip()


def _find(rows: list[Row], phase: str, variant: str) -> Row:
    return next(r for r in rows if r.phase == phase and r.variant == variant)


def _label(row: Row) -> str:
    return f"{row.phase}/{row.variant}"


def _value(row: Row, spread: bool = True) -> str:
    if row.mean is None:
        return "-"
    if spread and len(row.values) > 1:
        return f"{row.mean:.4f} ± {row.std:.4f} (n={len(row.values)})"
    return f"{row.mean:.4f}"


def _delta(row: Row, base: Row) -> str:
    if row.mean is None or base.mean is None:
        return "-"
    return f"{row.mean - base.mean:+.4f}"


def _num(value: Any, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _counts(states: Any) -> str:
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def _joined(values: Any) -> str:
    return ", ".join(sorted({str(v) for v in values if v})) or "-"
