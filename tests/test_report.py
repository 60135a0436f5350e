"""Sweep reports: the tables, deltas, p-values, best config, progression and failures of a
store filled by the stand-in track (test_sweep), their plots, and one real tiny-cpu sweep
run and reported through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from underpar import config as cfglib
from underpar.data.config import DataConfig
from underpar.data.prepare import prepare
from underpar.errors import UnderparError
from underpar.eval.stats import welch_test
from underpar.runs import report as reportlib
from underpar.runs import sweep as sweeplib

from clirun import run_main
from test_prepare import write_corpus
from test_sweep import toy_track, write

pytestmark = pytest.mark.usefixtures("one_thread")


def flaky(track, cfg):
    if cfg.optim.matrix_lr == 0.06 and cfg.train.seed == 2:
        raise RuntimeError("boom")
    return toy_track(track, cfg)


def test_report_tables_from_a_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOY_STEPS", "3")
    path = write(tmp_path)
    plan = sweeplib.load(path)
    sweeplib.run_sweep(plan, execute=flaky, say=lambda _: None)
    code, out, err = run_main(monkeypatch, capsys, "report", str(path), "--out", str(tmp_path / "log"))
    assert code == 0, err
    text = (tmp_path / "log" / "report.md").read_text()
    # toy_track: val_bpb = 2 - 0.1 (leaky) + matrix_lr (default 0.04) + 0.001 seed
    base, leaky = [2.04 + 0.001 * s for s in (1, 2)], [1.94 + 0.001 * s for s in (1, 2)]
    p = welch_test(leaky, base)["p"]
    assert "| 1 | base | relu2 | 2.0415 ± 0.0007 (n=2) | 3 | +0.0000 | - | baseline |" in text
    assert f"| 2 | leaky | model.mlp.activation=leaky_relu2 | 1.9415 ± 0.0007 (n=2) | 3 | -0.1000 | {p:.3g} | better (best) |" in text
    assert "| 2 | lr-optim.matrix_lr=0.06 | matrix LR | 1.9610 | 3 | -0.0805 | - | 1 done, 1 failed |" in text
    assert "- Best result: lr/lr-optim.matrix_lr=0.02 = 1.9215 ± 0.0007 (n=2) (-0.1200 vs baseline)" in text
    assert ("underpar pretrain --preset tiny-cpu --set train.runs_root=" + str(tmp_path / "runs") +
            " --set train.max_steps=3 --set train.val_every_steps=7 --set model.mlp.activation=leaky_relu2"
            " --set optim.matrix_lr=0.02\n") in text
    assert re.search(r"\n\+ act/leaky: +1.9415  \(-0.1000\)\n\+ lr/lr-optim.matrix_lr=0.02: +1.9215  \(-0.1200\)\n", text)
    assert "| lr/lr-optim.matrix_lr=0.06/seed=2 | failed | - | RuntimeError: boom |" in text
    assert text.rstrip().endswith("_Yours to write: what worked, what did not, what to try next._")
    for name in ("val_vs_time.png", "loss_curves.png", "deltas.png"):
        assert (tmp_path / "log" / name).stat().st_size > 5000 and f"]({name})" in text


def test_a_status_is_a_verdict_only_when_every_seed_is_done(tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_STEPS", "3")
    plan = sweeplib.load(write(tmp_path, name="v.toml"))
    row = reportlib.Row("p", "v", "", [], [{"status": "done"}] * 2, [1.0, 1.02], [3, 3])
    base = reportlib.Row("p", "b", "", [], [{"status": "done"}] * 2, [1.1, 1.13], [3, 3])
    assert reportlib.status(plan, row, base, reportlib.pvalue(row, base)) == "better"
    assert reportlib.status(plan, row, base, 0.2) == "within noise"
    one = reportlib.Row("p", "v", "", [], [{"status": "done"}], [1.2], [3])
    assert reportlib.pvalue(one, base) is None and reportlib.status(plan, one, base, None) == "worse"
    sweeplib.run_sweep(plan, execute=lambda track, cfg: 1 / 0, say=lambda _: None)
    with pytest.raises(UnderparError, match="has no finished run with 'val_bpb' yet"):
        reportlib.write(plan)


TINY = """
name = "tiny"
preset = "tiny-cpu"
set = ["train.runs_root={root}", "data.source=text", "data.vocab_size=400", "model.vocab_size=400", "data.val_docs=20",
       "data.path={corpus}", "data.out={prepared}", "model.num_layers=1", "model.model_dim=32",
       "model.attention.num_heads=2", "model.attention.num_kv_heads=1", "train.seq_len=32", "train.tokens_per_step=256",
       "train.micro_batch_tokens=256", "train.max_steps=2", "train.warmup_steps=0", "train.val_every_steps=1",
       "train.val_max_tokens=256", "train.val_batch_tokens=2048"]

[[phase]]
name = "act"
[[phase.variant]]
name = "relu2"
[[phase.variant]]
name = "leaky"
set = ["model.mlp.activation=leaky_relu2"]
"""


def test_a_real_tiny_sweep_and_its_report(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "corpus", documents=60)
    prepare(cfglib.from_dict(DataConfig, dict(source="text", path=str(corpus), vocab_size=400, val_docs=20,
                                              out=str(tmp_path / "prepared"))))
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(root=tmp_path / "runs", corpus=corpus, prepared=tmp_path / "prepared"))
    code, out, err = run_main(monkeypatch, capsys, "sweep", str(path))
    assert code == 0 and out.strip().splitlines()[-1] == "2 ran", err
    code, out, err = run_main(monkeypatch, capsys, "sweep", str(path))
    assert code == 0 and out.strip().splitlines()[-1] == "2 done before", err
    code, out, err = run_main(monkeypatch, capsys, "report", str(path))
    assert code == 0, err
    report = Path(out.split()[-1])
    assert report == tmp_path / "runs" / "sweeps" / "tiny" / "report.md"
    text = report.read_text()
    for row in sweeplib.results(sweeplib.load(path)).values():
        summary = json.loads((Path(row["run"]["run_dir"]) / "summary.json").read_text())
        assert f"| {summary['val_bpb']:.4f} | 2 |" in text
    assert (report.parent / "val_vs_time.png").is_file()
