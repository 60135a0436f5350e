"""Groups of runs that differ only in their seed: `underpar pretrain --seeds 1337,42,2024`
runs a config once per seed and writes a group summary (group.json), and `underpar compare`
reads two groups (group summaries, run directories, or folders of runs) to test whether one
beats the other the way the challenge asks (eval/stats.py: compare_groups)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from underpar import config as cfglib
from underpar.errors import UnderparError
from underpar.eval.stats import check_bar, compare_groups, mean_ci
from underpar.runs.rundir import SUMMARY, environment

GROUP = "group.json"
SCORES = ("plain", "sliding", "ttt")  # plain: the round-trip val_bpb; others: summary["scores"][name]


def parse_seeds(text: str, resume: str | None = None) -> list[int]:
    """"1337,42,2024" -> [1337, 42, 2024]; at least one, all distinct (`--seeds`; a resumed
    run is one run, so `resume` must be None)."""
    if resume is not None:
        raise UnderparError("--seeds and --resume together: resume each stopped run on its own")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise UnderparError(f"--seeds: expected comma-separated integers, e.g. 1337,42,2024; got {text!r}") from None
    if not seeds:
        raise UnderparError("--seeds: give at least one seed, e.g. 1337,42,2024")
    if len(set(seeds)) != len(seeds):
        raise UnderparError(f"--seeds: {text!r} repeats a seed; a repeated seed repeats the same run")
    return seeds


def run_seeds(cfg: Any, seeds: list[int], run: Callable[[Any], Any], say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Run `cfg` once per seed (train.seed, and the name gets -seed<S>) with `run` (a track's
    run function returning its summary), then write the group summary under train.runs_root.
    Returns it on rank 0 (None on other ranks)."""
    summaries = []
    for index, seed in enumerate(seeds, 1):
        say(f"seed {seed} ({index} of {len(seeds)})")
        seeded = cfglib.override(cfglib.override(cfg, f"train.seed={seed}"), f"name={cfg.name}-seed{seed}")
        summaries.append((seed, run(seeded)))
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    group = group_summary(cfg.name, [(seed, dataclasses.asdict(s)) for seed, s in summaries])
    base = folder = Path(cfg.train.runs_root) / f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.name}-seeds"
    n = 2
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    folder.mkdir(parents=True)
    (folder / GROUP).write_text(json.dumps({**group, "dir": str(folder)}, indent=2) + "\n")
    return {**group, "dir": str(folder)}


def seeds_command(cfg: Any, seeds: list[int], run: Callable[[Any], Any], say: Callable[[str], None] = print) -> str:
    """`pretrain --seeds`: the runs, then the group's line (rank 0; "" on the others)."""
    group = run_seeds(cfg, seeds, run, say)
    if group is None:
        return ""
    bpb = group["val_bpb"]
    spread = f" +- {bpb['std']:.4f} (std), 95% CI [{bpb['lo']:.4f}, {bpb['hi']:.4f}]" if len(seeds) > 1 else ""
    return (f"\n{len(seeds)} seed(s): val_bpb {bpb['mean']:.4f}{spread} after the round trip\n"
            f"group summary {group['dir']}/{GROUP} (underpar compare BASELINE CANDIDATE tests two groups)")


def _entry(seed: int | None, summary: dict[str, Any]) -> dict[str, Any]:
    """What a group keeps of one run's summary."""
    keep = ("run_dir", "val_bpb", "val_loss", "val_bpb_pre_quant", "val_loss_pre_quant", "steps", "training_seconds",
            "eval_seconds", "scores")
    entry = {"seed": seed, **{k: summary[k] for k in keep if k in summary}}
    if isinstance(summary.get("artifact_bytes"), dict):
        entry["artifact_bytes"] = summary["artifact_bytes"].get("total")
    return entry


def group_summary(name: str, runs: list[tuple[int | None, dict[str, Any]]]) -> dict[str, Any]:
    """Per-seed results and the mean, std and 95% t-interval of val_bpb and val_loss."""
    entries = [_entry(seed, s) for seed, s in runs]
    return {
        "name": name,
        "seeds": [e["seed"] for e in entries],
        "runs": entries,
        "val_bpb": mean_ci([e["val_bpb"] for e in entries]),
        "val_loss": mean_ci([e["val_loss"] for e in entries]),
        **environment(),
    }


# ---------------------------------------------------------------------------------------
# reading groups back


def load_group(spec: str) -> list[dict[str, Any]]:
    """The runs a command-line group names: comma-separated paths, each a group summary
    (group.json or its folder), a run directory (summary.json), or a folder of run
    directories."""
    runs: list[dict[str, Any]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        runs += _load_path(Path(part))
    if not runs:
        raise UnderparError(f"{spec!r} names no runs")
    return runs


def _load_path(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        if (path / GROUP).is_file():
            return _load_path(path / GROUP)
        if (path / SUMMARY).is_file():
            return _load_path(path / SUMMARY)
        inside = sorted(p for p in path.iterdir() if (p / SUMMARY).is_file())
        if not inside:
            raise UnderparError(f"{path} holds no {GROUP}, no {SUMMARY} and no finished run directories")
        return [r for p in inside for r in _load_path(p / SUMMARY)]
    if not path.is_file():
        raise UnderparError(f"{path} does not exist; give a group summary, a run directory or a folder of runs")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UnderparError(f"{path} cannot be read as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("runs"), list):
        return data["runs"]
    if isinstance(data, dict) and "val_bpb" in data and "val_loss" in data:
        return [_entry(None, {"run_dir": str(path.parent), **data})]
    raise UnderparError(f"{path} is neither a group summary ({GROUP}) nor a run's {SUMMARY}")


def values(runs: list[dict[str, Any]], score: str, where: str) -> tuple[list[float], list[float]]:
    """(val_loss, val_bpb) of each run for `score` (plain: the round-trip score)."""
    if score not in SCORES:
        raise UnderparError(f"--score {score!r} is not valid; choose one of: {', '.join(SCORES)}")
    losses, bpbs = [], []
    for run in runs:
        result = run if score == "plain" else (run.get("scores") or {}).get(score)
        if not result or result.get("val_bpb") is None or result.get("val_loss") is None:
            raise UnderparError(f"{where}: run {run.get('run_dir', '?')} has no {score} score"
                                + ("" if score == "plain" else f" (it ran without the {score} evaluation)"))
        losses.append(float(result["val_loss"]))
        bpbs.append(float(result["val_bpb"]))
    return losses, bpbs


def compare_command(baseline: str, candidate: str, score: str, margin_nats: str, alpha: str, as_json: bool) -> str:
    """`underpar compare`: the options checked before any file is read, then the comparison
    as a short table and the verdict (or as JSON)."""
    numbers = {}
    for name, text in (("--margin-nats", margin_nats), ("--alpha", alpha)):
        try:
            numbers[name] = float(text)
        except ValueError:
            raise UnderparError(f"{name}: expected a number, got {text!r}") from None
    check_bar(numbers["--margin-nats"], numbers["--alpha"])
    if score not in SCORES:
        raise UnderparError(f"--score {score!r} is not valid; choose one of: {', '.join(SCORES)}")
    groups = {name: values(load_group(spec), score, name) for name, spec in (("baseline", baseline), ("candidate", candidate))}
    result = compare_groups(groups["baseline"][0], groups["candidate"][0], groups["baseline"][1], groups["candidate"][1],
                            margin_nats=numbers["--margin-nats"], alpha=numbers["--alpha"])
    if as_json:
        return json.dumps({"score": score, **result}, indent=2)
    lines = [f"{name:9s} n={side['n']}  val_bpb {side['val_bpb']['mean']:.5f} +- {side['val_bpb']['std']:.5f}  "
             f"val_loss {side['val_loss']['mean']:.5f} +- {side['val_loss']['std']:.5f} nats"
             for name, side in ((n, result[n]) for n in ("baseline", "candidate"))]
    diff, welch = result["difference"], result["welch"]
    lines.append(f"difference (candidate - baseline): {diff['val_bpb']:+.5f} bpb, {diff['val_loss_nats']:+.5f} nats")
    lines.append(f"Welch one-sided, margin {result['bar']['margin_nats']:g} nats: t = {welch['t']:.3f}, "
                 f"df = {welch['df']:.2f}, p = {welch['p']:.3g} (without the margin: p = {result['welch_no_margin']['p']:.3g})")
    lines.append(result["verdict"])
    return "\n".join(lines)
