"""Scoring a saved run: its round-trip score reproduced from the artifact, the same model on a
second prepared folder made with the same tokenizer, a tokenizer mismatch refused, and the
`eval bpb --run` command with sliding windows and TTT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from underpar import config as cfglib
from underpar.data import corpora, shards
from underpar.data.config import DataConfig
from underpar.data.corpora import text_documents
from underpar.data.prepare import prepare
from underpar.data.tokenizer import Tokenizer
from underpar.errors import DataError, UnderparError
from underpar.eval.config import EvalConfig, eval_config
from underpar.eval.score import score_run
from underpar.tracks import pretrain as track

from clirun import run_main
from test_prepare import write_corpus
from test_pretrain import MICRO

pytestmark = pytest.mark.usefixtures("one_thread")


def same_tokenizer_folder(prepared, corpus, out):
    """A copy of `prepared` whose validation split is other text, encoded with its tokenizer
    (what `data prepare` would write for that text with this tokenizer)."""
    shutil.copytree(prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.load(out / "tokenizer.model")
    ids = [t for doc in tok.encode_documents(text_documents(corpus)[:15]) for t in [tok.bos_id, *doc]]
    val = [e for e in manifest["shards"] if e["split"] == "val"]
    for entry in val[1:]:
        (out / entry["file"]).unlink()
    shards.write_shard(out / val[0]["file"], np.asarray(ids, dtype=np.uint16))
    val[0]["sha256"] = corpora.sha256_file(out / val[0]["file"])
    manifest["shards"] = [e for e in manifest["shards"] if e["split"] != "val"] + val[:1]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    write_corpus(root / "corpus", documents=120)
    write_corpus(root / "other", documents=40, seed=7)
    sets = MICRO + [f"data.path={root / 'corpus'}", f"data.out={root / 'prepared'}", f"train.runs_root={root / 'runs'}",
                    "train.max_steps=4", "train.val_every_steps=0", "train.checkpoint_every_steps=0"]
    summary = track.run(cfglib.resolve("pretrain", "tiny-cpu", sets))
    second = same_tokenizer_folder(root / "prepared", root / "other", root / "second")
    foreign = prepare(cfglib.from_dict(DataConfig, dict(source="text", path=str(root / "other"), vocab_size=400,
                                                        val_docs=10, out=str(root / "foreign"))))
    return summary, second, foreign["dir"]


def test_the_artifact_scores_what_the_run_reported_and_other_text_too(trained):
    summary, second, _ = trained
    result = score_run(summary.run_dir, None, None, EvalConfig(batch_seqs=16, stride=16), warn=pytest.fail)
    plain, sliding = result["scores"]["plain"], result["scores"]["sliding"]
    assert plain["val_bpb"] == summary.val_bpb and plain["val_loss"] == summary.val_loss  # the same round trip
    assert sliding["tokens"] == plain["tokens"] and sliding["bytes"] == plain["bytes"]
    assert sliding["val_bpb"] != plain["val_bpb"] and sliding["stride"] == 16 and sliding["seconds"] > 0
    other = score_run(summary.run_dir, None, str(second), EvalConfig(), warn=pytest.fail)
    assert other["data"] == str(second) and other["scores"]["plain"]["tokens"] != plain["tokens"]
    assert 1.0 < other["scores"]["plain"]["val_bpb"] < 20


def test_text_is_encoded_with_the_run_tokenizer(trained, tmp_path):
    summary, second, _ = trained
    root = second.parent
    texts = tmp_path / "texts"
    texts.mkdir()
    for doc in sorted((root / "other").iterdir())[:15]:  # what same_tokenizer_folder encoded
        shutil.copy(doc, texts / doc.name)
    from_text = score_run(summary.run_dir, None, str(texts), EvalConfig(), warn=pytest.fail)
    from_folder = score_run(summary.run_dir, None, str(second), EvalConfig(), warn=pytest.fail)
    a, b = from_text["scores"]["plain"], from_folder["scores"]["plain"]
    assert from_text["data"] == str(texts)
    assert (a["val_bpb"], a["val_loss"], a["tokens"], a["bytes"]) == (b["val_bpb"], b["val_loss"], b["tokens"], b["bytes"])


def test_another_tokenizer_is_refused(trained):
    summary, _, foreign = trained
    with pytest.raises(DataError, match="prepared with a different tokenizer"):
        score_run(summary.run_dir, None, foreign, EvalConfig(), warn=pytest.fail)


def test_without_the_run_data_folder_the_vocabulary_is_compared_and_a_warning_given(trained, tmp_path):
    summary, second, foreign = trained
    moved = tmp_path / "run"
    shutil.copytree(summary.run_dir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["config"]["data"]["out"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    (moved / "summary.json").unlink()  # no recorded tokenizer either
    warnings = []
    result = score_run(str(moved), None, str(second), EvalConfig(), warn=warnings.append)
    assert result["scores"]["plain"]["tokens"] > 0 and len(warnings) == 1 and "cannot be compared" in warnings[0]
    config["config"]["data"]["vocab_size"] = 300
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="trained with data.vocab_size = 300"):
        score_run(str(moved), None, str(second), EvalConfig(), warn=warnings.append)


def test_the_run_and_artifact_must_exist(trained, tmp_path):
    summary, _, _ = trained
    with pytest.raises(UnderparError, match="is not a run directory"):
        score_run(str(tmp_path), None, None, EvalConfig())
    with pytest.raises(UnderparError, match="no artifact at"):
        score_run(summary.run_dir, str(tmp_path / "model.ptz"), None, EvalConfig())
    with pytest.raises(UnderparError, match="eval.ttt.lr = -1.0 is out of range"):
        eval_config(["ttt.lr=-1"])


def test_eval_bpb_command_on_a_second_folder_with_ttt(trained, monkeypatch, capsys):
    summary, second, _ = trained
    code, out, err = run_main(monkeypatch, capsys, "eval", "bpb", "--run", summary.run_dir, "--data", str(second),
                              "--stride", "32", "--ttt", "--set", "eval.ttt.chunk_tokens=512", "--set", "eval.ttt.batch_seqs=4")
    assert code == 0, err
    scores = json.loads(out)["scores"]
    assert set(scores) == {"plain", "sliding", "ttt"}
    assert scores["ttt"]["tokens"] == scores["plain"]["tokens"] and scores["ttt"]["updates"] > 0
    assert scores["ttt"]["chunks"] > 1 and scores["ttt"]["val_bpb"] != scores["sliding"]["val_bpb"]
    code, _, err = run_main(monkeypatch, capsys, "eval", "bpb", "--run", summary.run_dir, "--model", "uniform")
    assert code == 2 and "give one of them" in err
