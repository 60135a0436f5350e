"""The run store: runs register, beat and finish; a dead process's run reads killed, never
done; two processes write at once without losing a run or claiming a job twice; RunDir
registers itself; `underpar runs list|show|rm` filter and forget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from underpar import dist
from underpar.errors import UnderparError
from underpar.runs import store as storelib
from underpar.runs.rundir import RunDir, Summary
from underpar.runs.store import Store, live_status

from clirun import run_main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env={**os.environ, "PYTHONPATH": SRC},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_registers_finishes_and_keeps_its_numbers(tmp_path):
    store = Store(tmp_path)
    store.register("r1", tmp_path / "r1", track="pretrain", seed=3)
    (row,) = store.runs()
    assert row["status"] == "running" and row["pid"] == os.getpid() and row["seed"] == 3
    store.finish("r1", "done", summary={"val_bpb": 2.5, "artifact_bytes": {"total": 10}, "name": "x", "bad": float("nan")})
    store.finish("r1", "failed", error="late")  # a finished run stays done
    (row,) = store.runs()
    assert row["status"] == "done" and row["error"] is None
    assert row["metrics"] == {"val_bpb": 2.5, "artifact_bytes.total": 10}


def test_the_journal_mode_is_chosen_when_the_store_is_made(tmp_path, monkeypatch):
    with Store(tmp_path / "local").connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.setenv(storelib.JOURNAL_ENV, "delete")  # a store shared across nodes
    with Store(tmp_path / "shared").connect() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with Store(tmp_path / "local").connect() as db:  # an existing store keeps its mode
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    monkeypatch.setenv(storelib.JOURNAL_ENV, "memory")
    with pytest.raises(UnderparError, match="UNDERPAR_STORE_JOURNAL = 'memory' is not valid; choose one of: wal, delete"):
        Store(tmp_path / "other")


def test_a_dead_or_silent_process_reads_killed_never_done(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    row = dict(status="running", host=storelib.HOST, pid=int(dead.stdout), heartbeat=now)
    assert live_status(row) == "killed"  # its pid is gone
    assert live_status({**row, "pid": os.getpid()}) == "running"
    assert live_status({**row, "pid": os.getpid(), "host": "elsewhere", "heartbeat": now - storelib.STALE_SECONDS - 1}) == "killed"
    assert live_status({**row, "host": "elsewhere"}) == "running"  # another host's pid cannot be checked; its beat can
    assert live_status({**row, "status": "done"}) == "done"


def test_a_run_killed_mid_way_is_killed(tmp_path):
    """A real SIGKILL: the process that registered the run never ends it."""
    child = _python("""
        import sys, time
        from underpar.runs.store import Store
        Store(sys.argv[1]).register("victim", sys.argv[1] + "/victim")
        print("registered", flush=True)
        time.sleep(60)
    """, str(tmp_path))
    assert child.stdout.readline().strip() == "registered"
    assert Store(tmp_path).runs()[0]["status"] == "running"
    child.kill()
    child.wait()
    assert Store(tmp_path).runs()[0]["status"] == "killed"


def test_two_processes_write_at_once_and_claim_each_job_once(tmp_path):
    Store(tmp_path)  # created once, as RunDir.start does before any worker races
    code = """
        import sys
        from underpar.runs.store import Store
        root, me = sys.argv[1], sys.argv[2]
        store, mine = Store(root), []
        for i in range(25):
            store.register(f"{me}-{i}", f"{root}/{me}-{i}", seed=i)
            if store.claim("sw", f"job{i}", me) is None:
                mine.append(i)
            store.finish(f"{me}-{i}", "done", summary={"val_bpb": i})
            store.end_job("sw", f"job{i}", "done", run_id=f"{me}-{i}")
        print(" ".join(map(str, mine)))
    """
    workers = [_python(code, str(tmp_path), name) for name in ("a", "b")]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err for _, err in outputs]
    claimed = [int(i) for out, _ in outputs for i in out.split()]
    assert sorted(claimed) == list(range(25)), "every job claimed exactly once"
    rows = Store(tmp_path).runs()
    assert len(rows) == 50 and all(r["status"] == "done" for r in rows)
    assert {k: v["status"] for k, v in Store(tmp_path).jobs("sw").items()} == {f"job{i}": "done" for i in range(25)}


def test_claims_skip_done_and_running_retake_killed_and_failed_on_request(tmp_path):
    store = Store(tmp_path)
    assert store.claim("sw", "j", "0/1") is None
    assert store.claim("sw", "j", "0/1") == "running"  # this (live) process holds it
    store.end_job("sw", "j", "failed", error="boom")
    assert store.claim("sw", "j", "0/1") == "failed"
    assert store.claim("sw", "j", "0/1", rerun_failed=True) is None
    store.end_job("sw", "j", "done")
    assert store.claim("sw", "j", "0/1", rerun_failed=True) == "done"
    with store.connect() as db:  # a holder that died
        db.execute("INSERT INTO jobs (sweep, job, status, host, pid, heartbeat) VALUES ('sw', 'k', 'running', ?, 999999999, ?)",
                   (storelib.HOST, time.time()))
    assert store.claim("sw", "k", "0/1") is None


def test_rundir_registers_its_config_and_summary(tmp_path):
    from underpar import config as cfglib

    env = dist.setup("cpu")
    cfg = cfglib.resolve("pretrain", "tiny-cpu", ["train.seed=7"])
    done, failed = RunDir.start(tmp_path, "tiny-cpu", env), RunDir.start(tmp_path, "x", env)
    for run_dir in (done, failed):
        run_dir.save_config(cfg)
    assert {r["status"] for r in Store(tmp_path).runs()} == {"running"}
    done.save_summary(Summary(name="tiny-cpu", run_dir=str(done.path), device="cpu"))
    failed.fail("loss became nan")
    rows = {r["id"]: r for r in Store(tmp_path).runs()}
    assert rows[done.path.name]["status"] == "done" and rows[failed.path.name]["error"] == "loss became nan"
    row = rows[done.path.name]
    assert (row["track"], row["preset"], row["seed"], row["run_dir"]) == ("pretrain", "tiny-cpu", 7, str(done.path))
    assert cfglib.from_dict(type(cfg), row["config"]["config"]) == cfg


def test_a_store_that_fails_never_stops_a_run(tmp_path, capsys):
    (tmp_path / storelib.DB_NAME).write_text("not a database")
    run_dir = RunDir.start(tmp_path, "x", dist.setup("cpu"))
    run_dir.save_summary({"name": "x"})
    assert (run_dir.path / "summary.json").is_file()
    assert "run store" in capsys.readouterr().out


def _fill(root: Path) -> Store:
    store = Store(root)
    for i, (track, preset, bpb) in enumerate([("pretrain", "tiny-cpu", 2.4), ("pretrain", "golf-baseline", 1.2),
                                               ("pretrain", "tiny-cpu", 2.9), ("finetune", None, None)]):
        store.register(f"2026-run{i}", root / f"2026-run{i}", track=track, preset=preset, seed=i, sweep="sw" if i < 2 else None,
                       job=f"p/v{i}/seed={i}" if i < 2 else None)
        (root / f"2026-run{i}").mkdir()
        if bpb is not None:
            store.finish(f"2026-run{i}", "done", summary={"val_bpb": bpb, "steps": 10 * i})
        else:
            store.finish(f"2026-run{i}", "failed", error="boom")
    return store


def test_runs_list_show_rm(tmp_path, monkeypatch, capsys):
    _fill(tmp_path)
    root = ["--root", str(tmp_path)]

    def listed(*args):
        code, out, err = run_main(monkeypatch, capsys, "runs", "list", *root, *args)
        assert code == 0, err
        return [line.split()[0] for line in out.strip().splitlines()[1:]]

    assert listed() == ["2026-run0", "2026-run1", "2026-run2", "2026-run3"]
    assert listed("--preset", "tiny-cpu", "--where", "val_bpb<2.5") == ["2026-run0"]
    assert listed("--where", "val_bpb>=1.2", "--where", "steps>5") == ["2026-run1", "2026-run2"]
    assert listed("--status", "failed") == listed("--track", "finetune") == ["2026-run3"]
    assert listed("--sweep", "sw") == ["2026-run0", "2026-run1"]
    code, out, _ = run_main(monkeypatch, capsys, "runs", "show", "run2", *root)
    assert code == 0 and json.loads(out)["metrics"] == {"val_bpb": 2.9, "steps": 20}
    code, out, err = run_main(monkeypatch, capsys, "runs", "show", "run", *root)
    assert code == 2 and "matches 4 runs" in err
    code, out, _ = run_main(monkeypatch, capsys, "runs", "rm", "run2", "run3", "--delete-files", *root)
    assert code == 0 and not (tmp_path / "2026-run2").exists() and not (tmp_path / "2026-run3").exists()
    code, out, _ = run_main(monkeypatch, capsys, "runs", "rm", "run1", *root)
    assert code == 0 and (tmp_path / "2026-run1").is_dir() and "stays" in out
    assert listed() == ["2026-run0"]


def test_merge_brings_another_nodes_runs_and_finished_jobs(tmp_path, monkeypatch, capsys):
    here, there = Store(tmp_path / "here"), Store(tmp_path / "there")
    here.register("r-here", tmp_path / "here" / "r-here", sweep="sw", job="a")
    here.finish("r-here", "done", summary={"val_bpb": 1.0})
    here.claim("sw", "a", "0/2")
    here.end_job("sw", "a", "done", run_id="r-here")
    there.register("r-there", "/elsewhere/r-there", sweep="sw", job="b")
    there.finish("r-there", "done", summary={"val_bpb": 2.0})
    there.claim("sw", "b", "1/2")
    there.end_job("sw", "b", "done", run_id="r-there")
    (tmp_path / "here" / "r-there").mkdir()  # its directory was copied over
    code, out, err = run_main(monkeypatch, capsys, "runs", "merge", str(tmp_path / "there"), "--root", str(tmp_path / "here"))
    assert code == 0 and out.startswith("1 run(s) and 1 sweep job(s) merged"), err
    rows = {r["id"]: r for r in here.runs()}
    assert rows["r-there"]["run_dir"] == str((tmp_path / "here" / "r-there").absolute()) and rows["r-there"]["metrics"] == {"val_bpb": 2.0}
    assert {k: v["status"] for k, v in here.jobs("sw").items()} == {"a": "done", "b": "done"}
    assert here.merge(there) == (0, 0)  # merging again adds nothing
