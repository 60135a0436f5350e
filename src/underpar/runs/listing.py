"""`underpar runs list|show|rm`: filters over the run store (track, preset, status, sweep,
metric ranges) and the table they print. Torch-free, so listing runs is instant."""

from __future__ import annotations

import datetime
import json
import operator
import re
import shutil
from pathlib import Path
from typing import Any

from underpar import config as cfglib
from underpar.errors import ConfigError, UnderparError
from underpar.runs.store import STATUSES, Store

PRIMARY_METRIC = {"pretrain": "val_bpb"}  # the column `runs list` shows; any metric filters
_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "<": operator.lt, ">": operator.gt, "=": operator.eq}
_WHERE = re.compile(r"\s*([\w.\-]+)\s*(<=|>=|!=|<|>|=)\s*(\S+)\s*")


def parse_where(text: str) -> tuple[str, str, float]:
    """`val_bpb<2.1`, `steps>=100`, `seed=42`: a summary number (or seed) against a number."""
    match = _WHERE.fullmatch(text)
    try:
        value = float(match[3]) if match else None
    except ValueError:
        value = None
    if value is None:
        raise ConfigError(f"--where {text!r}: expected METRIC OP NUMBER with OP one of {', '.join(_OPS)}, "
                          "e.g. --where 'val_bpb<2.1' (metrics: the summary's numbers, nested keys joined by '.')")
    return match[1], match[2], value


def check_filters(track: str | None = None, preset: str | None = None, status: str | None = None,
                  sweep: str | None = None, where: list[str] = ()) -> list[tuple[str, str, float]]:
    """Every filter checked before the store is opened; the parsed metric conditions."""
    if track is not None and track not in ("pretrain", "finetune", "randopt"):
        raise ConfigError(f"--track {track!r} is not valid; choose one of: pretrain, finetune, randopt")
    if preset is not None:
        cfglib.load_preset(preset)
    if status is not None and status not in STATUSES:
        raise ConfigError(f"--status {status!r} is not valid; choose one of: {', '.join(STATUSES)}")
    if sweep is not None and not re.fullmatch(r"[\w.-]+", sweep):
        raise ConfigError(f"--sweep {sweep!r} is not a sweep name (letters, digits, '.', '_' and '-')")
    return [parse_where(w) for w in where]


def check_ref(ref: str) -> None:
    if not ref.strip():
        raise ConfigError("an empty run id; give a run's id (see `underpar runs list`)")


def select(store: Store, track: str | None = None, preset: str | None = None, status: str | None = None,
           sweep: str | None = None, where: list[str] = ()) -> list[dict[str, Any]]:
    """The runs that pass every filter."""
    conditions = check_filters(track, preset, status, sweep, where)
    rows = store.runs()
    if sweep is not None and not any(r["sweep"] == sweep for r in rows):
        known = sorted({r["sweep"] for r in rows if r["sweep"]})
        raise UnderparError(f"--sweep {sweep!r}: no run of that sweep in {store.path}; sweeps there: {', '.join(known) or 'none'}")
    out = []
    for row in rows:
        if (track and row["track"] != track) or (preset and row["preset"] != preset) or \
                (status and row["status"] != status) or (sweep and row["sweep"] != sweep):
            continue
        numbers = {**row["metrics"], "seed": row["seed"]}
        if all(numbers.get(key) is not None and _OPS[op](numbers[key], value) for key, op, value in conditions):
            out.append(row)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """One line per run: id, track, preset, status, seed, the track's score, steps, start, job."""
    header = ("id", "track", "preset", "status", "seed", "score", "steps", "started", "sweep job")
    lines = [header]
    for r in rows:
        metric = PRIMARY_METRIC.get(r["track"] or "")
        score = r["metrics"].get(metric) if metric else None
        steps = r["metrics"].get("steps")
        lines.append((r["id"], r["track"] or "?", r["preset"] or "-", r["status"], "-" if r["seed"] is None else str(r["seed"]),
                      "-" if score is None else f"{metric} {score:.4f}", "-" if steps is None else str(int(steps)),
                      _when(r["started"]), f"{r['sweep']}:{r['job']}" if r["sweep"] else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def show(row: dict[str, Any]) -> str:
    """A run's whole store record (config, metrics, times) as JSON."""
    out = dict(row)
    for key in ("started", "ended", "heartbeat"):
        out[key] = _when(out[key], seconds=True)
    return json.dumps(out, indent=2)


def remove(store: Store, refs: list[str], delete_files: bool) -> list[str]:
    """Forget runs (all checked first); with `delete_files`, delete their directories too. A
    running run is refused: its process would register it again."""
    rows = [store.get(ref) for ref in refs]
    for row in rows:
        if row["status"] == "running":
            raise UnderparError(f"run {row['id']} is running (pid {row['pid']} on {row['host']}); stop it first")
    said = []
    for row in rows:
        store.remove(row["id"])
        path = Path(row["run_dir"])
        if delete_files and path.is_dir() and path.parent.resolve() == store.root.resolve():
            shutil.rmtree(path)
            said.append(f"removed {row['id']} and its directory {path}")
        else:
            said.append(f"removed {row['id']} from the store" + ("" if delete_files else f" (its directory {path} stays)"))
    return said


def _when(stamp: float | None, seconds: bool = False) -> str:
    if stamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M" + (":%S" if seconds else ""))
