"""`underpar record RUN...`: a Parameter Golf submission folder for a group of seeds of one
config: submission.json (author, github_id, val_bpb/val_loss mean and std, bytes_total and
bytes_code, per-seed results, the one-sided Welch test against a previous record when given),
README.md, each seed's training log, and the generated single-file train_gpt.py (runs/script.py)
whose bytes are the code bytes: bytes_total = the script + the largest seed's model bytes."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from underpar.errors import UnderparError
from underpar.runs import script
from underpar.runs.rundir import CONFIG, SUMMARY, git_commit

# Fields that may differ between the seeds of one record (everything else must match).
PER_SEED = ("name", "train.seed", "train.runs_root")


def check_identity(author: str, github_id: str, name: str | None = None) -> None:
    if name is not None and not re.fullmatch(r"[\w.+-]+", name):
        raise UnderparError(f"--name {name!r}: use letters, digits, '.', '_', '+' and '-' only")
    if not author.strip():
        raise UnderparError("--author is empty; give the name the record is submitted under")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})", github_id):
        raise UnderparError(f"--github-id {github_id!r} is not a GitHub user name (letters, digits and '-', at most 39)")


def load_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Each run's config and summary; all finished pretrain runs of one config but the seed."""
    runs = []
    for text in paths:
        path = Path(text)
        if not (path / CONFIG).is_file():
            raise UnderparError(f"{path} is not a run directory (no {CONFIG})")
        if not (path / SUMMARY).is_file():
            raise UnderparError(f"{path} has not finished (no {SUMMARY}); a record needs finished runs")
        data = json.loads((path / CONFIG).read_text())
        if data.get("track") != "pretrain":
            raise UnderparError(f"{path} is a {data.get('track')} run; records are pretrain runs")
        runs.append({"dir": path, "config": data["config"], "summary": json.loads((path / SUMMARY).read_text())})
    first = _comparable(runs[0]["config"])
    for run in runs[1:]:
        if _comparable(run["config"]) != first:
            keys = sorted(k for k in set(first) | set(_comparable(run["config"])) if first.get(k) != _comparable(run["config"]).get(k))
            raise UnderparError(f"{run['dir']} differs from {runs[0]['dir']} in more than its seed ({', '.join(keys[:5])}); "
                                "a record's runs share one config")
    seeds = [run["config"]["train"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise UnderparError(f"two runs share a seed ({seeds}); a record's runs are one per seed")
    return runs


def _comparable(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_comparable(value, path + "."))
        elif path not in PER_SEED:
            out[path] = value
    return out


def write(paths: list[str], out: str | Path, author: str, github_id: str, name: str | None = None,
          previous: str | None = None, wrapper: str | None = "lzma") -> dict[str, Any]:
    """The submission folder; returns submission.json's content."""
    check_identity(author, github_id, name)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnderparError(f"--out {out} exists and is not an empty folder; choose a new one")
    base = _previous(previous) if previous else None
    runs = load_runs(paths)
    comparison = _compare(previous, base, runs) if base else None
    out.mkdir(parents=True, exist_ok=True)
    config = dict(runs[0]["config"])
    config["name"] = name or config["name"]
    commit = runs[0]["summary"].get("git_commit")
    shipped = script.write(out / "train_gpt.py", config, None, commit, wrapper=wrapper)
    model_bytes = max(run["summary"]["artifact_bytes"]["model"] for run in runs)
    seeds = {}
    for run in runs:
        s, seed = run["summary"], run["config"]["train"]["seed"]
        if (run["dir"] / "train.log").is_file():
            shutil.copyfile(run["dir"] / "train.log", out / f"train_seed{seed}.log")
        seeds[str(seed)] = {"val_bpb": s["val_bpb"], "val_loss": s["val_loss"], "steps": s["steps"],
                            "training_seconds": s["training_seconds"], "model_bytes": s["artifact_bytes"]["model"],
                            "artifact_bytes": shipped["bytes"] + s["artifact_bytes"]["model"], "run": run["dir"].name}
    bpb = [r["val_bpb"] for r in seeds.values()]
    loss = [r["val_loss"] for r in seeds.values()]
    submission = {
        "author": author, "github_id": github_id, "name": config["name"],
        "date": datetime.date.today().isoformat(), "track": "10min_16mb",
        "val_bpb": round(statistics.fmean(bpb), 8), "val_bpb_std": round(statistics.stdev(bpb), 8) if len(bpb) > 1 else None,
        "val_loss": round(statistics.fmean(loss), 8), "val_loss_std": round(statistics.stdev(loss), 8) if len(loss) > 1 else None,
        "bytes_total": shipped["bytes"] + model_bytes, "bytes_code": shipped["bytes"], "bytes_model": model_bytes,
        "code": {"wrapper": shipped["wrapper"], "source_bytes": shipped["source_bytes"], "modules": shipped["modules"]},
        "seeds": [int(k) for k in seeds], "seed_results": seeds,
        "hardware": runs[0]["summary"].get("device"), "git_commit": commit,
    }
    if comparison is not None:
        submission["comparison"] = comparison
    here = git_commit()
    if commit and here and commit != here:  # the script bundles the package as it is now
        submission["code"]["bundled_from"] = here
    (out / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
    (out / "README.md").write_text(_readme(submission, config))
    return submission


def _previous(previous: str) -> tuple[list[float], list[float]]:
    """(val_loss, val_bpb) of the previous record's runs."""
    from underpar.runs.group import load_group, values

    return values(load_group(previous), "plain", "--previous")


def _compare(previous: str, base: tuple[list[float], list[float]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The challenge's bar: the new runs' val_loss lower than the previous record's by 0.005
    nats, one-sided Welch p < 0.01 (eval.stats.compare_groups)."""
    from underpar.eval.stats import compare_groups

    base_loss, base_bpb = base
    loss = [run["summary"]["val_loss"] for run in runs]
    bpb = [run["summary"]["val_bpb"] for run in runs]
    result = compare_groups(base_loss, loss, base_bpb, bpb)
    return {"previous": previous, **result}


def _readme(sub: dict[str, Any], config: dict[str, Any]) -> str:
    rows = "\n".join(f"| {seed} | {r['val_bpb']:.5f} | {r['val_loss']:.5f} | {r['steps']} | {r['training_seconds']:.0f} | "
                     f"{r['artifact_bytes']:,} |" for seed, r in sub["seed_results"].items())
    std = f" ± {sub['val_bpb_std']:.5f}" if sub["val_bpb_std"] is not None else ""
    lines = [
        f"# {sub['name']}", "",
        f"val_bpb **{sub['val_bpb']:.5f}**{std} over {len(sub['seeds'])} seed(s), after the quantization round trip; "
        f"artifact {sub['bytes_total']:,} bytes = code {sub['bytes_code']:,} (train_gpt.py) + model {sub['bytes_model']:,}.",
        "", "| seed | val_bpb | val_loss (nats) | steps | training s | artifact bytes |", "|---|---|---|---|---|---|", rows, "",
        "## Run it", "", "```bash",
        "torchrun --standalone --nproc_per_node=8 train_gpt.py            # SEED=42 RUN_ID=x ... as environment variables",
        "```", "",
        f"`train_gpt.py` is generated by underpar (commit {sub['git_commit']}) from the {sub['code']['modules']} modules the "
        f"pretrain track imports ({sub['code']['source_bytes']:,} bytes of source without docstrings or comments, shipped "
        f"as a {sub['code']['wrapper']} self-extracting wrapper) and this config; its own size is the code bytes its artifact "
        "accounting counts. Environment variables: RUN_ID, SEED, ITERATIONS, MAX_WALLCLOCK_SECONDS, VAL_LOSS_EVERY, "
        "DATA_PATH, RUNS_ROOT, and UNDERPAR_SET='a.b=v;c.d=w' for any config field. The data folder is a prepared one "
        "(`underpar data prepare`: manifest.json, tokenizer, shards).", "",
    ]
    if "comparison" in sub:
        c = sub["comparison"]
        lines += ["## Against the previous record", "", "```json", json.dumps(c, indent=2), "```", ""]
    lines += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)
