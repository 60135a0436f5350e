"""The plots of a sweep report (PNG): val_bpb against training time for every run, training
loss curves, and each variant's delta against the baseline (std error bars with seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from underpar.runs.rundir import RunDir  # noqa: E402

if TYPE_CHECKING:
    from underpar.runs.report import Row
    from underpar.runs.sweep import Sweep


def draw(sweep: Sweep, rows: list[Row], out: Path) -> list[Path]:
    """Every plot there is data for; the paths written."""
    colors = {(r.phase, r.variant): plt.cm.tab10(i % 10) for i, r in enumerate(rows)}
    series = []  # (row, seed, metrics rows) of every finished or partial run with a directory
    for row in rows:
        for run in row.runs:
            if run["run"] and Path(run["run"]["run_dir"]).is_dir():
                series.append((row, run["seed"], RunDir(run["run"]["run_dir"], writer=False).metrics()))
    written = []
    for name, key, x, ylabel in (("val_vs_time.png", "val_bpb", "elapsed", "val_bpb"),
                                 ("loss_curves.png", "train_loss", "step", "train loss (nats)")):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = set()
        for row, seed, metrics in series:
            points = [(m[x], m[key]) for m in metrics if m.get(key) is not None and m.get(x) is not None and not m.get("final")]
            final = [(m[x], m[key]) for m in metrics if m.get(key) is not None and m.get("final")]
            label = None if (row.phase, row.variant) in drawn else f"{row.phase}/{row.variant}"
            if points:
                ax.plot(*zip(*points), "-" if key == "train_loss" else "o-", color=colors[row.phase, row.variant],
                        lw=1, markersize=3, label=label)
                drawn.add((row.phase, row.variant))
            if final:
                ax.plot(*zip(*final), "*", color=colors[row.phase, row.variant], markersize=10,
                        label=None if label is None or points else label)
                drawn.add((row.phase, row.variant))
        if drawn:
            ax.set_xlabel("training time (s)" if x == "elapsed" else "step")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{sweep.name}: {ylabel}" + (" (stars: final, whole split)" if key == "val_bpb" else ""), fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            written.append(out / name)
        plt.close(fig)
    base = next(r for r in rows if r.phase == sweep.phases[0].name and r.variant == sweep.phases[0].baseline)
    scored = [r for r in rows if r.mean is not None]
    if base.mean is not None and scored:
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(scored) + 1.2))
        deltas = [r.mean - base.mean for r in scored]
        errors = [r.std or 0.0 for r in scored]
        good = [(d < 0) == (sweep.goal == "min") for d in deltas]
        ax.barh(range(len(scored)), deltas, xerr=errors, color=["tab:green" if g else "tab:red" for g in good], capsize=2)
        ax.set_yticks(range(len(scored)), [f"{r.phase}/{r.variant}" for r in scored], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"{sweep.metric} - baseline ({base.phase}/{base.variant} = {base.mean:.4f})")
        ax.set_title(f"{sweep.name}: delta vs baseline (green = better; bars: std over seeds)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "deltas.png", dpi=110)
        plt.close(fig)
        written.append(out / "deltas.png")
    return written
