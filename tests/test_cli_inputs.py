"""`data prepare` and `eval bpb` with a bad value for each option: one line on stderr, exit
code 2, no traceback, and nothing left behind. Run in-process (the CLI's own `main`)."""

import json

import pytest

from underpar import cli
from underpar.data.config import DataConfig
from underpar.data.prepare import prepare

from test_prepare import folder_state, write_corpus
from clirun import run_main




@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A corpus, a folder prepared from it, an empty folder and a jsonl without a text field."""
    root = tmp_path_factory.mktemp("inputs")
    write_corpus(root / "corpus", documents=60)
    prepare(DataConfig(source="text", path=str(root / "corpus"), vocab_size=400, out=str(root / "prepared")))
    (root / "empty").mkdir()
    (root / "body.jsonl").write_text('{"body": "no text field here"}\n')
    (root / "a-file").write_text("not a folder")
    return root


def prepare_cases(root):
    corpus, out = str(root / "corpus"), str(root / "new" / "deeper" / "out")
    text = ["--source", "text", "--path", corpus, "--out", out]
    return [
        (["--source", "foo"], "error: source = 'foo' is not valid; choose one of: builtin, text, jsonl, fineweb"),
        (["--vocab", "3"], "error: vocab_size = 3 is out of range; it must lie in [260, 65536]"),
        (["--vocab", "abc"], "error: vocab_size: expected an integer, got 'abc'"),
        (["--source", "text"], "error: data.source = text needs data.path (data prepare: --path), a file or folder"),
        (["--source", "text", "--path", str(root / "missing"), "--out", out], f"error: data path {root / 'missing'} does not exist"),
        (["--source", "text", "--path", str(root / "empty"), "--out", out], f"error: no .txt/.md files under {root / 'empty'} (it is empty)"),
        (["--source", "jsonl", "--path", str(root / "body.jsonl"), "--out", out], "no string field 'text'"),
        ([*text, "--set", "shard_tokens=0"], "error: shard_tokens = 0 is out of range"),
        ([*text, "--set", "val_docs=-1"], "error: val_docs = -1 is out of range"),
        ([*text, "--set", "colour=red"], "error: unknown config key 'colour'"),
        ([*text, "--set", "val_docs=60"], "error: need more than 60 documents to hold out 60 for validation, got 60"),
        ([*text, "--vocab", "60000"], "lower --vocab to at most"),
        (["--source", "text", "--path", corpus, "--out", str(root / "a-file")], "a-file is a file, not a data folder"),
        (["--source", "text", "--path", corpus, "--out", str(root / "corpus")], "corpus is not empty and holds no prepared data"),
        (["--source", "builtin", "--vocab", "400", "--out", str(root / "prepared")], "holds other prepared data (source = 'text' there, 'builtin' asked)"),
        (["--preset", "tiny-cpu"], "error: preset 'tiny-cpu' is for 'pretrain', not for data prepare"),
        (["--preset", "nope"], "error: unknown preset 'nope'; presets: builtin-sp1024"),
    ]


def test_prepare_starts_from_a_data_preset_and_options_override_it():
    assert cli._data_config(None, None, None, None, [], preset="builtin-sp1024") == DataConfig(val_docs=1500)
    cfg = cli._data_config(None, "512", "/tmp/x", None, ["seed=3"], preset="builtin-sp1024")
    assert cfg == DataConfig(val_docs=1500, vocab_size=512, out="/tmp/x", seed=3)


def bpb_cases(root):
    data = ["--data", str(root / "prepared")]
    return [
        (["--model", "gpt5", *data], "error: unknown baseline model 'gpt5'; choose one of: uniform, unigram"),
        (["--seq-len", "0", *data], "error: seq_len must be at least 1, got 0"),
        (["--seq-len", "-5", *data], "error: seq_len must be at least 1, got -5"),
        (["--seq-len", "x", *data], "error: --seq-len: expected an integer, got 'x'"),
        (["--seq-len", "100000", *data], "too few for one window of seq_len=100000"),
        (["--data", str(root / "missing")], f"error: no prepared data at {root / 'missing'} (the folder does not exist); prepare it: underpar data prepare"),
        (["--data", str(root / "empty")], f"error: no prepared data at {root / 'empty'} (the folder has no manifest.json)"),
        (["--source", "zzz"], "error: source = 'zzz' is not valid"),
        (["--vocab", "3"], "error: vocab_size = 3 is out of range"),
    ]


def assert_one_line_error(code, err, expected):
    """Exit code 2 and the error on one line, the last; lines before it are progress lines
    of work done before the problem showed (reading a corpus, training a tokenizer)."""
    assert code == 2, err
    *before, last = err.strip().splitlines()
    assert "Traceback" not in err and not any(line.startswith("error") for line in before), err
    assert last.startswith("error: ") and expected in last, err


def test_prepare_bad_options(inputs, monkeypatch, capsys):
    before = folder_state(inputs)
    for args, expected in prepare_cases(inputs):
        code, _, err = run_main(monkeypatch, capsys, "data", "prepare", *args)
        assert_one_line_error(code, err, expected)
        assert folder_state(inputs) == before, f"{args} left something behind"
        assert sorted(p.name for p in inputs.iterdir()) == ["a-file", "body.jsonl", "corpus", "empty", "prepared"], args


def test_eval_bpb_bad_options(inputs, monkeypatch, capsys):
    for args, expected in bpb_cases(inputs):
        code, _, err = run_main(monkeypatch, capsys, "eval", "bpb", *args)
        assert_one_line_error(code, err, expected)
    code, out, _ = run_main(monkeypatch, capsys, "eval", "bpb", "--data", str(inputs / "prepared"), "--seq-len", "64")
    assert code == 0 and json.loads(out)["val_bpb"] > 0


def test_eval_bpb_names_a_corrupt_shard(tmp_path, monkeypatch, capsys):
    """Issue 10, found 4, as reported: 400 bytes of 0xFF in the middle of a validation shard."""
    write_corpus(tmp_path / "corpus", documents=60)
    prepare(DataConfig(source="text", path=str(tmp_path / "corpus"), vocab_size=400, out=str(tmp_path / "data")))
    shard = tmp_path / "data" / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 400] = b"\xff" * 400
    shard.write_bytes(bytes(data))
    code, _, err = run_main(monkeypatch, capsys, "eval", "bpb", "--model", "unigram", "--data", str(tmp_path / "data"))
    assert_one_line_error(code, err, f"error: {shard} fails its sha256 check against manifest.json")
    assert f"prepare it again: underpar data prepare --source text --vocab 400 --path {tmp_path / 'corpus'} --out {tmp_path / 'data'}" in err


def test_pretrain_refuses_a_folder_of_other_data(inputs, tmp_path, monkeypatch, capsys):
    """Issue 10, found 1, as reported: pretrain pointed at a folder prepared from a text corpus,
    without data.source=text, refuses instead of rebuilding it from the built-in corpus."""
    before = folder_state(inputs / "prepared")
    sets = [f"data.out={inputs / 'prepared'}", "data.vocab_size=400", "model.vocab_size=400", f"train.runs_root={tmp_path}"]
    code, _, err = run_main(monkeypatch, capsys, "pretrain", "--preset", "tiny-cpu", *[a for s in sets for a in ("--set", s)])
    assert_one_line_error(code, err, f"{inputs / 'prepared'} holds other prepared data (source = 'text' there, 'builtin' asked)")
    assert err.strip().endswith(f"--out {inputs / 'prepared'} --force")
    assert folder_state(inputs / "prepared") == before
