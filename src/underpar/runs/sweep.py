"""Sweeps: a TOML file (a base preset, phases of named variants as `--set` overrides or grids,
seeds, descriptions) becomes a list of jobs, every one resolved and checked before any runs;
`run_sweep` runs a worker's share of them, claiming each job in the run store first, so a
sweep can be resumed after a kill (finished jobs are skipped, killed ones rerun) and shared
by several workers (one per GPU, or the tasks of a SLURM job array) without running a job twice.

    name = "tiny-activations"          # default: the file's name
    preset = "tiny-cpu"                # every run starts from it (its track runs)
    set = ["train.max_steps=50"]       # overrides for every run; ${VAR} reads the environment
    seeds = [1337, 42]                 # each variant runs once per seed
    metric = "val_bpb"                 # summary number compared (pretrain default), goal "min"

    [[phase]]
    name = "activation"
    description = "MLP activation"
    baseline = "relu2"                 # default: the phase's first variant; "phase/variant": an earlier phase's
    set = []                           # overrides for this phase's variants (stack winners here)
    [[phase.variant]]
    name = "relu2"
    description = "the default"
    [[phase.variant]]
    name = "leaky"
    set = ["model.mlp.activation=leaky_relu2"]
    [[phase.grid]]                     # one variant per combination: lr-optim.matrix_lr=0.02, ...
    name = "lr"
    axes = { "optim.matrix_lr" = [0.02, 0.06] }
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from underpar import config as cfglib
from underpar.errors import ConfigError, UnderparError
from underpar.runs import store as storelib

SEED_KEYS = {"pretrain": "train.seed", "finetune": "train.seed", "randopt": "seed"}
DEFAULT_METRICS = {"pretrain": "val_bpb"}
TOP_KEYS = ("name", "description", "preset", "set", "seeds", "seed_key", "metric", "goal", "noise", "phase")
PHASE_KEYS = ("name", "description", "baseline", "set", "variant", "grid")
VARIANT_KEYS = ("name", "description", "set")
GRID_KEYS = ("name", "description", "set", "axes")
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")  # ${NAME}, ${NAME:-default}, $NAME


@dataclasses.dataclass
class Job:
    phase: str
    variant: str
    description: str
    seed: int
    sets: list[str]  # the variant's overrides (phase + variant), as the report shows them
    config: Any  # the resolved config this job runs

    @property
    def key(self) -> str:
        return f"{self.phase}/{self.variant}/seed={self.seed}"


@dataclasses.dataclass
class Phase:
    name: str
    description: str
    baseline: str  # a variant of this phase, or of `baseline_phase`
    variants: list[tuple[str, str, list[str]]]  # (name, description, overrides)
    baseline_phase: str = ""  # "" = this phase; else an earlier phase (a stacked phase compared with its source)

    @property
    def baseline_key(self) -> tuple[str, str]:
        """(phase, variant) of the run this phase's variants are compared with."""
        return (self.baseline_phase or self.name, self.baseline)


@dataclasses.dataclass
class Sweep:
    name: str
    description: str
    file: str
    preset: str
    track: str
    sets: list[str]
    seeds: list[int]
    metric: str
    goal: str  # min | max
    noise: float  # |delta| below this reads "within noise" when there is one seed
    phases: list[Phase]
    jobs: list[Job]
    runs_root: str


def load(path: str | Path) -> Sweep:
    """Read, expand and check a sweep file; every job's config is resolved here, so a typo in
    the last variant fails before the first run starts."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"sweep file {path} is not valid TOML: {e}") from None
    where = f"sweep file {path}"
    _keys(data, TOP_KEYS, where)
    if "preset" not in data:
        raise ConfigError(f"{where}: no preset (the base config every run starts from; see `underpar config presets`)")
    preset = _typed(data, "preset", str, where)
    track, _ = cfglib.load_preset(preset)
    if track not in SEED_KEYS:
        raise ConfigError(f"{where}: preset '{preset}' is for '{track}'; a sweep runs pretrain, finetune or randopt")
    name = _typed(data, "name", str, where, default=path.stem)
    if not re.fullmatch(r"[\w.-]+", name):
        raise ConfigError(f"{where}: name = {name!r}; use letters, digits, '.', '_' and '-' only")
    seed_key = _typed(data, "seed_key", str, where, default=SEED_KEYS[track])
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{where}: seeds = {seeds!r}; expected a non-empty list of distinct integers")
    metric = _typed(data, "metric", str, where, default=DEFAULT_METRICS.get(track, ""))
    if not metric:
        raise ConfigError(f"{where}: no metric for a {track} sweep; name the summary number to compare, "
                          "e.g. metric = \"eval.gsm8k.accuracy.mean\" with goal = \"max\"")
    goal = _typed(data, "goal", str, where, default="min")
    if goal not in ("min", "max"):
        raise ConfigError(f"{where}: goal = {goal!r} is not valid; choose one of: min, max")
    noise = data.get("noise", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
        raise ConfigError(f"{where}: noise = {noise!r}; expected a number >= 0")
    base = _overrides(data, where)
    phases = [_phase(p, i, where) for i, p in enumerate(_tables(data, "phase", where, required=True))]
    if len({p.name for p in phases}) != len(phases):
        raise ConfigError(f"{where}: two phases share a name; each needs its own")
    for i, phase in enumerate(phases):
        earlier = {p.name: [v[0] for v in p.variants] for p in phases[:i]}
        if phase.baseline_phase and phase.baseline not in earlier.get(phase.baseline_phase, []):
            raise ConfigError(f"{where}, phase {phase.name!r}: baseline = '{phase.baseline_phase}/{phase.baseline}' is not a "
                              f"variant of an earlier phase (earlier phases: {', '.join(earlier) or 'none'})")
    default_seed = cfglib.to_dict(cfglib.resolve(track, preset, base))
    jobs = []
    for phase in phases:
        for variant, description, sets in phase.variants:
            for seed in seeds or [_get(default_seed, seed_key, where)]:
                run_name = re.sub(r"[^\w.-]+", "-", f"{name}.{phase.name}.{variant}.s{seed}")
                every = [*base, *sets, f"name={run_name}", f"{seed_key}={seed}"]
                try:
                    cfg = cfglib.resolve(track, preset, every)
                except UnderparError as e:
                    raise ConfigError(f"{where}, phase {phase.name!r}, variant {variant!r}: {e}") from None
                jobs.append(Job(phase.name, variant, description, seed, sets, cfg))
    roots = {_runs_root(job.config) for job in jobs}
    if len(roots) > 1:
        raise ConfigError(f"{where}: the runs go to different runs_root folders ({', '.join(sorted(roots))}); "
                          "a sweep's runs share one store, so set runs_root once for all of them")
    return Sweep(name, _typed(data, "description", str, where, default=""), str(path), preset, track, base,
                 seeds or [], metric, goal, float(noise), phases, jobs, roots.pop())


def _phase(data: dict[str, Any], index: int, where: str) -> Phase:
    _keys(data, PHASE_KEYS, f"{where}, phase {index + 1}")
    name = _typed(data, "name", str, f"{where}, phase {index + 1}", default=f"phase{index + 1}")
    where = f"{where}, phase {name!r}"
    common = _overrides(data, where)
    variants = []
    for i, v in enumerate(_tables(data, "variant", where)):
        _keys(v, VARIANT_KEYS, f"{where}, variant {i + 1}")
        if "name" not in v:
            raise ConfigError(f"{where}, variant {i + 1}: no name")
        vname = _typed(v, "name", str, where)
        variants.append((vname, _typed(v, "description", str, where, default=""), common + _overrides(v, f"{where}, variant {vname!r}")))
    for i, grid in enumerate(_tables(data, "grid", where)):
        gwhere = f"{where}, grid {i + 1}"
        _keys(grid, GRID_KEYS, gwhere)
        axes = grid.get("axes")
        if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
            raise ConfigError(f"{gwhere}: axes = {axes!r}; expected a table of field = [values, ...], e.g. "
                              "axes = { \"optim.matrix_lr\" = [0.02, 0.04] }")
        prefix = _typed(grid, "name", str, gwhere, default="grid")
        shared = common + _overrides(grid, gwhere)
        for values in itertools.product(*axes.values()):
            pairs = [f"{k}={_toml_value(v)}" for k, v in zip(axes, values)]
            variants.append((f"{prefix}-{','.join(pairs)}", _typed(grid, "description", str, gwhere, default=""), shared + pairs))
    if not variants:
        raise ConfigError(f"{where}: no variants; add [[phase.variant]] or [[phase.grid]] tables")
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: variant names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    baseline = _typed(data, "baseline", str, where, default=names[0])
    if baseline in names:
        return Phase(name, _typed(data, "description", str, where, default=""), baseline, variants)
    if "/" not in baseline:
        raise ConfigError(f"{where}: baseline = {baseline!r} is not one of its variants: {', '.join(names)} "
                          "(an earlier phase's variant is written \"phase/variant\")")
    source, variant = baseline.split("/", 1)
    return Phase(name, _typed(data, "description", str, where, default=""), variant, variants, source)


def _keys(data: dict[str, Any], valid: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key '{key}'; valid keys here: {', '.join(valid)}")


def _typed(data: dict[str, Any], key: str, tp: type, where: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: {key} = {value!r}; expected a {tp.__name__}")
    return value


def _tables(data: dict[str, Any], key: str, where: str, required: bool = False) -> list[dict[str, Any]]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables) or (required and not tables):
        raise ConfigError(f"{where}: expected one or more [[{key}]] tables")
    return tables


def _overrides(data: dict[str, Any], where: str) -> list[str]:
    """`set`: a list of "a.b=value" strings, ${VAR} / $VAR / ${VAR:-default} expanded; an unset
    variable without a default is an error (a silently empty value once cost a wave of runs)."""
    sets = data.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(s, str) for s in sets):
        raise ConfigError(f"{where}: set = {sets!r}; expected a list of \"section.key=value\" strings")
    out = []
    for text in sets:
        missing = [m[1] or m[3] for m in _VAR.finditer(text) if (m[1] or m[3]) not in os.environ and m[2] is None]
        if missing:
            raise ConfigError(f"{where}: override {text!r} uses ${missing[0]}, which is not set; export it or write the value")
        if "=" not in text:
            raise ConfigError(f"{where}: override {text!r} must look like section.key=value")
        out.append(_VAR.sub(_expand, text))
    return out


def _expand(match: re.Match) -> str:
    name, default, bare = match.groups()
    if name and name not in os.environ and default is not None:
        return default
    return os.environ[name or bare]


def _toml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _get(data: dict[str, Any], dotted: str, where: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"{where}: seed_key = {dotted!r} is not a field of the config")
        data = data[key]
    return data


def _runs_root(cfg: Any) -> str:
    data = cfglib.to_dict(cfg)
    return data.get("runs_root") or data["train"]["runs_root"]


# ---------------------------------------------------------------------------------------
# running


def parse_worker(text: str) -> tuple[int, int]:
    """`i/n` (0 <= i < n): this worker runs jobs i, i + n, i + 2n, ... of the sweep."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--worker {text!r}: expected i/n with 0 <= i < n, e.g. 0/4 "
                          "(in a SLURM array: --worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match[1]), int(match[2])


def run_track(track: str, cfg: Any) -> Any:
    """The track's own `run` in this process: the summary it returns. Dynamo's caches are
    emptied first, so the graphs of earlier jobs (other shapes of the same functions) do not
    count against its recompile limit, which fails a fullgraph compile once reached."""
    from importlib import import_module

    import torch

    torch._dynamo.reset()
    return import_module(f"underpar.tracks.{track}").run(cfg)


def run_sweep(sweep: Sweep, worker: tuple[int, int] = (0, 1), rerun_failed: bool = False,
              execute: Callable[[str, Any], Any] = run_track, say: Callable[[str], None] = print) -> dict[str, int]:
    """Run this worker's share of the jobs that are not done. Each job is claimed in the store
    first (so no two workers run it), labelled so its run is found again, and ended as done,
    failed or killed; a failed job does not stop the sweep, Ctrl-C does (the job reads killed
    and reruns next time). Returns counts of what happened to this worker's jobs."""
    store = storelib.Store(sweep.runs_root)
    index, count = worker
    mine = [job for i, job in enumerate(sweep.jobs) if i % count == index]
    tally = {"ran": 0, "failed": 0, "done before": 0, "running elsewhere": 0, "failed before": 0}
    tag = f"{index}/{count}"
    for n, job in enumerate(mine, 1):
        head = f"[{sweep.name} {n}/{len(mine)}] {job.key}"
        taken = store.claim(sweep.name, job.key, tag, rerun_failed)
        if taken is not None:
            kind = {"done": "done before", "running": "running elsewhere", "failed": "failed before"}[taken]
            tally[kind] += 1
            say(f"{head}: {kind}" + (" (rerun with --rerun-failed)" if taken == "failed" else ""))
            continue
        storelib.TRACKER.hold(store)
        try:
            with storelib.labelled(sweep=sweep.name, job=job.key, preset=sweep.preset):
                summary = execute(sweep.track, job.config)
        except KeyboardInterrupt:
            _end(store, sweep, job, "killed", "interrupted")
            raise
        except Exception as e:  # one failed job does not stop the sweep
            message = " ".join(f"{type(e).__name__}: {e}".split()) if not isinstance(e, UnderparError) else " ".join(str(e).split())
            _end(store, sweep, job, "failed", message)
            tally["failed"] += 1
            say(f"{head}: failed: {message}")
            continue
        finally:
            storelib.TRACKER.release(store)
        run_dir = getattr(summary, "run_dir", None)
        store.end_job(sweep.name, job.key, "done", run_id=Path(run_dir).name if run_dir else None)
        tally["ran"] += 1
        value = storelib.flatten(dataclasses.asdict(summary)).get(sweep.metric) if dataclasses.is_dataclass(summary) else None
        say(f"{head}: done, {sweep.metric} {value if value is None else f'{value:.4f}'} ({run_dir})")
    return tally


def _end(store: storelib.Store, sweep: Sweep, job: Job, status: str, error: str) -> None:
    """A job that ended without a summary: its run (if it got as far as one) ends the same way."""
    storelib.end_active(status, error)
    run = store.run_of(sweep.name, job.key)
    store.end_job(sweep.name, job.key, status, run_id=run["id"] if run else None, error=error)


def results(sweep: Sweep) -> dict[str, dict[str, Any]]:
    """job key -> {"status", "run" (its store row, or None), "error"}: the run a job's claim names, else
    the latest run labelled with the job."""
    store = storelib.Store(sweep.runs_root, create=False)
    claims = store.jobs(sweep.name)
    runs = {r["id"]: r for r in store.runs()}
    out = {}
    for job in sweep.jobs:
        claim = claims.get(job.key)
        run = runs.get(claim["run_id"]) if claim and claim["run_id"] else None
        if run is None:
            labelled = [r for r in runs.values() if r["sweep"] == sweep.name and r["job"] == job.key]
            run = labelled[-1] if labelled else None
        status = (claim["status"] if claim else None) or (run["status"] if run else "not run")
        error = (claim or {}).get("error") or (run or {}).get("error")
        out[job.key] = {"status": "done" if run and run["status"] == "done" else status, "run": run, "error": error}
    return out
