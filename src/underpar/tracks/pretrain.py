"""The pretraining track (Parameter Golf): train a GPT under a wallclock cap, export it as a
compressed quantized artifact, and score val_bpb after the round trip.

data -> run directory -> model, optimizers, compile -> untimed warmup (then state restored) ->
timed loop -> final validation -> export -> reload + dequantize -> round-trip val_bpb (the
score) -> summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, nested
from underpar.data.dataset import PreparedData
from underpar.data.config import DataConfig
from underpar.eval.config import EvalConfig
from underpar.eval.score import Score, final_scores
from underpar.errors import ConfigError, TrainingError
from underpar.eval.bpb import BpbMeter
from underpar.model.config import GPTConfig
from underpar.model.gpt import num_params
from underpar.model.precision import CONTROL_PATTERNS
from underpar.optim import OptimConfig, muon_momentum_at
from underpar.optim.dynamics import Metamorphosis
from underpar.quant import artifact
from underpar.quant.calibrate import Calibration, gptq_quantize
from underpar.quant.config import QuantConfig
from underpar.runs import checkpoint, plots
from underpar.runs.clock import Clock
from underpar.runs.rundir import RunDir, Summary, check_run_name, check_runs_root
from underpar.stages import compiled_graphs
from underpar.tracks.pretrain_trainer import Progress, Trainer


LOG_EVERY_SECONDS = 10.0  # a progress line at least this often (and on each of the first 10 steps)


@dataclasses.dataclass
class TrainConfig:
    tokens_per_step: int = bounded(524_288, 1)  # global batch, all ranks and micro-steps
    seq_len: int = bounded(1024, 1)
    micro_batch_tokens: int = bounded(65_536, 1)  # per rank per forward; sets grad accumulation
    max_wallclock_seconds: float = bounded(600.0, 0.0)  # training time only; 0 = no cap
    max_steps: int = bounded(0, 0)  # 0 = no step cap (then the wallclock alone decides)
    warmup_steps: int = bounded(20, 0)  # compile warmup steps, undone afterwards
    val_every_steps: int = bounded(0, 0)  # 0 = validate at the end only
    val_max_tokens: int = bounded(0, 0)  # cap for periodic validation; 0 = whole split
    val_batch_tokens: int = bounded(65_536, 1)
    checkpoint_every_steps: int = bounded(0, 0)  # 0 = no checkpoints
    seed: int = 1337
    compile: bool = True  # the model (fullgraph) and Muon's iteration under torch.compile; false: all eager
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    artifact_limit_bytes: int = bounded(artifact.LIMIT_BYTES, 1)
    runs_root: str = "runs"

    def check(self) -> None:
        if self.max_wallclock_seconds == 0 and self.max_steps == 0:
            raise ConfigError("train.max_wallclock_seconds and train.max_steps are both 0; set one of them")
        for name in ("micro_batch_tokens", "val_batch_tokens"):
            if getattr(self, name) % self.seq_len:
                raise ConfigError(f"train.{name} = {getattr(self, name)} must be a multiple of train.seq_len = {self.seq_len}")
        if self.tokens_per_step % self.micro_batch_tokens:
            raise ConfigError(
                f"train.tokens_per_step = {self.tokens_per_step} must be a multiple of "
                f"train.micro_batch_tokens = {self.micro_batch_tokens}"
            )


@dataclasses.dataclass
class PretrainConfig:
    name: str = "pretrain"
    data: DataConfig = nested(DataConfig)
    model: GPTConfig = nested(GPTConfig)
    optim: OptimConfig = nested(OptimConfig)
    quant: QuantConfig = nested(QuantConfig)
    train: TrainConfig = nested(TrainConfig)
    eval: EvalConfig = nested(EvalConfig)  # extra final scores: sliding windows, score-first TTT

    def check(self) -> None:
        check_run_name(self.name)
        cap, reserve = self.train.max_wallclock_seconds, self.quant.reserve_seconds()
        if cap and reserve >= cap:
            raise ConfigError(f"quant.gptq_reserve_seconds = {reserve:g} leaves no training time under "
                              f"train.max_wallclock_seconds = {cap:g}")
        if isinstance(self.optim.weight_dynamics, Metamorphosis):
            self.optim.weight_dynamics.check_dropout(self.model.dropout)
        if self.model.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {self.model.vocab_size} is smaller than data.vocab_size = {self.data.vocab_size}"
            )


@dataclasses.dataclass(kw_only=True)
class PretrainSummary(Summary):
    val_bpb: float  # after the quantization round trip: the score
    val_loss: float
    val_bpb_pre_quant: float
    val_loss_pre_quant: float
    artifact_bytes: dict[str, Any] | None  # code, model, total, limit, code_files (rank 0 only)
    steps: int
    training_seconds: float
    median_ms_per_step: float | None
    tokens_per_second: float | None
    training_tokens: int
    epochs: float  # passes over the training tokens
    compile_seconds: float
    compiled_graphs: int  # by the untimed warmup: one per training stage (and eval shape)
    recompiles_in_timed_region: int  # graphs compiled after the warmup: 0 unless something is wrong
    eval_seconds: float
    peak_memory_bytes: int | None
    parameters: int
    world_size: int
    data: str
    tokenizer_sha256: str | None = None  # so `eval bpb --run` can check a tokenizer after the data is gone
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)  # eval.*: "sliding", "ttt" (each with its seconds)


def run(cfg: PretrainConfig, resume: str | Path | None = None) -> PretrainSummary:
    env = dist.setup(cfg.train.device)
    try:
        return _run(cfg, env, resume)
    finally:
        dist.teardown()


def _run(cfg: PretrainConfig, env: dist.Env, resume: str | Path | None) -> PretrainSummary:
    cfglib.validate(cfg)
    ckpt_name = checkpoint.checkpoint_path(Path(), env.rank).name
    if resume is None:
        check_runs_root(cfg.train.runs_root, "train.runs_root")
    run_dir = RunDir.resume(resume, env, needs=ckpt_name) if resume else None  # checked before any work
    data = PreparedData.ready(cfg.data, env)
    run_dir = run_dir or RunDir.start(cfg.train.runs_root, cfg.name, env)  # bad data leaves no directory behind
    try:
        return _train_and_score(cfg, env, data, run_dir, run_dir.file(ckpt_name), resume is not None)
    except BaseException as e:  # the run store shows it failed (or killed), never running
        run_dir.fail(f"{type(e).__name__}: {e}", "killed" if isinstance(e, KeyboardInterrupt) else "failed")
        raise


def _train_and_score(cfg: PretrainConfig, env: dist.Env, data: PreparedData, run_dir: RunDir, ckpt_file: Path,
                     resume: bool) -> PretrainSummary:
    trainer = Trainer(cfg, env, data)
    run_dir.save_config(cfg)
    run_dir.log(trainer.describe())
    before = compiled_graphs()
    compile_seconds = trainer.warm_up()
    graphs = compiled_graphs() - before  # the timed region must add none (logged at the end)
    state = Progress()
    if resume:
        state = trainer.load(ckpt_file)
        run_dir.truncate_metrics(state.step)
        run_dir.log(f"resumed at step {state.step} after {state.elapsed:.1f} s of training")

    try:
        step_ms = train_loop(trainer, state, run_dir, ckpt_file)
    except KeyboardInterrupt:
        _say_how_to_resume(run_dir, state)
        raise

    if note := trainer.averager.apply():  # the averaged weights are validated, exported and scored
        run_dir.log(note)
    eval_started = time.perf_counter()
    pre = trainer.validate(label="val_bpb")
    byte_count, post = export_and_score(trainer, data, run_dir)
    scores = final_scores(trainer.model, trainer.val_tokens, trainer.luts, cfg.eval, cfg.train.seq_len, trainer.autocast,
                          env.rank, env.world_size, plain=False)  # sliding windows, TTT: when cfg.eval asks
    for name, score in scores.items():
        run_dir.log(f"val_bpb ({name}) {score.val_bpb:.4f} in {score.seconds:.1f} s of evaluation")
    state.eval_seconds += time.perf_counter() - eval_started
    recompiles = compiled_graphs() - before - graphs
    summary = _summary(cfg, env, trainer, data, run_dir, state, step_ms, (compile_seconds, graphs, recompiles),
                       pre, post, byte_count, scores)
    run_dir.metric(step=state.step, elapsed=round(state.elapsed, 3), val_bpb=pre.bpb, val_loss=pre.loss, final=True)
    run_dir.save_summary(summary)
    if env.is_main:
        plots.loss_curve(run_dir.metrics(), run_dir.file("loss.png"), title=f"{cfg.name}: round-trip val_bpb {post.bpb:.4f}")
        run_dir.log(
            f"done: {state.step} steps in {state.elapsed:.1f} s | val_bpb {pre.bpb:.4f} -> {post.bpb:.4f} after the round trip | "
            f"artifact {byte_count.total:,} bytes (code {byte_count.code:,} + model {byte_count.model:,}) | "
            f"warmup compiled {graphs} graph(s) in {compile_seconds:.1f} s; recompiles in the timed region: {recompiles}"
        )
    return summary


def train_loop(trainer: Trainer, state: Progress, run_dir: RunDir, ckpt_file: Path) -> list[float]:
    """Steps until the budget is spent (every rank stops on the same step); evaluation and
    checkpoints pause the clock. Returns each step's milliseconds."""
    cfg, env, train = trainer.cfg, trainer.env, trainer.cfg.train
    schedule = cfg.optim.schedule  # progress in [0, 1] -> LR multiplier
    # GPTQ's calibration and quantization count as training: their reserve comes off the cap
    budget = max(train.max_wallclock_seconds - cfg.quant.reserve_seconds(), 0.0) if train.max_wallclock_seconds else 0.0
    clock = Clock(budget, train.max_steps, state.elapsed, env.device)
    step_ms: list[float] = []
    last_line = time.perf_counter()
    clock.start()
    while True:
        progress = clock.progress(state.step)
        if dist.agree(env, progress >= 1.0):
            break
        started = time.perf_counter()
        for change in trainer.stages.enter(progress):
            run_dir.log(f"step {state.step} | {change} ({100 * progress:.1f}% of training)")
        loss = trainer.step(schedule(progress), muon_momentum_at(cfg.optim, state.step), progress)
        lr = trainer.lr_multiplier
        state.step += 1
        step = state.step
        trainer.averager.update(step, progress)  # eager foreach ops after the optimizer step, timed with it
        if not math.isfinite(loss):
            clock.pause()
            where = (f"the last good checkpoint is {ckpt_file} (step {state.checkpoint_step})"
                     if state.checkpoint_step else "no checkpoint was saved")
            raise TrainingError(f"training loss became {loss} at step {step}; stopping ({where}). Try a lower learning rate.")
        step_ms.append(1000 * (time.perf_counter() - started))
        row = dict(step=step, train_loss=loss, lr=lr, tokens=step * train.tokens_per_step, elapsed=round(clock.now(), 3))
        validate_now = train.val_every_steps and step % train.val_every_steps == 0
        save_now = train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0
        if validate_now or save_now:
            clock.pause()
            if validate_now:
                eval_started = time.perf_counter()
                meter = trainer.validate(train.val_max_tokens)
                state.eval_seconds += time.perf_counter() - eval_started
                row.update(val_bpb=meter.bpb, val_loss=meter.loss)
                run_dir.log(f"step {step} | val_bpb {meter.bpb:.4f} | val_loss {meter.loss:.4f} | {clock.now():.1f} s")
            if save_now:
                state.elapsed, state.checkpoint_step = clock.elapsed, step
                trainer.save(ckpt_file, state)
            clock.start()
        run_dir.metric(**row)
        if step <= 10 or time.perf_counter() - last_line >= LOG_EVERY_SECONDS:
            last_line = time.perf_counter()
            done = clock.progress(step)
            eta = f" | {100 * done:.0f}%, ~{clock.now() * (1 - done) / done:.0f} s to go" if done > 0 else ""
            run_dir.log(f"step {step} | loss {loss:.4f} | lr x{lr:.3f} | {step_ms[-1]:.0f} ms | {clock.now():.1f} s{eta}")
    clock.pause()
    state.elapsed = clock.elapsed
    return step_ms


def _say_how_to_resume(run_dir: RunDir, state: Progress) -> None:
    if state.checkpoint_step:
        run_dir.log(f"interrupted at step {state.step}; the checkpoint of step {state.checkpoint_step} is kept: "
                    f"continue with `underpar pretrain --resume {run_dir.path}`")
    else:
        run_dir.log(f"interrupted at step {state.step}; no checkpoint was saved, so this run cannot be resumed "
                    "(set train.checkpoint_every_steps to save them)")


def export_and_score(trainer: Trainer, data: PreparedData, run_dir: RunDir) -> tuple[artifact.ArtifactBytes | None, BpbMeter]:
    """Rank 0 quantizes (GPTQ when quant.gptq, with Hessians from training tokens: the API
    refuses validation data), writes the artifact, its export report (export.json) and counts
    its bytes; every rank loads it back into the model and scores it: the round-trip val_bpb."""
    cfg, env = trainer.cfg, trainer.env
    byte_count = None
    artifact_path = run_dir.file("model.int8.ptz")
    if env.is_main:
        if cfg.quant.gptq:
            calibration = Calibration.from_loader(data.train_loader(), cfg.quant.gptq_calibration_batches,
                                                  cfg.train.micro_batch_tokens, cfg.train.seq_len, data=data)
            quantized, stats = gptq_quantize(trainer.model, calibration, cfg.quant)
            exported = artifact.export_quantized(quantized, cfg.quant, artifact_path, stats)
            run_dir.log(f"gptq: {exported.stats['gptq_seconds']:.1f} s (reserve {cfg.quant.reserve_seconds():.0f} s of the cap)")
        else:
            exported = artifact.export(trainer.model.state_dict(), cfg.quant, artifact_path, CONTROL_PATTERNS)
        run_dir.file("export.json").write_text(json.dumps({"stats": exported.stats, "report": exported.report}, indent=1, default=str))
        byte_count = artifact.account(exported.model_bytes, cfg.train.artifact_limit_bytes)
    dist.barrier(env)
    restored = artifact.load_model(artifact_path, cfg.quant)
    trainer.model.load_state_dict({k: v.to(env.device) for k, v in restored.items()})
    return byte_count, trainer.validate(label="val_bpb after the round trip")


def _summary(cfg: PretrainConfig, env: dist.Env, trainer: Trainer, data: PreparedData, run_dir: RunDir,
             state: Progress, step_ms: list[float], compiled: tuple[float, int, int], pre: BpbMeter, post: BpbMeter,
             byte_count: artifact.ArtifactBytes | None, scores: dict[str, Score]) -> PretrainSummary:
    tokens_trained = state.step * cfg.train.tokens_per_step
    return PretrainSummary(
        name=cfg.name,
        run_dir=str(run_dir.path),
        val_bpb=post.bpb,
        val_loss=post.loss,
        val_bpb_pre_quant=pre.bpb,
        val_loss_pre_quant=pre.loss,
        artifact_bytes=None if byte_count is None else byte_count.as_dict(),
        steps=state.step,
        training_seconds=round(state.elapsed, 3),
        median_ms_per_step=statistics.median(step_ms) if step_ms else None,
        tokens_per_second=tokens_trained / state.elapsed if state.elapsed else None,
        training_tokens=tokens_trained,
        epochs=tokens_trained / data.train_token_count,
        compile_seconds=round(compiled[0], 3),
        compiled_graphs=compiled[1],
        recompiles_in_timed_region=compiled[2],
        eval_seconds=round(state.eval_seconds, 3),
        peak_memory_bytes=torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None,
        parameters=num_params(trainer.model),
        world_size=env.world_size,
        data=str(data.dir),
        tokenizer_sha256=data.manifest["tokenizer"]["sha256"],
        scores={name: dataclasses.asdict(score) for name, score in scores.items()},
    )
