"""The pretraining track on a micro model: run directory, warmup restore, kill-and-resume,
2-process torchrun against one process, artifact limit, non-finite loss."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from underpar import config as cfglib
from underpar import dist
from underpar.data.dataset import PreparedData
from underpar.data.config import DataConfig
from underpar.data.prepare import prepare
from underpar.errors import TrainingError, UnderparError
from underpar.model.gpt import GPT
from underpar.runs.rundir import RunDir
from underpar.tracks import pretrain as track

from test_prepare import write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny matmuls, one thread

MICRO = [
    "model.num_layers=2", "model.model_dim=64", "model.attention.num_heads=2", "model.attention.num_kv_heads=1", "model.vocab_size=400",
    "data.source=text", "data.vocab_size=400", "data.val_docs=20",
    "train.seq_len=64", "train.tokens_per_step=1024", "train.micro_batch_tokens=512",
    "train.max_wallclock_seconds=0", "train.max_steps=6", "train.warmup_steps=2", "train.compile=false",
    "train.device=cpu", "train.checkpoint_every_steps=2", "train.val_every_steps=3",
    "train.val_max_tokens=2048", "train.val_batch_tokens=1024",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain-data")
    write_corpus(root / "corpus", documents=120)
    out = root / "prepared"
    prepare(cfglib.from_dict(DataConfig, dict(source="text", path=str(root / "corpus"), vocab_size=400, val_docs=20, out=str(out))))
    return root


def micro_config(data_dir, runs, *extra):
    sets = MICRO + [f"data.path={data_dir / 'corpus'}", f"data.out={data_dir / 'prepared'}", f"train.runs_root={runs}", *extra]
    return cfglib.resolve("pretrain", "tiny-cpu", sets)


def test_run_directory_and_summary(data_dir, tmp_path):
    cfg = micro_config(data_dir, tmp_path)
    summary = track.run(cfg)
    run_dir = RunDir(summary.run_dir)
    assert cfglib.load_json(run_dir.file("config.json")) == cfg
    rows = run_dir.metrics()
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_bpb" in r] == [3, 6, 6]
    assert summary.steps == 6 and summary.training_tokens == 6 * 1024
    assert summary.val_bpb == pytest.approx(summary.val_bpb_pre_quant, abs=0.05)
    sizes = summary.artifact_bytes
    assert sizes["total"] == sizes["code"] + sizes["model"]
    assert sizes["model"] == os.path.getsize(run_dir.file("model.int8.ptz"))
    assert "model/gpt.py" in sizes["code_files"] and "tracks/pretrain.py" in sizes["code_files"]
    for name in ("train.log", "loss.png", "summary.json"):
        assert run_dir.file(name).stat().st_size > 0
    assert json.loads(run_dir.file("summary.json").read_text())["val_bpb"] == summary.val_bpb
    # the trained model beats the uniform distribution by a wide margin even after 6 steps
    assert summary.val_loss < torch.log(torch.tensor(400.0)).item() - 0.3


def test_warmup_restore_leaves_a_fresh_init(data_dir):
    cfg = micro_config(data_dir, "unused")
    trainer = track.Trainer(cfg, dist.setup("cpu"), PreparedData.open(cfg.data))
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    start = trainer.loader.state_dict()
    trainer.warm_up()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, fresh[name]), name
    assert all(not opt.state for opt in trainer.optimizers)
    assert trainer.loader.state_dict() == start
    # and the warmup really trained: without the restore the weights would have moved
    trainer.step(1.0, 0.85)
    assert not torch.equal(trainer.model.state_dict()["blocks.0.attn.proj.weight"], fresh["blocks.0.attn.proj.weight"])


def test_an_eager_run_compiles_nothing(data_dir):
    """train.compile=false: neither the model nor Muon's Newton-Schulz under torch.compile (on
    CUDA Muon compiles by default, one graph per shape, inside the timed region)."""
    for compile, model_compiled, muon_compile in (("true", True, None), ("false", False, False)):
        cfg = micro_config(data_dir, "unused", f"train.compile={compile}")
        trainer = track.Trainer(cfg, dist.setup("cpu"), PreparedData.open(cfg.data))
        assert (trainer.forward is not trainer.model) == model_compiled
        assert trainer.optimizers[0].compile is muon_compile


def final_losses(run_dir):
    return [r["train_loss"] for r in RunDir(run_dir).metrics() if "train_loss" in r]


def run_killed_at_step(cfg, step: int, monkeypatch):
    """Run `cfg` and kill it (KeyboardInterrupt) as step `step` logs; its run directory."""
    real_metric = RunDir.metric

    def killed(self, **row):
        if row.get("step") == step and "train_loss" in row:
            raise KeyboardInterrupt("simulated kill")
        real_metric(self, **row)

    monkeypatch.setattr(RunDir, "metric", killed)
    with pytest.raises(KeyboardInterrupt):
        track.run(cfg)
    monkeypatch.undo()
    (killed_dir,) = [p for p in Path(cfg.train.runs_root).iterdir() if p.is_dir()]  # beside the run store
    return killed_dir


def test_kill_and_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    uninterrupted = track.run(micro_config(data_dir, tmp_path / "a"))
    killed_dir = run_killed_at_step(micro_config(data_dir, tmp_path / "b"), 5, monkeypatch)
    assert not (killed_dir / "summary.json").exists()
    resumed = track.run(cfglib.load_json(killed_dir / "config.json"), resume=killed_dir)
    assert resumed.steps == 6
    assert "continue with `underpar pretrain --resume" in (killed_dir / "train.log").read_text()
    assert final_losses(killed_dir) == final_losses(uninterrupted.run_dir)
    assert resumed.val_bpb == uninterrupted.val_bpb


def _files(run_dir):
    return {f.name: f.read_bytes() for f in run_dir.iterdir()}


def test_resume_refuses_a_finished_run_and_touches_nothing(data_dir, tmp_path):
    summary = track.run(micro_config(data_dir, tmp_path))
    run_dir = RunDir(summary.run_dir).path
    before = _files(run_dir)
    with pytest.raises(UnderparError, match="the run finished"):
        track.run(cfglib.load_json(run_dir / "config.json"), resume=run_dir)
    assert _files(run_dir) == before


def test_resume_without_checkpoint_is_a_clear_error_and_touches_nothing(data_dir, tmp_path, monkeypatch):
    def killed(self, **row):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(RunDir, "metric", killed)
    with pytest.raises(KeyboardInterrupt):
        track.run(micro_config(data_dir, tmp_path, "train.checkpoint_every_steps=0"))
    monkeypatch.undo()
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "no checkpoint was saved, so this run cannot be resumed" in (run_dir / "train.log").read_text()
    before = _files(run_dir)
    with pytest.raises(UnderparError, match="no checkpoint-rank0.pt to resume from"):
        track.run(cfglib.load_json(run_dir / "config.json"), resume=run_dir)
    with pytest.raises(UnderparError, match="not a run directory"):
        track.run(cfglib.load_json(run_dir / "config.json"), resume=tmp_path / "no-such-run")
    assert _files(run_dir) == before and not (tmp_path / "no-such-run").exists()


def test_artifact_over_the_limit_fails(data_dir, tmp_path):
    with pytest.raises(UnderparError, match="over the limit"):
        track.run(micro_config(data_dir, tmp_path, "train.artifact_limit_bytes=50000"))


def test_non_finite_loss_stops_and_keeps_the_checkpoint(data_dir, tmp_path, monkeypatch):
    real_forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, target_ids=None):
        calls["n"] += 1
        out = real_forward(self, input_ids, target_ids)
        # warmup (2 steps x 2 micro-steps) + 4 good steps, then NaN
        return out * float("nan") if calls["n"] > 4 + 8 else out

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"training loss became nan at step 5.*step 4"):
        track.run(micro_config(data_dir, tmp_path))
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert torch.load(run_dir / "checkpoint-rank0.pt", weights_only=False)["step"] == 4


def test_bad_batch_geometry_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(cfglib.ConfigError, match="multiple of train.micro_batch_tokens"):
        micro_config(data_dir, tmp_path, "train.tokens_per_step=1000")


def torchrun_sets(data_dir):
    return MICRO + [f"data.path={data_dir / 'corpus'}", f"data.out={data_dir / 'prepared'}", "train.checkpoint_every_steps=0", "train.max_steps=4"]


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The one-process eager run both torchrun tests compare with."""
    return track.run(cfglib.resolve("pretrain", "tiny-cpu", torchrun_sets(data_dir) + [f"train.runs_root={tmp_path_factory.mktemp('one')}"]))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun missing")
def test_two_process_torchrun_matches_one_process(data_dir, single, tmp_path):
    """Eager here; compiled in the next test."""
    sets = torchrun_sets(data_dir)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "underpar", "pretrain", "--preset", "tiny-cpu"]
    for s in sets + [f"train.runs_root={tmp_path / 'two'}", "train.micro_batch_tokens=512"]:
        args += ["--set", s]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (two_dir,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir()]
    two = json.loads((two_dir / "summary.json").read_text())
    assert two["world_size"] == 2 and two["steps"] == 4 and two["compiled_graphs"] == 0
    assert final_losses(two_dir) == pytest.approx(final_losses(single.run_dir), rel=2e-3)
    assert two["val_bpb"] == pytest.approx(single.val_bpb, rel=2e-3)


@pytest.mark.slow
def test_compiled_ddp_splits_the_graph_at_gradient_buckets(data_dir, tmp_path):
    """Compiled (on the aot_eager backend, as the in-process compile tests; inductor: test_model),
    DDP wraps the compiled model (dynamo cannot trace DDP's forward under fullgraph). That model is
    compiled on its first call, inside DDP's forward, so dynamo's DDPOptimizer splits it at DDP's
    gradient buckets (1 MiB first, then 25 MiB): each bucket's backward is its own graph and its
    all-reduce starts while the earlier layers' backward runs. A 256-wide model has more than one
    bucket; the losses stay those of one process."""
    sets = torchrun_sets(data_dir) + ["model.model_dim=256"]
    one = track.run(cfglib.resolve("pretrain", "tiny-cpu", sets + [f"train.runs_root={tmp_path / 'one'}"]))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--standalone", "--nproc_per_node=2", os.path.join(os.path.dirname(__file__), "aot_eager_cli.py"),
            "pretrain", "--preset", "tiny-cpu"]
    for s in sets + [f"train.runs_root={tmp_path / 'two'}", "train.micro_batch_tokens=512", "train.compile=true"]:
        args += ["--set", s]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_LOGS": "+torch._dynamo.backends.distributed"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    buckets = [int(n) for n in re.findall(r"\[rank0\].*DDPOptimizer used bucket cap \d+ and created (\d+) buckets", result.stderr)]
    assert buckets and min(buckets) > 1, result.stderr[-3000:]
    (two_dir,) = [p for p in (tmp_path / "two").iterdir() if p.is_dir()]
    two = json.loads((two_dir / "summary.json").read_text())
    assert two["world_size"] == 2 and two["compiled_graphs"] > 0
    assert final_losses(two_dir) == pytest.approx(final_losses(one.run_dir), rel=2e-3)
    assert two["val_bpb"] == pytest.approx(one.val_bpb, rel=2e-3)


@pytest.mark.slow
def test_scaling_benchmark_runs_each_world_size_and_records_a_failed_one(data_dir, tmp_path, monkeypatch):
    """benchmarks/scaling.py (its main, in this process; it launches torchrun) on 1 and 2 gloo
    processes at a batch of one micro-batch: 2 cannot split it, so 2 is recorded as failed and
    the table still has 1. (That 2 processes match 1 is tested above.)"""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_benchmark", path)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    args = ["scaling.py", "pretrain", "--device", "cpu", "--preset", "tiny-cpu", "--gpus", "1", "2", "--steps", "3",
            "--out", str(tmp_path)]
    for s in MICRO + ["train.tokens_per_step=512", f"data.path={data_dir / 'corpus'}", f"data.out={data_dir / 'prepared'}"]:
        if not s.startswith(("train.max_steps", "train.tokens_per_step=1024")):
            args += ["--set", s]
    monkeypatch.setattr(sys, "argv", args)
    scaling.main()
    rows = json.loads((tmp_path / "scaling_pretrain-cpu.json").read_text())["rows"]
    assert [r["gpus"] for r in rows] == [1, 2]
    one, two = rows
    assert one["efficiency"] == 1.0 and one["speedup"] == 1.0 and one["world_size"] == 1 and one["steps"] == 3
    assert "error" in two and "not divisible" in two["log_tail"]
    assert (tmp_path / "logs" / "pretrain-2.log").is_file()


def test_no_preset_on_a_cpu_runs_tiny_cpu_and_says_so(monkeypatch, capsys):
    from clirun import run_main

    ran = []

    def stop_at_once(cfg, resume=None):  # the choice of preset is what is tested, not a run
        ran.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(track, "run", stop_at_once)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_main(monkeypatch, capsys, "pretrain")
    assert code == 130 and [cfg.name for cfg in ran] == ["tiny-cpu"]
    assert "no --preset given: tiny-cpu (no GPU here; golf-baseline" in err


def test_only_the_two_lane_residual_compiles_without_mix_order_reduction(data_dir, monkeypatch):
    """Inductor (torch 2.11, CUDA) asserts in that fusion on the two-lane backward (measured)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    for sets in (["model.residual.two_lane_start=1"], []):
        cfg = micro_config(data_dir, "unused", "train.compile=true", *sets)
        track.Trainer(cfg, dist.setup("cpu"), PreparedData.open(cfg.data))
    assert [kwargs["options"] for kwargs in seen] == [{"triton.mix_order_reduction": False}, None]


def test_quantization_and_evaluation_stack_wired_into_a_run(data_dir, tmp_path):
    """QAT switched on as a training stage, GPTQ (int6, Hessians from training tokens) with its
    export report, and the extra final scores (sliding windows) in the summary."""
    sets = ["quant.scheme=mixed", "quant.container=grouped", "quant.gptq=true", "quant.gptq_calibration_batches=2",
            "quant.keep_float_max_numel=1000", "quant.qat_bits=6", "quant.qat_start=0.5", "eval.stride=32"]
    summary = track.run(micro_config(data_dir, tmp_path, *sets))
    run_dir = RunDir(summary.run_dir)
    log = run_dir.file("train.log").read_text()
    assert "step 3 | qat int6 on (50.0% of training)" in log and "gptq: " in log
    export = json.loads(run_dir.file("export.json").read_text())
    assert export["stats"]["calibration_source"] == "train" and export["stats"]["calibration_tokens"] == 2 * 512
    assert set(summary.scores) == {"sliding"} and summary.scores["sliding"]["stride"] == 32
    assert abs(summary.scores["sliding"]["val_bpb"] - summary.val_bpb) < 0.2
    assert summary.tokenizer_sha256 and summary.recompiles_in_timed_region == 0
    with pytest.raises(UnderparError, match="gptq_reserve_seconds = 12 leaves no training time"):
        micro_config(data_dir, tmp_path, "quant.scheme=mixed", "quant.gptq=true", "train.max_wallclock_seconds=10")
