"""Run directories (new ones never reuse a path; resume checks come before any write) and
the loss plot's val_bpb series."""

from __future__ import annotations

from underpar import dist
from underpar.runs import plots
from underpar.runs.rundir import RunDir, Summary


def test_new_run_directories_never_reuse_a_path(tmp_path):
    env = dist.setup("cpu")
    first, second = RunDir.start(tmp_path, "x", env), RunDir.start(tmp_path, "x", env)
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()


def test_summary_records_where_it_ran():
    summary = Summary(name="n", run_dir="d")
    assert summary.device and summary.torch and summary.python


def test_final_val_bpb_is_not_joined_to_the_periodic_line(tmp_path):
    rows = [{"step": 1, "elapsed": 1.0, "train_loss": 5.0}, {"step": 2, "elapsed": 2.0, "val_bpb": 3.0},
            {"step": 4, "elapsed": 4.0, "val_bpb": 2.5}, {"step": 4, "elapsed": 4.0, "val_bpb": 2.6, "final": True}]
    assert plots.val_series(rows) == ([(2.0, 3.0), (4.0, 2.5)], [(4.0, 2.6)])
    assert plots.loss_curve(rows, tmp_path / "loss.png").stat().st_size > 0
