"""The `runs`, `sweep`, `report` and `record` commands of the CLI (cli.py adds them to its app):
thin, as the rest of the CLI; the work is in runs/store.py, listing.py, sweep.py, report.py
and record.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from underpar.errors import UnderparError

app = typer.Typer()  # its commands are added to the CLI's own app by `register`

runs_app = typer.Typer(help="The run store: every run of every track under a runs root (runs.db).", no_args_is_help=True)
RootOption = typer.Option("runs", "--root", help="The runs root holding runs.db (a track's runs_root).")


def _store(root: str):
    from underpar.runs.store import Store

    return Store(root, create=False)


@runs_app.command("list")
def runs_list(
    root: str = RootOption,
    track: Optional[str] = typer.Option(None, help="pretrain | finetune | randopt."),
    preset: Optional[str] = typer.Option(None, help="Runs started from this preset."),
    status: Optional[str] = typer.Option(None, help="running | done | failed | killed (a dead running run reads killed)."),
    sweep: Optional[str] = typer.Option(None, help="Runs of this sweep."),
    where: Optional[list[str]] = typer.Option(None, help="A metric range, e.g. 'val_bpb<2.1' or 'steps>=100' (repeatable)."),
) -> None:
    """List runs, oldest first, filtered."""
    from underpar.runs import listing

    listing.check_filters(track, preset, status, sweep, where or [])
    rows = listing.select(_store(root), track, preset, status, sweep, where or [])
    typer.echo(listing.table(rows))


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="A run id (or a unique part of it, or its directory)."), root: str = RootOption) -> None:
    """A run's whole record: config, summary metrics, status, times, commit, device."""
    from underpar.runs import listing

    listing.check_ref(run)
    typer.echo(listing.show(_store(root).get(run)))


@runs_app.command("rm")
def runs_rm(
    runs: list[str] = typer.Argument(..., help="Run ids (or unique parts of them)."),
    root: str = RootOption,
    delete_files: bool = typer.Option(False, "--delete-files", help="Delete the run directories too."),
) -> None:
    """Forget runs in the store (their directories stay unless --delete-files)."""
    from underpar.runs import listing

    for ref in runs:
        listing.check_ref(ref)
    for line in listing.remove(_store(root), runs, delete_files):
        typer.echo(line)


@runs_app.command("merge")
def runs_merge(
    other: str = typer.Argument(..., help="Another runs root (with its runs.db), e.g. one node's."),
    root: str = RootOption,
) -> None:
    """Copy another store's runs and sweep claims into this one (stores of nodes that could not share one)."""
    from underpar.runs.store import Store

    if Path(root).exists() and not Path(root).is_dir():
        raise UnderparError(f"--root {root} is a file, not a runs root folder")
    source = _store(other)
    added, taken = Store(root).merge(source)
    typer.echo(f"{added} run(s) and {taken} sweep job(s) merged from {source.path} into {Path(root) / 'runs.db'}")


@app.command("sweep")
def sweep(
    file: str = typer.Argument(..., help="A sweep file (TOML: preset, phases of variants, seeds; see README)."),
    worker: str = typer.Option("0/1", help="i/n: run jobs i, i+n, ... (one worker per GPU, or $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."),
    rerun_failed: bool = typer.Option(False, "--rerun-failed", help="Run failed jobs again (killed ones always rerun)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file and list the jobs; run nothing."),
) -> None:
    """Run a sweep, resumably: finished jobs are skipped; workers sharing the store never run a job twice."""
    from underpar.runs import sweep as sweeplib

    share = sweeplib.parse_worker(worker)
    plan = sweeplib.load(file)  # every job checked before any runs
    if dry_run:
        for i, job in enumerate(plan.jobs):
            typer.echo(f"{i % share[1]}/{share[1]}  {job.key}  {' '.join(job.sets) or '(the base config)'}")
        return
    tally = sweeplib.run_sweep(plan, share, rerun_failed, say=lambda line: typer.echo(line, err=True))
    typer.echo(", ".join(f"{n} {what}" for what, n in tally.items() if n) or "nothing to do")
    if tally["failed"]:
        sys.exit(1)


@app.command("report")
def report(
    file: str = typer.Argument(..., help="The sweep file (its runs are read from the store under its runs_root)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: <runs_root>/sweeps/<name>/)."),
) -> None:
    """A markdown experiment log of a sweep (a table per phase, best config, progression, p-values) with PNG plots."""
    from underpar.runs import report as reportlib
    from underpar.runs import sweep as sweeplib

    reportlib.check_out(out)
    plan = sweeplib.load(file)
    typer.echo(f"report {reportlib.write(plan, out)}")


@app.command("record")
def record(
    runs: list[str] = typer.Argument(..., help="Finished pretrain run directories, one per seed, of one config."),
    out: str = typer.Option(..., help="The submission folder to write (new or empty)."),
    author: str = typer.Option(..., help="Your name, as submission.json carries it."),
    github_id: str = typer.Option(..., help="Your GitHub user name."),
    name: Optional[str] = typer.Option(None, help="The record's name (default: the runs' config name)."),
    previous: Optional[str] = typer.Option(None, help="The previous record's runs (group.json, run directories or a folder of runs): one-sided Welch test against them."),
    wrapper: str = typer.Option("lzma", help="How train_gpt.py ships: lzma | brotli (compressed self-extracting) | none (plain source)."),
) -> None:
    """A Parameter Golf submission folder: submission.json, README.md, logs and a generated single-file train_gpt.py."""
    from underpar.runs import record as recordlib

    if wrapper not in ("lzma", "brotli", "none"):
        raise UnderparError(f"--wrapper {wrapper!r} is not valid; choose one of: lzma, brotli, none")
    sub = recordlib.write(runs, out, author, github_id, name, previous, None if wrapper == "none" else wrapper)
    if "bundled_from" in sub["code"]:
        typer.echo(f"warning: the runs were made at commit {sub['git_commit']}, but train_gpt.py bundles the package as it "
                   f"is now ({sub['code']['bundled_from']}); check out {sub['git_commit']} and record again to ship what ran", err=True)
    typer.echo(f"{out}: val_bpb {sub['val_bpb']:.5f} over {len(sub['seeds'])} seed(s); bytes_total {sub['bytes_total']:,} "
               f"= code {sub['bytes_code']:,} (train_gpt.py) + model {sub['bytes_model']:,}")


def register(main_app: typer.Typer) -> None:
    """Add these commands to the CLI's app."""
    main_app.add_typer(runs_app, name="runs")
    for command in app.registered_commands:
        main_app.registered_commands.append(command)
