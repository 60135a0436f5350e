"""The run store: one SQLite database (WAL mode) per runs root, indexing every run of every
track (status, config, seed, summary metrics, commit, device, times, directory) and the
claims of sweep jobs, so runs can be listed, filtered and compared, and several processes
(one per GPU, or the tasks of a SLURM array) can share one sweep without running a job twice.

Liveness: a process beats (updates `heartbeat`) for every run and job it holds while it lives;
a row still `running` whose process is gone (same host) or whose heartbeat is stale (any host)
reads as `killed`, never as done. Torch-free, so that listing runs stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from underpar.errors import UnderparError

DB_NAME = "runs.db"
# WAL (the default) lets readers and one writer work at once, but only for processes on one
# host; a store shared by several nodes must use the rollback journal ("delete") on a
# filesystem whose POSIX locks work across nodes.
JOURNAL_ENV = "UNDERPAR_STORE_JOURNAL"
STATUSES = ("running", "done", "failed", "killed")
HEARTBEAT_SECONDS = 15.0
STALE_SECONDS = 120.0  # a running row not beaten for this long belongs to a dead process

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,        -- the run directory's name, unique under its root
    run_dir TEXT NOT NULL,
    name TEXT, track TEXT, preset TEXT, seed INTEGER,
    status TEXT NOT NULL,
    config TEXT,                -- the resolved config (JSON), as config.json holds it
    metrics TEXT,               -- the summary's numbers, flattened (JSON: {"val_bpb": ..., ...})
    git_commit TEXT, device TEXT, host TEXT, pid INTEGER,
    started REAL, ended REAL, heartbeat REAL,
    error TEXT,
    sweep TEXT, job TEXT        -- the sweep job this run is, if any
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (sweep, job);
CREATE TABLE IF NOT EXISTS jobs (
    sweep TEXT NOT NULL, job TEXT NOT NULL,
    status TEXT NOT NULL,       -- running (claimed) | done | failed | killed
    run_id TEXT, worker TEXT, host TEXT, pid INTEGER,
    claimed REAL, ended REAL, heartbeat REAL, error TEXT,
    PRIMARY KEY (sweep, job)
);
"""

HOST = socket.gethostname()


def db_path(root: str | Path) -> Path:
    return Path(root) / DB_NAME


_local = threading.local()


def _connection(path: Path, timeout: float) -> sqlite3.Connection:
    """This thread's open connection to `path`: kept open, since closing the last connection
    checkpoints and removes the WAL, which costs more than the writes themselves. WAL with
    synchronous=NORMAL survives a killed process (only a power cut may lose the last commits)."""
    cache = _local.__dict__.setdefault("connections", {})
    key = (str(path.absolute()), os.getpid())
    if key not in cache:
        db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA synchronous=NORMAL")
        cache[key] = db
    return cache[key]


class Store:
    """The runs database under `root`. Each call opens its own short connection, so one Store
    may be used from several threads, and many processes may write at once (SQLite's locks
    serialize them; a writer waits up to `timeout` seconds for another)."""

    def __init__(self, root: str | Path, timeout: float = 60.0, create: bool = True):
        self.root = Path(root)
        self.path = db_path(root)
        self.timeout = timeout
        if not create and not self.path.is_file():
            raise UnderparError(f"no run store at {self.path}: no run has been started with runs_root = {str(root)!r}")
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
            journal = os.environ.get(JOURNAL_ENV, "wal").lower()
            if journal not in ("wal", "delete"):
                raise UnderparError(f"{JOURNAL_ENV} = {journal!r} is not valid; choose one of: wal, delete")
            new = not self.path.is_file()
            db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            try:  # the journal mode is chosen when the file is made and stays with it
                if new:
                    db.execute(f"PRAGMA journal_mode={journal}")
                db.executescript(_SCHEMA)
            finally:
                db.close()

    @contextlib.contextmanager
    def connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in one transaction (committed on success, rolled back on an error);
        `immediate` takes the write lock at once, for read-then-write decisions (claims)."""
        db = _connection(self.path, self.timeout)
        db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    # ---- runs

    def register(self, run_id: str, run_dir: str | Path, **fields: Any) -> None:
        """A run starts (or a stopped one resumes): status running, beaten by this process."""
        now = time.time()
        row = dict(id=run_id, run_dir=str(Path(run_dir).absolute()), status="running", host=HOST, pid=os.getpid(),
                   started=now, heartbeat=now, ended=None, error=None, **fields)
        keys = ", ".join(row)
        # A resumed run keeps what it was labelled with when a field is not given again.
        updates = ", ".join(f"{k} = excluded.{k}" if k in ("ended", "error") else f"{k} = COALESCE(excluded.{k}, runs.{k})"
                            for k in row if k not in ("id", "started"))
        with self.connect() as db:
            db.execute(f"INSERT INTO runs ({keys}) VALUES ({', '.join('?' * len(row))}) "
                       f"ON CONFLICT(id) DO UPDATE SET {updates}", list(row.values()))

    def update(self, run_id: str, **fields: Any) -> None:
        fields = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
        with self.connect() as db:
            db.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", [*fields.values(), run_id])

    def finish(self, run_id: str, status: str, summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        """A run ends: done (with its summary's numbers), failed or killed. A run that is done
        already stays done (a late failure elsewhere in the process does not undo it)."""
        fields: dict[str, Any] = dict(status=status, ended=time.time(), error=error)
        if summary is not None:
            fields["metrics"] = json.dumps(flatten(summary))
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.connect() as db:
            db.execute(f"UPDATE runs SET {sets} WHERE id = ? AND status != 'done'", [*fields.values(), run_id])

    def beat(self, pid: int | None = None) -> None:
        """This process is alive: refresh every running run and claimed job it holds."""
        args = (time.time(), HOST, pid or os.getpid())
        with self.connect() as db:
            db.execute("UPDATE runs SET heartbeat = ? WHERE host = ? AND pid = ? AND status = 'running'", args)
            db.execute("UPDATE jobs SET heartbeat = ? WHERE host = ? AND pid = ? AND status = 'running'", args)

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first, with `status` as it is now (a dead `running` one is `killed`)."""
        with self.connect() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM runs ORDER BY started, id")]
        for row in rows:
            row["status"] = live_status(row)
            row["config"] = json.loads(row["config"]) if row["config"] else None
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else {}
        return rows

    def get(self, ref: str) -> dict[str, Any]:
        """One run by its id, a unique part of it, or its directory."""
        rows = self.runs()
        name = Path(ref).name if os.sep in ref else ref
        exact = [r for r in rows if r["id"] == name]
        found = exact or [r for r in rows if name in r["id"]]
        if len(found) == 1:
            return found[0]
        if not found:
            raise UnderparError(f"no run {ref!r} in {self.path} (see `underpar runs list`)")
        raise UnderparError(f"{ref!r} matches {len(found)} runs ({', '.join(r['id'] for r in found[:5])}, ...); give more of the id")

    def remove(self, run_id: str) -> None:
        with self.connect() as db:
            db.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            db.execute("UPDATE jobs SET run_id = NULL WHERE run_id = ?", (run_id,))

    def merge(self, other: Store) -> tuple[int, int]:
        """Copy another store's runs and sweep claims into this one (the stores of several nodes
        that could not share one): runs it lacks are added, with their directory re-pointed here
        when a folder of that id sits under this root; a job takes the other store's claim
        when that one is done and this one is not. Returns (runs added, jobs taken)."""
        if other.path.resolve() == self.path.resolve():
            raise UnderparError(f"{other.path} is this store; merge another runs root into it")
        with other.connect() as db:
            runs = [dict(r) for r in db.execute("SELECT * FROM runs")]
            jobs = [dict(r) for r in db.execute("SELECT * FROM jobs")]
        added = taken = 0
        with self.connect(immediate=True) as db:
            for row in runs:
                if (self.root / row["id"]).is_dir():
                    row["run_dir"] = str((self.root / row["id"]).absolute())
                keys = ", ".join(row)
                added += db.execute(f"INSERT OR IGNORE INTO runs ({keys}) VALUES ({', '.join('?' * len(row))})",
                                    list(row.values())).rowcount
            for row in jobs:
                mine = db.execute("SELECT status FROM jobs WHERE sweep = ? AND job = ?", (row["sweep"], row["job"])).fetchone()
                if row["status"] == "done" and (mine is None or mine["status"] != "done") or mine is None:
                    keys = ", ".join(row)
                    db.execute(f"INSERT OR REPLACE INTO jobs ({keys}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
                    taken += 1
        return added, taken

    # ---- sweep jobs

    def claim(self, sweep: str, job: str, worker: str, rerun_failed: bool = False) -> str | None:
        """Take `job` for this process, atomically. Returns None when taken, else why it is not:
        done, running (another live process holds it), or failed (unless `rerun_failed`). A job
        whose holder died (killed) is taken again."""
        now = time.time()
        with self.connect(immediate=True) as db:
            row = db.execute("SELECT * FROM jobs WHERE sweep = ? AND job = ?", (sweep, job)).fetchone()
            status = live_status(dict(row)) if row else None
            if status == "done" or status == "running" or (status == "failed" and not rerun_failed):
                return status
            db.execute("INSERT OR REPLACE INTO jobs (sweep, job, status, run_id, worker, host, pid, claimed, ended, heartbeat, error) "
                       "VALUES (?, ?, 'running', NULL, ?, ?, ?, ?, NULL, ?, NULL)", (sweep, job, worker, HOST, os.getpid(), now, now))
        return None

    def end_job(self, sweep: str, job: str, status: str, run_id: str | None = None, error: str | None = None) -> None:
        with self.connect() as db:
            db.execute("UPDATE jobs SET status = ?, ended = ?, error = ?, run_id = COALESCE(?, run_id) "
                       "WHERE sweep = ? AND job = ? AND pid = ? AND host = ?",
                       (status, time.time(), error, run_id, sweep, job, os.getpid(), HOST))

    def run_of(self, sweep: str, job: str) -> dict[str, Any] | None:
        """The latest run started for a sweep job, if any."""
        with self.connect() as db:
            row = db.execute("SELECT id, status FROM runs WHERE sweep = ? AND job = ? ORDER BY started DESC LIMIT 1",
                             (sweep, job)).fetchone()
        return dict(row) if row else None

    def jobs(self, sweep: str) -> dict[str, dict[str, Any]]:
        """job key -> its claim row (status as it is now)."""
        with self.connect() as db:
            rows = [dict(r) for r in db.execute("SELECT * FROM jobs WHERE sweep = ?", (sweep,))]
        for row in rows:
            row["status"] = live_status(row)
        return {row["job"]: row for row in rows}


def live_status(row: dict[str, Any], now: float | None = None) -> str:
    """A stored status, except that `running` held by a dead process reads `killed`: the pid is
    gone (same host), or the heartbeat is older than STALE_SECONDS (any host)."""
    if row["status"] != "running":
        return row["status"]
    now = time.time() if now is None else now
    if row.get("heartbeat") is None or now - row["heartbeat"] > STALE_SECONDS:
        return "killed"
    if row.get("host") == HOST and row.get("pid") and not pid_alive(row["pid"]):
        return "killed"
    return "running"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def flatten(data: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a summary, nested keys joined by '.' (lists by index):
    {"val_bpb": 2.1, "artifact_bytes.total": 1.2e7, "eval.gsm8k.accuracy.mean": 0.4, ...}."""
    out: dict[str, float] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (dict, list)):
            out.update(flatten(value, path))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[path] = value
    return out


# ---------------------------------------------------------------------------------------
# this process's runs and jobs: labels, heartbeats, and how they end

LABELS_ENV = "UNDERPAR_RUN_LABELS"  # JSON labels a launcher hands to a run in a child process
_labels: dict[str, Any] = {}


@contextlib.contextmanager
def labelled(**labels: Any) -> Iterator[None]:
    """Runs started inside this block carry `labels` (preset, sweep, job) in the store."""
    saved = dict(_labels)
    _labels.update(labels)
    try:
        yield
    finally:
        _labels.clear()
        _labels.update(saved)


def labels() -> dict[str, Any]:
    inherited = json.loads(os.environ.get(LABELS_ENV) or "{}")
    return {**inherited, **_labels}


class Tracker:
    """What this process holds in which stores: its running runs (ended on finish, on an error
    the CLI reports, or at exit) and a daemon thread that beats for them every
    HEARTBEAT_SECONDS. A store that fails (e.g. SQLite locking on a network filesystem) is
    reported once and then left alone: the run goes on, its directory is the record."""

    def __init__(self) -> None:
        self.runs: dict[str, tuple[Store, str]] = {}  # run directory -> (store, run id)
        self.holds: dict[Path, list] = {}  # store path -> [store, count]
        self.broken: set[Path] = set()
        self.thread = None

    def safely(self, store_or_root: Store | str | Path, fn_name: str, *args: Any, **kwargs: Any) -> Any:
        path = store_or_root.path if isinstance(store_or_root, Store) else db_path(store_or_root)
        if path in self.broken:
            return None
        try:
            store = store_or_root if isinstance(store_or_root, Store) else Store(store_or_root)
            return getattr(store, fn_name)(*args, **kwargs) if fn_name else store
        except (sqlite3.Error, OSError) as e:
            self.broken.add(path)
            print(f"warning: the run store {path} is unusable ({e}); runs go on without it "
                  "(their directories keep everything)", flush=True)
            return None

    def hold(self, store: Store) -> None:
        entry = self.holds.setdefault(store.path, [store, 0])
        entry[1] += 1
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._beat, name="underpar-heartbeat", daemon=True)
            self.thread.start()

    def release(self, store: Store) -> None:
        entry = self.holds.get(store.path)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.holds[store.path]

    def _beat(self) -> None:
        while self.holds:
            time.sleep(HEARTBEAT_SECONDS)
            for store, _ in list(self.holds.values()):
                self.safely(store, "beat")

    def start(self, root: str | Path, run_dir: Path, **fields: Any) -> None:
        store = self.safely(root, "")
        if store is None:
            return
        self.safely(store, "register", run_dir.name, run_dir, **fields)
        if store.path not in self.broken:
            self.runs[str(run_dir)] = (store, run_dir.name)
            self.hold(store)

    def update(self, run_dir: Path, **fields: Any) -> None:
        if str(run_dir) in self.runs:
            store, run_id = self.runs[str(run_dir)]
            self.safely(store, "update", run_id, **fields)

    def end(self, run_dir: Path, status: str, summary: dict | None = None, error: str | None = None) -> None:
        entry = self.runs.pop(str(run_dir), None)
        if entry is not None:
            store, run_id = entry
            self.safely(store, "finish", run_id, status, summary=summary, error=error)
            self.release(store)

    def end_all(self, status: str, error: str) -> None:
        for run_dir in list(self.runs):
            self.end(Path(run_dir), status, error=error)


TRACKER = Tracker()
atexit.register(lambda: TRACKER.end_all("failed", "the process ended before the run finished"))


def end_active(status: str, error: str) -> None:
    """Every run this process started and has not finished ends as `status` (failed, killed):
    the CLI calls it with the error it prints; at exit, whatever is left is failed."""
    TRACKER.end_all(status, " ".join(error.split()))
