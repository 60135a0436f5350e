"""A run directory: resolved config, metrics.jsonl, train.log, summary.json, plots, artifacts;
how a run starts (a new directory, or a stopped run's own one to resume) and the summary
every track's typed summary extends."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.errors import ConfigError, UnderparError
from underpar.runs import store

SUMMARY = "summary.json"
CONFIG = "config.json"


@dataclasses.dataclass(kw_only=True)
class Summary:
    """What every track's summary carries: the run's name and directory, and where it ran
    (filled in from `environment()` when not given)."""

    name: str
    run_dir: str
    device: str = ""
    torch: str = ""
    python: str = ""
    git_commit: str | None = None

    def __post_init__(self) -> None:
        if not self.device:
            for key, value in environment().items():
                setattr(self, key, value)


class RunDir:
    """Files of one run. Only rank 0 writes; other ranks get an inert instance."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def start(cls, root: str | Path, name: str, env: dist.Env) -> RunDir:
        """A new directory under `root`, named by rank 0 (never an existing one, so a new run
        cannot append to an older run's files) and shared with every rank."""
        path = None
        if env.is_main:
            path = base = Path(root) / f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"
            n = 2
            while path.exists():
                path, n = base.with_name(f"{base.name}-{n}"), n + 1
        try:
            run_dir = cls(dist.broadcast_object(env, path), writer=env.is_main)
        except OSError as e:
            raise UnderparError(f"runs_root = {str(root)!r}: cannot create a run directory there ({e})") from None
        run_dir._register()
        return run_dir

    @classmethod
    def resume(cls, path: str | Path, env: dist.Env, needs: str) -> RunDir:
        """A stopped run's directory, checked before anything is written to it: it exists, has
        its config, has not finished, and holds `needs` (the file the track resumes from)."""
        path = Path(path)
        resumed_config(path)
        if (path / SUMMARY).is_file():
            raise UnderparError(f"cannot resume {path}: the run finished ({SUMMARY} exists); resuming would "
                                "overwrite its results, so start a new run instead")
        if not (path / needs).is_file():
            raise UnderparError(f"cannot resume {path}: it has no {needs} to resume from")
        run_dir = cls(path, writer=env.is_main)
        run_dir._register()
        return run_dir

    def _register(self) -> None:
        """Index this run in its root's store (running, beaten while the process lives), with
        the labels of whoever launched it (a sweep's job, the preset)."""
        if self.writer:
            where = environment()
            labels = store.labels()
            store.TRACKER.start(self.path.parent, self.path, device=where["device"], git_commit=where["git_commit"],
                                sweep=labels.get("sweep"), job=labels.get("job"), preset=labels.get("preset"))

    def fail(self, error: str, status: str = "failed") -> None:
        """The run ends without a summary (failed, or killed when interrupted)."""
        if self.writer:
            store.TRACKER.end(self.path, status, error=" ".join(error.split()))

    def file(self, name: str) -> Path:
        return self.path / name

    def save_config(self, cfg: Any) -> None:
        if self.writer:
            cfglib.save_json(cfg, self.file(CONFIG))
            data = cfglib.to_dict(cfg)
            seed = data.get("seed", data.get("train", {}).get("seed"))
            track = cfglib.track_of(cfg)
            preset = store.labels().get("preset") or _preset_named(data.get("name"), track)
            store.TRACKER.update(self.path, track=track, name=data.get("name"), seed=seed, preset=preset,
                                 config={"track": track, "config": data})

    def log(self, message: str) -> None:
        """A line to train.log and the console."""
        if not self.writer:
            return
        print(message, flush=True)
        with open(self.file("train.log"), "a") as f:
            f.write(message + "\n")

    def metric(self, **row: Any) -> None:
        if self.writer:
            with open(self.file("metrics.jsonl"), "a") as f:
                f.write(json.dumps(_finite(row)) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.file("metrics.jsonl")
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, after_step: int) -> None:
        """On resume: drop rows logged after the checkpoint, which the resumed run redoes."""
        if self.writer and self.file("metrics.jsonl").is_file():
            rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
            self.file("metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def save_summary(self, summary: Any) -> None:
        """summary.json from a track's summary dataclass (or a dict), written atomically."""
        if self.writer:
            data = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
            tmp = self.file(SUMMARY + ".tmp")
            tmp.write_text(json.dumps(_finite(data), indent=2) + "\n")
            os.replace(tmp, self.file(SUMMARY))
            store.TRACKER.end(self.path, "done", summary=_finite(data))


def check_run_name(name: str) -> None:
    """A run's name becomes part of its directory's name: refuse one that would leave runs_root."""
    if not re.fullmatch(r"[\w.-]+", name) or set(name) == {"."}:
        raise ConfigError(f"name = {name!r} names the run directory (<date>-<name>); use letters, digits, "
                          "'.', '_' and '-' only")


def check_runs_root(root: str, field: str = "runs_root") -> None:
    """A runs_root (the config `field`) where no run directory can be made is refused before any
    work (the nearest existing folder on the path is checked; nothing is created)."""
    path = Path(root).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UnderparError(f"{field} = {root!r}: {existing} is a file, not a folder; choose another {field}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UnderparError(f"{field} = {root!r}: {existing} is not writable; choose another {field}")


def resumed_config(path: str | Path) -> Any:
    """The config a run directory was started with (what `--resume` continues)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise UnderparError(f"cannot resume {path}: it is not a run directory (no {CONFIG})")
    return cfglib.load_json(path / CONFIG)


def _preset_named(name: Any, track: str) -> str | None:
    """Every shipped preset names its runs after itself: a run so named (and of that preset's
    track) came from it, unless a launcher labelled it otherwise."""
    try:
        return name if cfglib.list_presets().get(name) == track else None
    except (ModuleNotFoundError, OSError):  # a generated train_gpt.py ships no presets
        return None


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def environment() -> dict[str, Any]:
    """Device, versions and commit, for summaries and benchmark results."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def device_tag(name: str | None = None) -> str:
    """A short device name for result file names: h100, h200, ..., gpu, or cpu; of this machine,
    or of a device `name` as results record it (e.g. "NVIDIA H200", a merged file's runs)."""
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    name = name.lower()
    if name.startswith("cpu"):
        return "cpu"
    return next((tag for tag in ("h200", "h100", "a100", "l40s", "l4") if tag in name), "gpu")


def git_commit() -> str | None:
    """HEAD of the checkout, or $UNDERPAR_GIT_COMMIT where the tree travels without .git."""
    if os.environ.get("UNDERPAR_GIT_COMMIT"):
        return os.environ["UNDERPAR_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
