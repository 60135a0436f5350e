"""Run directories (new ones never reuse a path; resume checks come before any write) and
the loss plot's val_bpb series."""

from __future__ import annotations

from underpar import dist
from underpar.runs import plots
from underpar.runs.clock import Clock
from underpar.runs.rundir import RunDir, Summary, device_tag


def test_new_run_directories_never_reuse_a_path(tmp_path):
    env = dist.setup("cpu")
    first, second = RunDir.start(tmp_path, "x", env), RunDir.start(tmp_path, "x", env)
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()


def test_summary_records_where_it_ran():
    summary = Summary(name="n", run_dir="d")
    assert summary.device and summary.torch and summary.python


def test_device_tag_names_a_recorded_device():
    assert device_tag("NVIDIA H200") == "h200" and device_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert device_tag("cpu (x86_64, 2 cores)") == "cpu" and device_tag("NVIDIA B200") == "gpu"


def test_final_val_bpb_is_not_joined_to_the_periodic_line(tmp_path):
    rows = [{"step": 1, "elapsed": 1.0, "train_loss": 5.0}, {"step": 2, "elapsed": 2.0, "val_bpb": 3.0},
            {"step": 4, "elapsed": 4.0, "val_bpb": 2.5}, {"step": 4, "elapsed": 4.0, "val_bpb": 2.6, "final": True}]
    assert plots.val_series(rows) == ([(2.0, 3.0), (4.0, 2.5)], [(4.0, 2.6)])
    assert plots.loss_curve(rows, tmp_path / "loss.png").stat().st_size > 0


def test_clock_progress_is_the_further_of_time_and_steps():
    clock = Clock(max_seconds=100.0, max_steps=10, elapsed=30.0)
    assert clock.progress(0) == 0.3 and clock.progress(5) == 0.5 and clock.progress(20) == 1.0
    assert Clock(max_seconds=0.0, max_steps=4).progress(1) == 0.25
    assert Clock(max_seconds=10.0, max_steps=0, elapsed=5.0).progress(99) == 0.5
    clock.start()
    clock.pause()
    assert clock.elapsed >= 30.0 and clock.started is None
