"""The pretraining track (Parameter Golf): train a GPT under a wallclock cap, export it as a
compressed quantized artifact, and score val_bpb after the round trip.

build -> compile -> untimed warmup (then state restored) -> timed loop -> final validation ->
export -> reload + dequantize -> round-trip val_bpb (the score) -> summary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

import underpar
from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, nested
from underpar.data import shards
from underpar.data.prepare import TOKENIZER, DataConfig, load_manifest, prepare, split_files
from underpar.data.tokenizer import Tokenizer, build_byte_luts
from underpar.errors import ConfigError, UnderparError
from underpar.eval.bpb import evaluate_bpb
from underpar.model.gpt import GPTConfig, build, num_params
from underpar.model.precision import CONTROL_PATTERNS, cast_for_bf16_training
from underpar.optim import OptimConfig, build_optimizers, lr_schedule, muon_momentum_at, set_lr, set_muon_momentum
from underpar.quant import artifact
from underpar.quant.int8 import QuantConfig
from underpar.runs import checkpoint, plots
from underpar.runs.rundir import RunDir, environment


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
    compile: bool = True
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

    def check(self) -> None:
        if self.model.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {self.model.vocab_size} is smaller than data.vocab_size = {self.data.vocab_size}"
            )


class Clock:
    """Training time under the cap; paused around evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, elapsed: float, device: torch.device):
        self.cfg, self.elapsed, self.device = cfg, elapsed, device
        self.started: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()

    def pause(self) -> None:
        self._sync()
        self.elapsed += time.perf_counter() - self.started
        self.started = None

    def now(self) -> float:
        return self.elapsed + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def progress(self, step: int) -> float:
        """Fraction of the budget used: elapsed/cap, or step/max_steps, whichever is further."""
        cfg = self.cfg
        by_time = self.now() / cfg.max_wallclock_seconds if cfg.max_wallclock_seconds else 0.0
        by_steps = step / cfg.max_steps if cfg.max_steps else 0.0
        return min(1.0, max(by_time, by_steps))


def run(cfg: PretrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    env = dist.setup(cfg.train.device)
    try:
        return _run(cfg, env, resume)
    finally:
        dist.teardown()


def _run(cfg: PretrainConfig, env: dist.Env, resume: str | Path | None) -> dict[str, Any]:
    cfglib.validate(cfg)
    train = cfg.train
    micro_steps = train.tokens_per_step // (env.world_size * train.micro_batch_tokens)
    if micro_steps * env.world_size * train.micro_batch_tokens != train.tokens_per_step:
        raise ConfigError(
            f"train.tokens_per_step = {train.tokens_per_step} is not divisible into "
            f"{env.world_size} ranks x micro-batches of train.micro_batch_tokens = {train.micro_batch_tokens}"
        )

    # ---- data: prepared once (rank 0), then read by every rank --------------------------
    if env.is_main:
        prepare(cfg.data)
    _barrier(env)
    manifest = load_manifest(cfg.data)
    luts = build_byte_luts(Tokenizer.load(Path(manifest["dir"]) / TOKENIZER), cfg.model.vocab_size).to(env.device)
    val_tokens = shards.load_tokens(split_files(manifest, "val"))
    loader = shards.TokenLoader(split_files(manifest, "train"), env.rank, env.world_size)

    # ---- run directory ------------------------------------------------------------------
    if resume is not None:
        run_dir = RunDir(resume, writer=env.is_main)
    else:
        run_dir = RunDir.create(train.runs_root, cfg.name, writer=env.is_main) if env.is_main else None
        run_dir = RunDir(_broadcast_path(env, run_dir.path if run_dir else None), writer=env.is_main)
    run_dir.save_config(cfg)

    # ---- model and optimizers -----------------------------------------------------------
    torch.manual_seed(train.seed)
    model = build(cfg.model).to(env.device)
    use_bf16 = env.device.type == "cuda"
    if use_bf16:
        cast_for_bf16_training(model)
    optimizers = build_optimizers(model, cfg.optim, cfg.model.tie_embeddings)
    # Compile the model, then wrap it, as the reference does: dynamo cannot trace DDP's own
    # forward under fullgraph=True. The price: the gradient all-reduce (67 MB a step for the
    # baseline) starts after the compiled backward instead of overlapping it.
    forward = torch.compile(model, dynamic=False, fullgraph=True) if train.compile else model
    if env.distributed:
        device_ids = [env.local_rank] if use_bf16 else None
        forward = DistributedDataParallel(forward, device_ids=device_ids, broadcast_buffers=False)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    run_dir.log(
        f"model {num_params(model):,} parameters | {env.world_size} process(es) on {env.device} | "
        f"{micro_steps} micro-step(s) of {train.micro_batch_tokens:,} tokens per rank per step"
    )

    def train_step(lr_multiplier: float, momentum: float) -> float:
        set_lr(optimizers, lr_multiplier)
        set_muon_momentum(optimizers, momentum)
        total = torch.zeros((), device=env.device)
        for micro in range(micro_steps):
            x, y = (t.to(env.device, non_blocking=True) for t in loader.next_batch(train.micro_batch_tokens, train.seq_len))
            sync = micro == micro_steps - 1
            with (forward.no_sync() if env.distributed and not sync else nullcontext()), autocast():
                loss = forward(x, y)
            (loss / micro_steps).backward()
            total += loss.detach()
        if cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        total /= micro_steps
        dist.all_reduce_(total)
        return total.item() / env.world_size

    def validate(max_tokens: int = 0) -> Any:
        tokens = val_tokens[: max_tokens + 1] if max_tokens else val_tokens
        model.eval()
        with autocast():
            meter = evaluate_bpb(
                model.logits, tokens, luts, train.seq_len, train.val_batch_tokens // train.seq_len,
                rank=env.rank, world_size=env.world_size,
            )
        model.train()
        return meter

    # ---- compile warmup: real steps on real data, then everything is put back -----------
    compile_started = time.perf_counter()
    warmup_and_restore(model, optimizers, loader, train.warmup_steps, lambda: train_step(1.0, cfg.optim.muon_momentum_warmup_start))
    compile_seconds = time.perf_counter() - compile_started

    # ---- resume -------------------------------------------------------------------------
    step, elapsed, eval_seconds = 0, 0.0, 0.0
    ckpt_file = checkpoint.checkpoint_path(run_dir.path, env.rank)
    if resume is not None:
        saved = checkpoint.load(ckpt_file, model, optimizers, env.world_size)
        loader.load_state_dict(saved["loader"])
        checkpoint.set_rng_state(saved["rng"])
        step, elapsed, eval_seconds = saved["step"], saved["elapsed"], saved["eval_seconds"]
        run_dir.truncate_metrics(step)
        run_dir.log(f"resumed at step {step} after {elapsed:.1f} s of training")

    # ---- the timed loop -----------------------------------------------------------------
    schedule = lr_schedule(cfg.optim)
    clock = Clock(train, elapsed, env.device)
    step_ms: list[float] = []
    last_good = None
    clock.start()
    while True:
        progress = clock.progress(step)
        if _agree_done(env, progress >= 1.0):
            break
        started = time.perf_counter()
        lr = schedule(progress)
        loss = train_step(lr, muon_momentum_at(cfg.optim, step))
        step += 1
        if not math.isfinite(loss):
            clock.pause()
            where = f"the last good checkpoint is {ckpt_file} (step {last_good})" if last_good else "no checkpoint was saved"
            raise UnderparError(f"training loss became {loss} at step {step}; stopping ({where}). Try a lower learning rate.")
        step_ms.append(1000 * (time.perf_counter() - started))
        row = dict(step=step, train_loss=loss, lr=lr, tokens=step * train.tokens_per_step, elapsed=round(clock.now(), 3))
        paused = (train.val_every_steps and step % train.val_every_steps == 0) or (
            train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0
        )
        if paused:
            clock.pause()
            if train.val_every_steps and step % train.val_every_steps == 0:
                eval_started = time.perf_counter()
                meter = validate(train.val_max_tokens)
                eval_seconds += time.perf_counter() - eval_started
                row.update(val_bpb=meter.bpb, val_loss=meter.loss)
                run_dir.log(f"step {step} | val_bpb {meter.bpb:.4f} | val_loss {meter.loss:.4f} | {clock.now():.1f} s")
            if train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0:
                checkpoint.save(
                    ckpt_file, model, optimizers, loader.state_dict(), step=step, elapsed=clock.elapsed,
                    eval_seconds=eval_seconds, world_size=env.world_size,
                )
                last_good = step
            clock.start()
        run_dir.metric(**row)
        if step <= 10 or step % 50 == 0:
            run_dir.log(f"step {step} | loss {loss:.4f} | lr x{lr:.3f} | {step_ms[-1]:.0f} ms | {clock.now():.1f} s")
    clock.pause()

    # ---- final validation, export, round trip -------------------------------------------
    eval_started = time.perf_counter()
    pre = validate()
    byte_count = None
    artifact_path = run_dir.file("model.int8.ptz")
    if env.is_main:
        model_bytes = artifact.export_model(model.state_dict(), cfg.quant, artifact_path, CONTROL_PATTERNS)
        byte_count = artifact.account(model_bytes, train.artifact_limit_bytes)
    _barrier(env)
    restored = artifact.load_model(artifact_path, cfg.quant)
    model.load_state_dict({k: v.to(env.device) for k, v in restored.items()})
    post = validate()
    eval_seconds += time.perf_counter() - eval_started

    tokens_trained = step * train.tokens_per_step
    train_tokens_available = manifest["tokens"]["train"]
    summary = {
        "name": cfg.name,
        "val_bpb": post.bpb,
        "val_loss": post.loss,
        "val_bpb_pre_quant": pre.bpb,
        "val_loss_pre_quant": pre.loss,
        "artifact_bytes": None if byte_count is None else {
            "code": byte_count.code, "model": byte_count.model, "total": byte_count.total, "limit": byte_count.limit,
            "code_files": [str(p.relative_to(Path(underpar.__file__).parent)) for p in byte_count.files],
        },
        "steps": step,
        "training_seconds": round(clock.elapsed, 3),
        "median_ms_per_step": statistics.median(step_ms) if step_ms else None,
        "tokens_per_second": tokens_trained / clock.elapsed if clock.elapsed else None,
        "training_tokens": tokens_trained,
        "epochs": tokens_trained / train_tokens_available,
        "compile_seconds": round(compile_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None,
        "parameters": num_params(model),
        "world_size": env.world_size,
        "data": manifest["dir"],
        "run_dir": str(run_dir.path),
        **environment(),
    }
    run_dir.metric(step=step, elapsed=round(clock.elapsed, 3), val_bpb=pre.bpb, val_loss=pre.loss, final=True)
    run_dir.save_summary(summary)
    if env.is_main:
        plots.loss_curve(run_dir.metrics(), run_dir.file("loss.png"), title=f"{cfg.name}: round-trip val_bpb {post.bpb:.4f}")
        run_dir.log(
            f"done: {step} steps in {clock.elapsed:.1f} s | val_bpb {pre.bpb:.4f} -> {post.bpb:.4f} after the round trip | "
            f"artifact {byte_count.total:,} bytes (code {byte_count.code:,} + model {byte_count.model:,})"
        )
    return summary


def warmup_and_restore(model, optimizers, loader, steps: int, step_fn: Callable[[], float]) -> None:
    """Run `steps` real training steps (compiling every graph the loop will use), then put the
    model, optimizer state and loader back exactly as they were: the warmup trains nothing."""
    if steps == 0:
        return
    model_state = copy.deepcopy(model.state_dict())
    optimizer_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
    loader_state = loader.state_dict()
    rng = checkpoint.rng_state()
    for _ in range(steps):
        step_fn()
    model.load_state_dict(model_state)
    for opt, state in zip(optimizers, optimizer_states):
        opt.load_state_dict(state)
    loader.load_state_dict(loader_state)
    checkpoint.set_rng_state(rng)


def _barrier(env: dist.Env) -> None:
    if env.distributed:
        torch_dist.barrier()


def _agree_done(env: dist.Env, done: bool) -> bool:
    """Every rank stops on the same step: stop when any rank's clock says so."""
    if not env.distributed:
        return done
    flag = torch.tensor(int(done), device=env.device)
    dist.all_reduce_(flag, op="max")
    return bool(flag.item())


def _broadcast_path(env: dist.Env, path: Path | None) -> Path:
    if not env.distributed:
        return path
    box = [str(path) if path else None]
    torch_dist.broadcast_object_list(box, src=0)
    return Path(box[0])
