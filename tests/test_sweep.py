"""Sweeps: a TOML file -> checked jobs (grids, seeds, ${VAR}s; every mistake found before any
run); running them through the store: finished jobs skipped, failed ones rerun on request,
a SIGKILLed sweep resumed with no run lost or repeated, two workers sharing one sweep. The
track is a stand-in that writes a real run directory (test_report runs real tiny-cpu jobs)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from underpar import dist
from underpar.errors import ConfigError
from underpar.runs import sweep as sweeplib
from underpar.runs.rundir import RunDir, Summary
from underpar.runs.store import Store

SRC = str(Path(__file__).resolve().parents[1] / "src")

SWEEP = """
name = "toy"
preset = "tiny-cpu"
set = ["train.runs_root={root}", "train.max_steps=${{TOY_STEPS}}", "train.val_every_steps=${{TOY_UNSET:-7}}"]
seeds = [1, 2]

[[phase]]
name = "act"
description = "MLP activation"
[[phase.variant]]
name = "base"
description = "relu2"
[[phase.variant]]
name = "leaky"
set = ["model.mlp.activation=leaky_relu2"]

[[phase]]
name = "lr"
set = ["model.mlp.activation=leaky_relu2"]
[[phase.grid]]
name = "lr"
description = "matrix LR"
axes = {{ "optim.matrix_lr" = [0.02, 0.06] }}
"""


@dataclasses.dataclass(kw_only=True)
class ToySummary(Summary):
    val_bpb: float
    steps: int


def toy_track(track: str, cfg) -> ToySummary:
    """A stand-in track: a real run directory whose val_bpb depends on the config."""
    run_dir = RunDir.start(cfg.train.runs_root, cfg.name, dist.setup("cpu"))
    run_dir.save_config(cfg)
    bpb = 2.0 - 0.1 * (cfg.model.mlp.activation == "leaky_relu2") + cfg.optim.matrix_lr + 0.001 * cfg.train.seed
    for step in range(1, cfg.train.max_steps + 1):
        run_dir.metric(step=step, elapsed=float(step), train_loss=5.0 / step)
    run_dir.metric(step=cfg.train.max_steps, elapsed=float(cfg.train.max_steps), val_bpb=bpb, final=True)
    summary = ToySummary(name=cfg.name, run_dir=str(run_dir.path), device="cpu", val_bpb=bpb, steps=cfg.train.max_steps)
    run_dir.save_summary(summary)
    return summary


def write(tmp_path: Path, text: str = SWEEP, name: str = "toy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(root=tmp_path / "runs"))
    return path


@pytest.fixture(autouse=True)
def steps(monkeypatch):
    monkeypatch.setenv("TOY_STEPS", "3")


def test_a_sweep_file_becomes_checked_jobs(tmp_path):
    plan = sweeplib.load(write(tmp_path))
    assert [j.key for j in plan.jobs] == [
        "act/base/seed=1", "act/base/seed=2", "act/leaky/seed=1", "act/leaky/seed=2",
        "lr/lr-optim.matrix_lr=0.02/seed=1", "lr/lr-optim.matrix_lr=0.02/seed=2",
        "lr/lr-optim.matrix_lr=0.06/seed=1", "lr/lr-optim.matrix_lr=0.06/seed=2"]
    job = plan.jobs[-1]
    assert job.config.optim.matrix_lr == 0.06 and job.config.model.mlp.activation == "leaky_relu2"
    assert job.config.train.val_every_steps == 7  # ${TOY_UNSET:-7}: the default
    assert job.config.train.seed == 2 and job.config.train.max_steps == 3 and job.config.name == "toy.lr.lr-optim.matrix_lr-0.06.s2"
    assert plan.phases[1].baseline == "lr-optim.matrix_lr=0.02" and plan.metric == "val_bpb" and plan.runs_root == str(tmp_path / "runs")


@pytest.mark.parametrize("edit,message", [
    (lambda t: t + "\n[[phase", "is not valid TOML"),
    (lambda t: t.replace('name = "toy"', 'nmae = "toy"'), "unknown key 'nmae'; valid keys here: name"),
    (lambda t: t.replace('preset = "tiny-cpu"', 'preset = "tiny"'), "unknown preset 'tiny'"),
    (lambda t: t.replace("model.mlp.activation=leaky_relu2\"]\n\n[[phase]]", "model.mlp.activaton=x\"]\n\n[[phase]]"),
     "phase 'act', variant 'leaky': unknown config key 'model.mlp.activaton'"),
    (lambda t: t.replace("${{TOY_STEPS}}", "${{TOY_UNSET}}"), "uses $TOY_UNSET, which is not set"),
    (lambda t: t.replace('name = "leaky"', 'name = "base"'), "variant names repeat (base)"),
    (lambda t: t.replace("seeds = [1, 2]", "seeds = [1, 1]"), "expected a non-empty list of distinct integers"),
    (lambda t: t.replace("[0.02, 0.06]", "0.02"), "axes = {'optim.matrix_lr': 0.02}"),
    (lambda t: t.replace('name = "act"', 'name = "act"\nbaseline = "nope"'), "baseline = 'nope' is not one of its variants"),
    (lambda t: t.replace('set = ["model.mlp.activation=leaky_relu2"]\n[[phase.grid]]', 'set = ["train.runs_root=elsewhere"]\n[[phase.grid]]'),
     "the runs go to different runs_root folders"),
])
def test_mistakes_are_found_before_any_run(tmp_path, edit, message):
    with pytest.raises(ConfigError) as error:
        sweeplib.load(write(tmp_path, edit(SWEEP)))
    assert message in str(error.value)
    assert not (tmp_path / "runs").exists()


def test_resume_skips_finished_jobs_and_reruns_failed_on_request(tmp_path):
    plan = sweeplib.load(write(tmp_path))
    calls = []

    def flaky(track, cfg):
        calls.append(cfg.name)
        if cfg.model.mlp.activation == "leaky_relu2" and cfg.train.seed == 2 and len(calls) < 9:
            RunDir.start(cfg.train.runs_root, cfg.name, dist.setup("cpu"))  # the run had started
            raise RuntimeError("out of memory")
        return toy_track(track, cfg)

    quiet = dict(execute=flaky, say=lambda line: None)
    first = sweeplib.run_sweep(plan, **quiet)
    assert first["ran"] == 5 and first["failed"] == 3
    again = sweeplib.run_sweep(plan, **quiet)
    assert again["done before"] == 5 and again["failed before"] == 3 and len(calls) == 8
    final = sweeplib.run_sweep(plan, rerun_failed=True, **quiet)
    assert final["ran"] == 3 and final["done before"] == 5
    results = sweeplib.results(plan)
    assert all(r["status"] == "done" for r in results.values())
    statuses = sorted(r["status"] for r in Store(plan.runs_root).runs())
    assert statuses == ["done"] * 8 + ["failed"] * 3  # the failed attempts stay on record
    assert {r["error"] for r in Store(plan.runs_root).runs() if r["status"] == "failed"} == {"RuntimeError: out of memory"}


def test_two_workers_share_a_sweep_without_running_a_job_twice(tmp_path):
    plan = sweeplib.load(write(tmp_path))
    ran = {0: [], 1: []}
    for i in (0, 1):
        sweeplib.run_sweep(plan, worker=(i, 2), execute=lambda t, c, i=i: ran[i].append(c.name) or toy_track(t, c), say=lambda _: None)
    assert len(ran[0]) == len(ran[1]) == 4 and not set(ran[0]) & set(ran[1])
    again = sweeplib.run_sweep(plan, worker=(0, 1), execute=toy_track, say=lambda _: None)
    assert again["done before"] == 8 and again["ran"] == 0
    with pytest.raises(ConfigError, match="expected i/n"):
        sweeplib.parse_worker("1/1")


def test_a_killed_sweep_resumes_with_no_run_lost_or_repeated(tmp_path):
    """SIGKILL in the middle of the third job: two finished jobs stay done, the third's run
    reads killed, and the resumed sweep runs the third and the rest once each."""
    path = write(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sweep import toy_track
        from underpar.runs import sweep
        from underpar.runs.rundir import RunDir

        def slow(track, cfg):
            if cfg.train.seed == 1 and cfg.model.mlp.activation == "leaky_relu2":
                RunDir.start(cfg.train.runs_root, cfg.name, __import__("underpar.dist").dist.setup("cpu"))
                print("third", flush=True)
                time.sleep(120)
            return toy_track(track, cfg)

        sweep.run_sweep(sweep.load({str(path)!r}), execute=slow, say=lambda line: None)
    """)], env={**os.environ, "PYTHONPATH": SRC, "TOY_STEPS": "3"}, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "third"
    child.kill()
    child.wait()
    plan = sweeplib.load(path)
    rows = Store(plan.runs_root).runs()
    assert sorted(r["status"] for r in rows) == ["done", "done", "killed"]
    tally = sweeplib.run_sweep(plan, execute=toy_track, say=lambda _: None)
    assert tally["done before"] == 2 and tally["ran"] == 6
    rows = Store(plan.runs_root).runs()
    done = [r["job"] for r in rows if r["status"] == "done"]
    assert sorted(done) == sorted(j.key for j in plan.jobs), "each job done exactly once"
    assert [r["job"] for r in rows if r["status"] == "killed"] == ["act/leaky/seed=1"]


def test_each_in_process_job_starts_with_empty_dynamo_caches(monkeypatch):
    """Jobs of one sweep share a process: a fullgraph function compiled for other shapes by
    earlier jobs must not hit dynamo's recompile limit in a later one (as the 131-run log's
    entries did on an H200: new widths and head counts recompile Muon's iteration)."""
    import types

    import torch

    step = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False, fullgraph=True)
    probe = types.ModuleType("underpar.tracks._probe")
    probe.run = lambda n: step(torch.ones(n)).sum().item()
    monkeypatch.setitem(sys.modules, "underpar.tracks._probe", probe)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert [sweeplib.run_track("_probe", n) for n in (2, 3, 4)] == [6.0, 9.0, 12.0]
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):  # the same outside run_track: past the limit
            step(torch.ones(5))
