"""Every option of every command, given a bad value: one `error:` line on stderr, exit code 2,
no traceback, and nothing left behind (no run directory, no prepared folder). Run in-process
through the CLI's own `main`. Adding an option without a case here fails the completeness test."""

from __future__ import annotations

import pytest
import typer

from underpar import cli

from clirun import run_main

# (command, option) -> (arguments, a substring of the error line). "{tmp}" is the test's folder.
CASES: dict[tuple[str, str], tuple[list[str], str]] = {
    ("pretrain", "--preset"): (["--preset", "nope"], "unknown preset 'nope'"),
    ("pretrain", "--set"): (["--preset", "tiny-cpu", "--set", "train.max_wallclock_seconds=nan"], "expected a finite number"),
    ("pretrain", "--resume"): (["--resume", "{tmp}/no-such-run"], "cannot resume {tmp}/no-such-run: it is not a run directory"),
    ("pretrain", "--seeds"): (["--preset", "tiny-cpu", "--seeds", "1,x"], "--seeds: expected comma-separated integers"),
    ("compare", "baseline"): (["{tmp}/missing", "{tmp}"], "{tmp}/missing does not exist"),
    ("compare", "candidate"): (["{tmp}/a-file", "{tmp}/a-file"], "{tmp}/a-file cannot be read as JSON"),
    ("compare", "--score"): (["{tmp}", "{tmp}", "--score", "best"], "--score 'best' is not valid; choose one of: plain, sliding, ttt"),
    ("compare", "--margin-nats"): (["{tmp}", "{tmp}", "--margin-nats", "x"], "--margin-nats: expected a number, got 'x'"),
    ("compare", "--alpha"): (["{tmp}", "{tmp}", "--alpha", "2"], "alpha and practice_alpha must lie in (0, 1)"),
    ("finetune", "--method"): (["--method", "nope"], "method = 'nope' is not valid; choose one of: full"),
    ("finetune", "--model"): (["--model", "{tmp}/no-such-model"], "no-such-model"),
    ("finetune", "--task"): (["--task", "nope"], "data.task = 'nope' is not valid"),
    ("finetune", "--preset"): (["--preset", "tiny-cpu"], "preset 'tiny-cpu' is for 'pretrain', not 'finetune'"),
    ("finetune", "--set"): (["--set", "train.steps=-1"], "train.steps = -1 is out of range"),
    ("randopt", "--model"): (["--model", "{tmp}/no-such-model"], "no-such-model"),
    ("randopt", "--task"): (["--task", "nope"], "task = 'nope' is not valid"),
    ("randopt", "--population"): (["--population", "0"], "population = 0 is out of range"),
    ("randopt", "--method"): (["--method", "sgd"], "method = 'sgd' is not valid"),
    ("randopt", "--preset"): (["--preset", "golf-baseline"], "preset 'golf-baseline' is for 'pretrain', not 'randopt'"),
    ("randopt", "--set"): (["--set", "sigmas=[]"], "sigmas = [] must be a non-empty list"),
    ("randopt", "--resume"): (["--resume", "{tmp}/no-such-run"], "cannot resume {tmp}/no-such-run: it is not a run directory"),
    ("data prepare", "--source"): (["--source", "nope"], "source = 'nope' is not valid"),
    ("data prepare", "--vocab"): (["--vocab", "0"], "vocab_size = 0 is out of range"),
    ("data prepare", "--out"): (["--out", "{tmp}/a-file"], "a-file is a file, not a data folder"),
    ("data prepare", "--path"): (["--source", "text", "--path", "{tmp}/missing"], "data path {tmp}/missing does not exist"),
    ("data prepare", "--preset"): (["--preset", "nope"], "unknown preset 'nope'"),
    ("data prepare", "--set"): (["--set", "seed=x"], "seed: expected an integer, got 'x'"),
    ("eval bpb", "--model"): (["--model", "gpt5"], "unknown baseline model 'gpt5'"),
    ("eval bpb", "--source"): (["--source", "nope"], "source = 'nope' is not valid"),
    ("eval bpb", "--vocab"): (["--vocab", "x"], "vocab_size: expected an integer, got 'x'"),
    ("eval bpb", "--data"): (["--data", "{tmp}/missing"], "no prepared data at {tmp}/missing"),
    ("eval bpb", "--seq-len"): (["--seq-len", "0"], "seq_len must be at least 1, got 0"),
    ("eval bpb", "--run"): (["--run", "{tmp}/no-such-run"], "--run: {tmp}/no-such-run is not a run directory"),
    ("eval bpb", "--artifact"): (["--artifact", "{tmp}/a-file"], "the folder of --artifact: {tmp} is not a run directory"),
    ("eval bpb", "--stride"): (["--run", "{tmp}/no-such-run", "--stride", "x"], "eval.stride: expected an integer, got 'x'"),
    ("eval bpb", "--set"): (["--run", "{tmp}/no-such-run", "--set", "eval.ttt.optimizer=lion"], "eval.ttt.optimizer = 'lion' is not valid"),
    ("eval task", "--model"): (["--model", "{tmp}/no-such-model", "--limit", "2"], "no-such-model"),
    ("eval task", "--task"): (["--task", "nope"], "task = 'nope' is not valid"),
    ("eval task", "--split"): (["--task", "asdiv", "--split", "train"], "has no 'train' split"),
    ("eval task", "--limit"): (["--limit", "-1"], "limit"),
    ("eval task", "--path"): (["--task", "gsm8k", "--path", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ("eval task", "--max-new-tokens"): (["--max-new-tokens", "0"], "max_new_tokens"),
    ("eval task", "--batch-size"): (["--batch-size", "0"], "batch_size"),
    ("config show", "--preset"): (["--preset", "nope"], "unknown preset 'nope'"),
    ("config show", "--track"): (["--track", "nope"], "unknown track 'nope'"),
    ("config show", "--set"): (["--track", "pretrain", "--set", "model.colour=red"], "unknown config key 'model.colour'"),
    ("runs list", "--root"): (["--root", "{tmp}/missing"], "no run store at {tmp}/missing/runs.db"),
    ("runs list", "--track"): (["--track", "prepare"], "--track 'prepare' is not valid; choose one of: pretrain"),
    ("runs list", "--preset"): (["--preset", "nope"], "unknown preset 'nope'"),
    ("runs list", "--status"): (["--status", "finished"], "--status 'finished' is not valid; choose one of: running, done"),
    ("runs list", "--sweep"): (["--sweep", "a b"], "--sweep 'a b' is not a sweep name"),
    ("runs list", "--where"): (["--where", "val_bpb<low"], "--where 'val_bpb<low': expected METRIC OP NUMBER"),
    ("runs show", "run"): ([" "], "an empty run id"),
    ("runs show", "--root"): (["x", "--root", "{tmp}/a-file"], "no run store at {tmp}/a-file/runs.db"),
    ("runs rm", "runs"): (["x", ""], "an empty run id"),
    ("runs rm", "--root"): (["x", "--root", "{tmp}"], "no run store at {tmp}/runs.db"),
    ("sweep", "file"): (["{tmp}/missing.toml"], "sweep file {tmp}/missing.toml does not exist"),
    ("report", "file"): (["{tmp}/missing.toml"], "sweep file {tmp}/missing.toml does not exist"),
    ("report", "--out"): (["{tmp}/missing.toml", "--out", "{tmp}/a-file"], "--out {tmp}/a-file is a file, not a folder"),
    ("record", "runs"): (["{tmp}/no-run", "--out", "{tmp}/rec", "--author", "A", "--github-id", "a"], "{tmp}/no-run is not a run directory"),
    ("record", "--out"): (["{tmp}", "--out", "{tmp}/a-file", "--author", "A", "--github-id", "a"], "--out {tmp}/a-file exists and is not an empty folder"),
    ("record", "--author"): (["{tmp}", "--out", "{tmp}/rec", "--author", " ", "--github-id", "a"], "--author is empty"),
    ("record", "--github-id"): (["{tmp}", "--out", "{tmp}/rec", "--author", "A", "--github-id", "a b"], "--github-id 'a b' is not a GitHub user name"),
    ("record", "--name"): (["{tmp}", "--out", "{tmp}/rec", "--author", "A", "--github-id", "a", "--name", "a/b"], "--name 'a/b'"),
    ("record", "--previous"): (["{tmp}/no-run", "--out", "{tmp}/rec", "--author", "A", "--github-id", "a", "--previous", "{tmp}/missing"], "{tmp}/missing does not exist"),
    ("record", "--wrapper"): (["{tmp}", "--out", "{tmp}/rec", "--author", "A", "--github-id", "a", "--wrapper", "zip"], "--wrapper 'zip' is not valid"),
    ("runs merge", "other"): (["{tmp}/missing"], "no run store at {tmp}/missing/runs.db"),
    ("runs merge", "--root"): (["{tmp}/missing", "--root", "{tmp}/a-file"], "--root {tmp}/a-file is a file, not a runs root folder"),
    ("sweep", "--worker"): (["{tmp}/missing.toml", "--worker", "2/2"], "--worker '2/2': expected i/n with 0 <= i < n"),
}


def commands() -> dict[str, list[str]]:
    """Every command of the CLI and its value-taking options (flags and --help need no case)."""
    out: dict[str, list[str]] = {}

    def walk(command, path):
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])
        else:
            out[" ".join(path)] = [p.opts[0] for p in command.params if p.name != "help" and not getattr(p, "is_flag", False)]

    walk(typer.main.get_command(cli.app), [])
    return out


def test_every_option_of_every_command_has_a_bad_value_case():
    options = {(command, option) for command, opts in commands().items() for option in opts}
    assert options == set(CASES), f"no case: {sorted(options - set(CASES))}; stale: {sorted(set(CASES) - options)}"


@pytest.mark.parametrize("command,option", sorted(CASES))
def test_bad_value_is_one_line_exit_2_and_leaves_nothing(command, option, tmp_path, monkeypatch, capsys):
    args, expected = CASES[command, option]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    expected = expected.replace("{tmp}", str(tmp_path))
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)  # run directories would appear here (runs/)
    code, _, err = run_main(monkeypatch, capsys, *command.split(), *args)
    assert code == 2, err
    *progress_lines, last = err.strip().splitlines()
    assert "Traceback" not in err and not any(line.startswith("error") for line in progress_lines), err
    assert last.startswith("error: ") and expected in last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a failed command left files behind"
