"""The `underpar` command line: thin — it parses, builds a config, and calls a track."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import typer

from underpar import config as cfglib
from underpar.errors import UnderparError

app = typer.Typer(
    help="underpar: the most language model out of a fixed budget of time, bytes and compute.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Corpora, tokenizers and token shards.", no_args_is_help=True)
eval_app = typer.Typer(help="Scoring: val_bpb of a trained run or a sanity baseline on prepared data (bpb), accuracy of a Hugging Face model on a task (task).", no_args_is_help=True)
config_app = typer.Typer(help="Presets and resolved configs.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(config_app, name="config")

SetOption = typer.Option(None, "--set", help="Override a config field: section.key=value (repeatable).")


def _data_config(source: Optional[str], vocab: Optional[str], out: Optional[str], path: Optional[str],
                 sets: list[str], scoring: bool = False, preset: Optional[str] = None):
    import dataclasses

    from underpar.data.config import DataConfig

    cfg = DataConfig()
    if preset is not None:
        track, settings = cfglib.load_preset(preset)
        if track != "prepare":
            raise UnderparError(f"preset '{preset}' is for '{track}', not for data prepare")
        cfg = cfglib.from_dict(DataConfig, settings)
    # The options are shorthands for config fields, so they are parsed and checked as --set is.
    given = (("source", source), ("vocab_size", vocab), ("out", out), ("path", path))
    for assignment in [f"{key}={value}" for key, value in given if value is not None] + list(sets or []):
        cfg = cfglib.override(cfg, assignment)
    # Scoring reads a prepared folder, never the corpus: a text source needs no data.path there.
    cfglib.validate(dataclasses.replace(cfg, path=cfg.path or "-") if scoring else cfg)
    return cfg


@data_app.command("prepare")
def data_prepare(
    source: Optional[str] = typer.Option(None, help="builtin (default) | text | jsonl | fineweb"),
    vocab: Optional[str] = typer.Option(None, metavar="INTEGER", help="Tokenizer vocabulary size, 260-65536 (default 1024)."),
    out: Optional[str] = typer.Option(None, help="Output folder (default: $UNDERPAR_CACHE/datasets/<source>_sp<vocab>)."),
    path: Optional[str] = typer.Option(None, help="Input file or folder (text: one .txt/.md file = one document; jsonl; fineweb: a local hub mirror)."),
    force: bool = typer.Option(False, help="Rebuild even if up to date; replace a folder that holds other prepared data (never any other folder)."),
    preset: Optional[str] = typer.Option(None, help="A data preset to start from, e.g. builtin-sp1024 (see `underpar config presets`)."),
    sets: Optional[list[str]] = SetOption,
) -> None:
    """Build a tokenizer and train/val token shards, with a manifest.json."""
    from underpar.data.prepare import prepare

    cfg = _data_config(source, vocab, out, path, sets, preset=preset)
    manifest = prepare(cfg, force=force)
    verb = "up to date" if manifest["reused"] else "prepared"
    typer.echo(f"{verb}: {manifest['dir']}")
    docs = manifest.get("documents", {})
    for split in ("train", "val"):
        line = f"  {split:5s} tokens {manifest['tokens'][split]:>12,}  bytes/token {manifest['bytes_per_token'][split]:.4f}"
        if split in docs:
            line += f"  documents {docs[split]:>7,}  text bytes {manifest['text_bytes'][split]:>12,}"
        typer.echo(line)


@eval_app.command("bpb")
def eval_bpb(
    model: Optional[str] = typer.Option(None, help="uniform | unigram: a sanity baseline fitted on the train shards (default unigram without --run)."),
    source: str = typer.Option("builtin", help="Which prepared data (see `data prepare`)."),
    vocab: str = typer.Option("1024", metavar="INTEGER", help="With --source: which prepared data (ignored with --data)."),
    data: Optional[str] = typer.Option(None, help="A prepared data folder (default: the one for source/vocab; with --run, the run's); with --run also text: .txt/.md/.jsonl files."),
    seq_len: Optional[str] = typer.Option(None, metavar="INTEGER", help="Tokens per scored window (default 1024; with --run, the run's train.seq_len)."),
    run: Optional[str] = typer.Option(None, help="Score this pretrain run's model after its round trip (its model.int8.ptz)."),
    artifact: Optional[str] = typer.Option(None, help="Score this artifact (with --run's config, or the config.json beside it)."),
    stride: Optional[str] = typer.Option(None, metavar="INTEGER", help="With --run: also a sliding-window score, windows advanced by this many tokens (records: 64)."),
    ttt: bool = typer.Option(False, "--ttt", help="With --run: also score-first test-time training (settings: --set eval.ttt.*)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="With --run: eval.*=v for the evaluation, any other path changes the run's config (e.g. model.attention.rope_scaling=ntk)."),
) -> None:
    """Exact val_bpb on prepared validation shards: of a trained run (--run/--artifact; plain,
    sliding-window and score-first TTT) or of a sanity baseline (--model)."""
    if run is None and artifact is None:
        from underpar.eval.baselines import score_baseline

        given = [name for name, value in (("--stride", stride), ("--set", sets)) if value] + (["--ttt"] if ttt else [])
        if given:
            raise UnderparError(f"{', '.join(given)}: only with --run or --artifact (a trained model to score)")
        cfg = _data_config(source, vocab, data, None, [], scoring=True)
        try:
            length = int(seq_len or "1024")
        except ValueError:
            raise UnderparError(f"--seq-len: expected an integer, got {seq_len!r}") from None
        result = score_baseline(cfg, model or "unigram", seq_len=length)
        typer.echo(json.dumps(result, indent=2))
        return
    from underpar.eval.score import score_run_options

    if model is not None:
        raise UnderparError("--model scores a baseline and --run/--artifact a trained model; give one of them")
    result = score_run_options(run, artifact, data, seq_len, stride, ttt, sets or [],
                               warn=lambda m: typer.echo(f"warning: {m}", err=True))
    typer.echo(json.dumps(result, indent=2))


@app.command("pretrain")
def pretrain(
    preset: Optional[str] = typer.Option(
        None, help="A pretrain preset (see `underpar config presets`); default: golf-baseline on a GPU, tiny-cpu without one."),
    sets: Optional[list[str]] = SetOption,
    resume: Optional[str] = typer.Option(None, help="Continue a stopped run from its run directory."),
    seeds: Optional[str] = typer.Option(None, help="Run once per seed (comma-separated, e.g. 1337,42,2024) and write a group summary for `underpar compare`."),
) -> None:
    """Train a GPT under a wallclock cap; score val_bpb after the quantization round trip."""
    from underpar.runs.rundir import resumed_config
    from underpar.tracks import pretrain as track

    from underpar.runs import group

    seed_list = None if seeds is None else group.parse_seeds(seeds, resume)  # before any work
    if resume is not None:
        cfg = resumed_config(resume)
        for assignment in sets or []:
            cfg = cfglib.override(cfg, assignment)
        cfglib.validate(cfg)
    else:
        if preset is None:
            import torch

            preset = "golf-baseline" if torch.cuda.is_available() else "tiny-cpu"
            typer.echo(f"no --preset given: {preset}" + ("" if preset == "golf-baseline" else
                       " (no GPU here; golf-baseline, the 17M-parameter challenge baseline, is a GPU job)"), err=True)
        cfg = cfglib.resolve("pretrain", preset, sets or [])
    if seed_list is not None:
        return typer.echo(group.seeds_command(cfg, seed_list, track.run, say=lambda line: typer.echo(line, err=True)))
    summary = track.run(cfg, resume=resume)
    sizes = summary.artifact_bytes
    if sizes is not None:  # rank 0
        typer.echo(
            f"\nval_bpb {summary.val_bpb:.4f} after the {cfg.quant.scheme}+{cfg.quant.compressor} round trip "
            f"({summary.val_bpb_pre_quant:.4f} before), {summary.steps} steps in {summary.training_seconds:.0f} s\n"
            f"artifact {sizes['total']:,} bytes = code {sizes['code']:,} + model {sizes['model']:,} (limit {sizes['limit']:,})\n"
            f"run directory {summary.run_dir} (summary.json, metrics.jsonl, loss.png)"
        )


@app.command("compare")
def compare(
    baseline: str = typer.Argument(..., help="The baseline group: a group summary (group.json or its folder), run directories or a folder of runs; comma-separated."),
    candidate: str = typer.Argument(..., help="The candidate group, given the same way."),
    score: str = typer.Option("plain", help="plain (the round-trip val_bpb) | sliding | ttt."),
    margin_nats: str = typer.Option("0.005", metavar="FLOAT", help="How much lower the candidate's val_loss must be (nats; the challenge: 0.005)."),
    alpha: str = typer.Option("0.01", metavar="FLOAT", help="Significance level of the one-sided Welch t-test (the challenge: 0.01)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole comparison as JSON."),
) -> None:
    """Does the candidate group of seeds beat the baseline? Means, stds, differences in bpb and
    nats, a one-sided Welch t-test against the margin, and the verdict."""
    from underpar.runs.group import compare_command

    typer.echo(compare_command(baseline, candidate, score, margin_nats, alpha, as_json))


@app.command("finetune")
def finetune(
    method: Optional[str] = typer.Option(None, help="full | lisa | chaos: --set method=NAME (its settings: method.*)."),
    model: Optional[str] = typer.Option(None, help="smollm2-135m, a local folder, or a hub id."),
    task: Optional[str] = typer.Option(None, help="Training task, e.g. gsm_symbolic, gsm8k, s1k."),
    preset: Optional[str] = typer.Option(None, help="A finetune preset (see `underpar config presets`)."),
    sets: Optional[list[str]] = SetOption,
) -> None:
    """Fine-tune a Hugging Face causal LM (full, LISA or the Deep Chaos Scheduler) and evaluate it."""
    from underpar.tracks import finetune as track

    shortcuts = [f"{key}={value}" for key, value in (("method", method), ("model.name", model), ("data.task", task)) if value]
    cfg = cfglib.resolve("finetune", preset, shortcuts + (sets or []))
    summary = track.run(cfg)
    if int(os.environ.get("RANK", 0)):  # under torchrun rank 0 alone reports
        return
    typer.echo(f"\n{summary.method}: {summary.steps} step{'s' * (summary.steps != 1)}, loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}, "
               f"{summary.median_ms_per_step:.0f} ms/step")
    for name, result in summary.eval.items():
        acc = result["accuracy"]
        typer.echo(f"{name}: accuracy {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] (n={result['n']})")
    typer.echo(f"run directory {summary.run_dir}")


@app.command("randopt")
def randopt(
    model: Optional[str] = typer.Option(None, help="smollm2-135m, a local folder, or a hub id."),
    task: Optional[str] = typer.Option(None, help="Train task (its train split), e.g. gsm_symbolic, basic_arithmetic."),
    population: Optional[int] = typer.Option(None, help="Number of seeded perturbations to score."),
    method: Optional[str] = typer.Option(None, help="randopt (score, select the top K, vote) or es (iterative updates)."),
    preset: Optional[str] = typer.Option(None, help="A randopt preset (see `underpar config presets`)."),
    sets: Optional[list[str]] = SetOption,
    resume: Optional[str] = typer.Option(None, help="Continue a stopped search from its run directory."),
) -> None:
    """Gradient-free post-training (RandOpt): score seeded perturbations, majority-vote the top K."""
    from underpar.tracks import randopt as track

    # Shortcuts are config fields: 0 and "" are values to validate like --set's, not absent options.
    shortcuts = [f"{key}={value}" for key, value in (("model", model), ("task", task), ("population", population),
                                                     ("method", method)) if value is not None]
    if resume is not None:
        if preset is not None:
            raise UnderparError("--preset and --resume together: a resumed run keeps its own config (change fields with --set)")
        cfg = track.saved_config(resume)
        for assignment in shortcuts + (sets or []):
            cfg = cfglib.override(cfg, assignment)
        cfglib.validate(cfg)
    else:
        cfg = cfglib.resolve("randopt", preset, shortcuts + (sets or []))
    track.run(cfg, resume=resume)  # rank 0 prints the report (also in the run's train.log)


@eval_app.command("task")
def eval_task(
    model: str = typer.Option("smollm2-135m", help="smollm2-135m, a local folder, or a hub id."),
    task: str = typer.Option("gsm_symbolic", help="gsm_symbolic, asdiv, gsm8k, math500, ... (answer-scored tasks)."),
    split: str = typer.Option("test", help="A split the task has (test, validation, train)."),
    limit: str = typer.Option("200", metavar="INTEGER", help="Number of examples (the first N, >= 1)."),
    path: Optional[str] = typer.Option(None, help="Local file in the task's schema."),
    max_new_tokens: str = typer.Option("256", metavar="INTEGER", help="Tokens generated per answer (>= 1)."),
    batch_size: str = typer.Option("64", metavar="INTEGER", help="Prompts decoded together (>= 1)."),
) -> None:
    """Greedy accuracy of a model on a task, with a 95% confidence interval."""
    from underpar.eval.accuracy import TaskEvalConfig, evaluate_model

    # Each option is a TaskEvalConfig field, parsed and checked as --set is, before the model loads.
    options = dict(model=model, task=task, split=split, limit=limit, path=path or "",
                   max_new_tokens=max_new_tokens, batch_size=batch_size)
    cfg = TaskEvalConfig()
    for key, value in options.items():
        cfg = cfglib.override(cfg, f"{key}={value}")
    typer.echo(json.dumps(evaluate_model(cfg), indent=2))  # validates cfg first


@config_app.command("presets")
def config_presets() -> None:
    """List the shipped presets and their tracks."""
    for name, track in cfglib.list_presets().items():
        typer.echo(f"{name:24s} {track}")


@config_app.command("show")
def config_show(
    preset: Optional[str] = typer.Option(None, help="A preset name (see `underpar config presets`)."),
    track: Optional[str] = typer.Option(None, help=f"Defaults of a track: {', '.join(cfglib.TRACKS)}"),
    sets: Optional[list[str]] = SetOption,
) -> None:
    """Print a resolved config as JSON (a preset's track, or a track's defaults)."""
    if preset is None and track is None:
        raise UnderparError("give --preset NAME or --track NAME")
    track = track or cfglib.load_preset(preset)[0]
    cfg = cfglib.resolve(track, preset, sets or [])
    typer.echo(json.dumps(cfglib.to_dict(cfg), indent=2))


# ---- the run store, sweeps, reports and records (runs/commands.py)

from underpar.runs.commands import register as _register_runs_commands  # noqa: E402

_register_runs_commands(app)


def main() -> None:
    """Every mistake the user can fix ends in one `error: ...` line and exit code 2 (no
    traceback, no usage box); Ctrl-C ends with exit code 130 after the track said what it kept.
    Click's exceptions are told apart by class name: recent typer vendors its own click."""
    try:
        code = app(standalone_mode=False)
    except UnderparError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:
        kinds = {cls.__name__ for cls in type(e).__mro__}
        if "NoArgsIsHelpError" in kinds:  # a group without a command: its help
            e.show()
            sys.exit(0)
        if "UsageError" in kinds:
            where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
            _fail(f"{e.format_message()}{where}", 2)
        if "ClickException" in kinds:
            _fail(e.format_message(), e.exit_code)
        if "Abort" in kinds:
            _interrupted()
        raise
    if code == 130:  # typer turns Ctrl-C into an exit code
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    _end_runs("failed", message)
    typer.secho(f"error: {' '.join(message.split())}", err=True, fg=typer.colors.RED)
    sys.exit(code)


def _end_runs(status: str, reason: str) -> None:
    """Runs this process started and did not finish end in the store as `status`."""
    from underpar.runs.store import end_active

    end_active(status, reason)


def _interrupted() -> None:
    _end_runs("killed", "interrupted")
    typer.secho("interrupted", err=True)
    sys.exit(130)
