"""Records: the generated single-file train_gpt.py runs where the package cannot be imported
and reproduces the package's losses bit for bit on CPU, counting its own bytes as the code;
`underpar record` writes submission.json, README.md and logs for a group of seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from underpar import config as cfglib
from underpar.data.config import DataConfig
from underpar.data.prepare import prepare
from underpar.errors import UnderparError
from underpar.runs import record, script
from underpar.runs.rundir import RunDir
from underpar.tracks import pretrain

from clirun import run_main
from test_prepare import write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = ["model.num_layers=1", "model.model_dim=32", "model.attention.num_heads=2", "model.attention.num_kv_heads=1",
         "model.vocab_size=400", "data.source=text", "data.vocab_size=400", "data.val_docs=20", "train.seq_len=32",
         "train.tokens_per_step=256", "train.micro_batch_tokens=256", "train.max_steps=3", "train.warmup_steps=0",
         "train.val_every_steps=2", "train.val_max_tokens=512", "train.val_batch_tokens=2048"]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Two finished micro runs of one config, seeds 1 and 2."""
    root = tmp_path_factory.mktemp("record")
    corpus = write_corpus(root / "corpus", documents=60)
    prepare(cfglib.from_dict(DataConfig, dict(source="text", path=str(corpus), vocab_size=400, val_docs=20, out=str(root / "prepared"))))
    sets = MICRO + [f"data.path={corpus}", f"data.out={root / 'prepared'}", f"train.runs_root={root / 'runs'}"]
    return root, [pretrain.run(cfglib.resolve("pretrain", "tiny-cpu", sets + [f"train.seed={seed}"])) for seed in (1, 2)]


def test_the_generated_script_reproduces_the_package_run(two_seeds, tmp_path):
    root, (summary, _) = two_seeds
    config = json.loads((Path(summary.run_dir) / "config.json").read_text())["config"]
    shipped = script.write(tmp_path / "train_gpt.py", config, "tiny-cpu", "abc123")
    assert shipped["bytes"] == (tmp_path / "train_gpt.py").stat().st_size < shipped["source_bytes"]
    site = str(Path(torch.__file__).parents[1])  # torch and friends, but not the editable underpar
    env = {**os.environ, "PYTHONPATH": site, "OMP_NUM_THREADS": "1", "RUNS_ROOT": str(tmp_path / "runs")}
    result = subprocess.run([sys.executable, "-S", "-c", "import runpy; runpy.run_path('train_gpt.py', run_name='__main__')"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-S", "-c", "import underpar"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0, "the script ran without an importable underpar package"
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    losses = [[(r["step"], r.get("train_loss"), r.get("val_bpb")) for r in RunDir(d).metrics()] for d in (run_dir, summary.run_dir)]
    assert losses[0] == losses[1] and len(losses[0]) >= 3  # bit for bit, step by step
    generated = json.loads((run_dir / "summary.json").read_text())
    assert (generated["val_bpb"], generated["val_loss"]) == (summary.val_bpb, summary.val_loss)
    assert generated["artifact_bytes"]["code"] == shipped["bytes"] and generated["artifact_bytes"]["code_files"] == ["train_gpt.py"]
    assert generated["git_commit"] == "abc123"


def test_minify_keeps_behaviour_and_drops_docstrings():
    source = 'def f(x):\n    """Doc."""\n    # why\n    return x + 1  # one\n'
    slim = script.minify(source)
    space: dict = {}
    exec(slim, space)
    assert space["f"](1) == 2 and "Doc" not in slim and "why" not in slim
    names = script.modules()
    assert "underpar.tracks.pretrain" in names and "underpar.model.gpt" in names and "underpar.cli" not in names


def test_record_writes_a_submission_for_a_group_of_seeds(two_seeds, tmp_path, monkeypatch, capsys):
    root, summaries = two_seeds
    dirs = [s.run_dir for s in summaries]
    out = tmp_path / "rec"
    code, stdout, err = run_main(monkeypatch, capsys, "record", *dirs, "--out", str(out), "--author", "Ada L",
                                 "--github-id", "ada-l", "--previous", ",".join(dirs))
    assert code == 0, err
    sub = json.loads((out / "submission.json").read_text())
    code_bytes = (out / "train_gpt.py").stat().st_size
    model = max(s.artifact_bytes["model"] for s in summaries)
    assert sub["bytes_code"] == code_bytes and sub["bytes_total"] == code_bytes + model
    assert sub["seeds"] == [1, 2] and sub["seed_results"]["2"]["val_bpb"] == summaries[1].val_bpb
    assert sub["val_bpb"] == pytest.approx((summaries[0].val_bpb + summaries[1].val_bpb) / 2)
    assert (sub["author"], sub["github_id"], sub["comparison"]["previous"]) == ("Ada L", "ada-l", ",".join(dirs))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "submission.json", "train_gpt.py", "train_seed1.log", "train_seed2.log"]
    assert f"code {code_bytes:,} (train_gpt.py)" in (out / "README.md").read_text()
    other = tmp_path / "other"
    pretrain_cfg = json.loads((Path(dirs[1]) / "config.json").read_text())
    pretrain_cfg["config"]["optim"]["matrix_lr"] = 0.5
    other.mkdir()
    (other / "config.json").write_text(json.dumps(pretrain_cfg))
    (other / "summary.json").write_text((Path(dirs[1]) / "summary.json").read_text())
    with pytest.raises(UnderparError, match=r"differs from .* in more than its seed \(optim.matrix_lr\)"):
        record.write([dirs[0], str(other)], tmp_path / "rec2", "A", "a")
    assert not (tmp_path / "rec2").exists()
