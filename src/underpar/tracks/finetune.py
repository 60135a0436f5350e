"""The fine-tuning track: full fine-tuning, LISA, or the Deep Chaos Scheduler on a Hugging Face
causal LM, with an explicit loop (what trains, and what is in the graph, changes every block).

check the inputs (tracks/finetune_inputs.py: task data, model, encoding; a bad one leaves no
run directory) -> method controller -> AdamW loop (the LR schedule of progress, gradient
accumulation, clipping) -> restore the full model -> save it (HF format) -> evaluate. Methods
(tracks/finetune_methods.py: full; lisa.py; chaos.py) are registered controllers the loop
drives the same way: `begin` a step (maybe a new block), `end`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, nested, variant
from underpar.data.sft import collate, packed_attention_mask
from underpar.data.tasks import TASKS, get_task
from underpar.errors import ConfigError, TrainingError, UnderparError
from underpar.eval.accuracy import check_scored, evaluate_task
from underpar.eval.generate import DecodeConfig
from underpar.model import hf
from underpar.optim.schedule import SCHEDULES, Schedule
from underpar.runs import plots
from underpar.runs.rundir import RunDir, Summary, check_run_name, check_runs_root
from underpar.tracks import chaos, finetune_dist, finetune_heldout, lisa  # noqa: F401  (chaos, lisa register their methods)
from underpar.tracks import finetune_progress as progress
from underpar.tracks.finetune_inputs import Inputs, batches, check_inputs
from underpar.tracks.finetune_methods import METHODS, Controller, MethodConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclasses.dataclass
class FTModelConfig:
    name: str = "smollm2-135m"  # smollm2-135m, a local save_pretrained folder, or a hub id
    architecture: str = ""  # instead of name: random init of hf.ARCHITECTURES[...] (speed runs)
    num_layers: int = bounded(0, 0)  # with architecture: this many decoder layers (0 = its own; memory searches)
    dtype: str = choice("auto", ("auto", "bfloat16", "float32"))  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False

    def check(self) -> None:
        if self.architecture and self.architecture not in hf.ARCHITECTURES:
            raise ConfigError(f"model.architecture = {self.architecture!r} is not valid; choose one of: "
                              f"{', '.join(hf.ARCHITECTURES)} (or leave it empty to load model.name)")
        if self.num_layers and not self.architecture:
            raise ConfigError(f"model.num_layers = {self.num_layers} applies to model.architecture only (a random-init "
                              "shape); a loaded model keeps its layers")
        if not self.architecture and not self.name.strip():
            raise ConfigError("model.name = '' names no model; give smollm2-135m, a local folder or a hub id")


@dataclasses.dataclass
class FTDataConfig:
    task: str = choice("gsm_symbolic", TASKS)  # its "train" split
    path: str = ""  # local file/folder in the task's schema ("" = hub or generated)
    train_examples: int = bounded(1000, 1)
    max_length: int = bounded(1024, 8)
    packing: bool = False  # pack examples into rows of max_length, isolated by a 4-D mask
    seed: int = 0

    def check(self) -> None:
        if "train" not in get_task(self.task).splits:
            trainable = ", ".join(n for n, t in TASKS.items() if "train" in t.splits)
            raise ConfigError(f"data.task = {self.task!r} has no 'train' split to train on; choose one of: {trainable}")


@dataclasses.dataclass
class FTOptimConfig:
    lr: float = bounded(1e-5, 0.0)
    weight_decay: float = bounded(0.0, 0.0)
    beta1: float = bounded(0.9, 0.0, 1.0)
    beta2: float = bounded(0.999, 0.0, 1.0)
    eps: float = bounded(1e-8, 0.0)
    # LR multiplier over progress in [0, 1] ([optim.schedule]; cosine: warmup_fraction, min_lr_ratio)
    schedule: Schedule = variant(SCHEDULES, "cosine")
    grad_clip_norm: float = bounded(1.0, 0.0)  # 0 = off


@dataclasses.dataclass
class FTTrainConfig:
    steps: int = bounded(0, 0)  # optimizer steps; 0 = epochs over the training set
    epochs: float = bounded(1.0, 0.0)
    micro_batch_size: int = bounded(2, 1)
    grad_accum_steps: int = bounded(8, 1)
    seed: int = 0
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    log_every_steps: int = bounded(10, 1)  # also a line at least every LOG_EVERY_SECONDS
    save: bool = True  # save the final model (plain HF format) in the run directory
    # Create AdamW state for every parameter before the first step, so peak memory is the steady
    # state (after every layer has trained once) rather than a short run's.
    preallocate_optimizer_state: bool = False
    # under torchrun (tracks/finetune_dist.py): "ddp" (a replica per process, gradients all-reduced)
    # or "fsdp" (FSDP2: parameters, gradients and AdamW state sharded); one process: plain
    parallel: str = choice("ddp", finetune_dist.PARALLEL)
    runs_root: str = "runs"


@dataclasses.dataclass
class FTEvalConfig:
    # answer-scored tasks evaluated after training on their test split ([] = none)
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["gsm_symbolic"], metadata={"choices": TASKS})
    examples: int = bounded(200, 1)  # per task (the first N of the test split)
    before: bool = False  # also evaluate the model before training
    max_new_tokens: int = bounded(256, 1)
    batch_size: int = bounded(64, 1)
    engine: str = choice("static", ("static", "loop", "hf"))
    compile: bool = True  # static engine on CUDA: compile the decode step (CUDA graphs)
    # held-out loss of the full model (and of the network that trains, for chaos) before training,
    # at each block end and at the end, on this many validation examples of data.task (0 = off)
    heldout_examples: int = bounded(64, 0)

    def check(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"eval.tasks = {self.tasks} names a task twice")
        for name in self.tasks:
            check_scored(name, "test", "eval.tasks")


@dataclasses.dataclass
class FinetuneConfig:
    name: str = "finetune"
    method: MethodConfig = variant(METHODS, "full")  # full | lisa | chaos, with its settings
    model: FTModelConfig = nested(FTModelConfig)
    data: FTDataConfig = nested(FTDataConfig)
    optim: FTOptimConfig = nested(FTOptimConfig)
    train: FTTrainConfig = nested(FTTrainConfig)
    eval: FTEvalConfig = nested(FTEvalConfig)

    def check(self) -> None:
        check_run_name(self.name)
        self.method.check_with(self.train)
        if self.train.parallel == "fsdp" and METHODS.name_of(self.method) == "chaos":
            raise ConfigError("method = chaos with train.parallel = fsdp: chaos hoists and slices layers every block, "
                              "which FSDP's per-layer sharded units cannot follow; use train.parallel = ddp")
        if self.train.steps == 0 and self.train.epochs == 0:
            raise ConfigError("train.steps and train.epochs are both 0; set one of them")


@dataclasses.dataclass(kw_only=True)
class FinetuneSummary(Summary):
    method: str
    steps: int
    first_loss: float
    final_loss: float  # mean of the last losses (a fifth of the run, at most 10 steps)
    training_seconds: float
    median_ms_per_step: float
    mean_ms_per_step: float
    peak_memory_bytes: int | None  # CUDA only, while training
    eval: dict[str, dict[str, Any]]  # task -> evaluate_task's result after training
    eval_before: dict[str, dict[str, Any]]  # the same before training (eval.before)
    heldout_loss_before: float | None = None  # held-out loss of the model before training
    heldout_loss: float | None = None  # ... of the full (restored) model after training
    heldout_loss_trained_net: float | None = None  # ... of the last block's hoisted / masked network


def lr_at(cfg: FTOptimConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` of `total`: the schedule at the middle of the
    step, so a warmup does not start at 0 and a cosine to 0 does not end at 0."""
    return cfg.lr * cfg.schedule((step + 0.5) / total)


LOG_EVERY_SECONDS = 10.0  # a progress line at least this often (and on each of the first steps)
LOGGED_FIRST_STEPS = 3


@dataclasses.dataclass
class Stage:
    """Where a run is, for the message when it is interrupted."""

    step: int = 0
    what: str = "training"
    saved: str | None = None  # the saved model folder


def run(cfg: FinetuneConfig, model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None) -> FinetuneSummary:
    """Fine-tune per `cfg`. A caller may pass an already loaded (model, tokenizer), e.g. to run
    several seeds on one model object whose weights it resets between runs."""
    cfglib.validate(cfg)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda, but this machine has no CUDA device; use auto or cpu")
    started_group = not torch.distributed.is_initialized()
    env = dist.setup(cfg.train.device)  # one process, or each of torchrun's (tracks/finetune_dist.py)
    try:
        return _run(cfg, env, model, tokenizer)
    finally:
        if started_group:
            dist.teardown()


def _run(cfg: FinetuneConfig, env: dist.Env, model: PreTrainedModel | None,
         tokenizer: PreTrainedTokenizerBase | None) -> FinetuneSummary:
    device = env.device
    torch.manual_seed(cfg.train.seed)
    check_runs_root(cfg.train.runs_root, "train.runs_root")
    finetune_dist.check(cfg, env, pretrained=tokenizer is not None if model is not None else not cfg.model.architecture)
    with dist.main_first(env):  # rank 0 fills the caches (converted model, generated task data)
        inputs = check_inputs(cfg, device, model, tokenizer)
    par = finetune_dist.Parallel(cfg, env, inputs.model)  # FSDP shards here, before the method and AdamW
    controller = cfg.method.controller(inputs.model)  # checks the method against the model (its layers)
    pad_id = inputs.tokenizer.pad_token_id if inputs.tokenizer is not None else 0
    heldout, note = finetune_heldout.build(cfg, inputs.tokenizer, inputs.model.config.vocab_size, device, pad_id)
    if note:
        dist.print0(note)
        inputs.notes.append(note)
    run_dir = RunDir.start(cfg.train.runs_root, cfg.name, env)
    run_dir.save_config(cfg)
    if run_dir.writer:
        with open(run_dir.file("train.log"), "a") as log:  # already printed
            log.writelines(line + "\n" for line in inputs.notes)
    stage = Stage()
    try:
        return train_and_evaluate(cfg, par, inputs, controller, run_dir, stage, heldout)
    except KeyboardInterrupt:
        run_dir.log(progress.interrupted(cfg, run_dir, stage))
        raise
    except torch.cuda.OutOfMemoryError:
        fix = ("lower eval.batch_size" if stage.what.startswith("evaluating") else
               "lower train.micro_batch_size (raise train.grad_accum_steps to keep the batch) or data.max_length, "
               "or set model.gradient_checkpointing=true (or train.parallel=fsdp on several GPUs)")
        error = TrainingError(f"out of GPU memory while {stage.what} (step {stage.step}): {fix}")
        progress.note_failure(run_dir, error)
        raise error from None
    except UnderparError as error:
        progress.note_failure(run_dir, error)
        raise


def train_and_evaluate(cfg: FinetuneConfig, par: finetune_dist.Parallel, inputs: Inputs, controller: Controller,
                       run_dir: RunDir, stage: Stage, heldout: finetune_heldout.HeldOut | None = None
                       ) -> FinetuneSummary:
    model, tokenizer, encoded = inputs.model, inputs.tokenizer, inputs.encoded
    device, main = par.env.device, par.env.is_main
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    per_step = cfg.train.grad_accum_steps * cfg.train.micro_batch_size
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(encoded) / per_step))
    decode = DecodeConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                          engine=cfg.eval.engine, compile=cfg.eval.compile)
    eval_sets = {name: get_task(name) for name in inputs.eval_examples}
    results_before = {}
    if cfg.eval.before:
        stage.what = "evaluating before training"
        for name, t in eval_sets.items():
            results_before[name] = evaluate_task(model, tokenizer, t, inputs.eval_examples[name], decode,
                                                 label=f"before: {name}")
            run_dir.log(f"before: {name} accuracy {results_before[name]['accuracy']['mean']:.3f}")

    # ---- method, optimizer ----------------------------------------------------------------
    model.train()
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        # transformers >= 5.2x renames it (the old name warns); older 5.x has only the old one
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    method = METHODS.name_of(cfg.method)
    optimizer = torch.optim.AdamW(
        list(model.parameters()), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda",
    )
    if cfg.train.preallocate_optimizer_state:
        progress.preallocate_adamw_state(optimizer)
    run_dir.log(f"{method} fine-tuning of {cfg.model.architecture or cfg.model.name}: {hf.num_parameters(model):,} "
                f"parameters, {steps} step{'s' * (steps != 1)} of {per_step} sequences on {device}"
                + (f" x {par.env.world_size} ({par.kind})" if par.env.distributed else ""))

    # ---- the loop ---------------------------------------------------------------------------
    stage.what = "training"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    micro_batches = par.micro_batches(batches(encoded, cfg, pad_id, steps))  # this rank's share
    size = cfg.train.micro_batch_size  # what a method may calibrate on: the first training rows
    controller.use_calibration([collate(encoded[i : i + size], pad_id) for i in range(0, min(len(encoded), 8 * size), size)])
    step_ms, layouts, heldout_rows, losses = [], [], [], []
    if heldout is not None:  # the base model (measuring is never training time)
        heldout_rows.append(dict(step=0, **heldout.measure(controller, trained=False)))
        run_dir.metric(**heldout_rows[-1])
        run_dir.log(f"before training: {finetune_heldout.describe(heldout_rows[-1])}")
    loss_name = "loss of the sub-network" if controller.trains_a_different_network else "loss"
    started = last_line = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        layout = controller.begin(step, optimizer)  # a new block's layout, or None
        if step == 0 or layout is not None:
            par.begin_block(layout, controller)  # ranks agree on what trains; DDP wraps exactly that
        at_start = {}
        if layout is not None:
            layouts.append(layout)
            if heldout is not None:  # the loss jump a new layout makes, before it trains
                at_start, spent = heldout.at_block_start(controller)
                t0, started = t0 + spent, started + spent
        lr = lr_at(cfg.optim, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss = 0.0
        for micro in range(par.accum):  # grad_accum_steps / world size micro-batches on each rank
            batch = {k: v.to(device, non_blocking=True) for k, v in next(micro_batches).items()}
            if "position_ids" in batch:  # packed rows: block-diagonal causal attention
                batch["attention_mask"] = packed_attention_mask(batch["position_ids"], dtype=model.dtype)
            with par.sync(micro + 1 == par.accum):  # DDP all-reduces at the last one
                loss = par.forward(**batch, use_cache=False).loss / par.accum
                loss.backward()
            total_loss += loss.item()
            if micro + 1 < par.accum and time.perf_counter() - last_line >= LOG_EVERY_SECONDS:
                last_line = time.perf_counter()  # slow steps (a CPU): say the step is moving
                run_dir.log(f"step {step + 1}/{steps} | micro-batch {micro + 1}/{par.accum} | "
                            f"{last_line - t0:.0f} s into the step")
        total_loss = par.mean(total_loss)  # the global batch's loss, the same on every rank
        losses.append(total_loss)
        if not math.isfinite(total_loss):
            raise TrainingError(f"training loss became {total_loss} at step {step + 1}; try a lower optim.lr")
        if cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(controller.trainable_parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stage.step = step + 1
        now = time.perf_counter()
        step_ms.append(1000 * (now - t0))
        row = dict(step=step + 1, train_loss=total_loss, lr=lr, ms=round(step_ms[-1], 2), elapsed=round(now - started, 3))
        if layout is not None:
            row["block"] = layout
        if device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        row |= at_start
        if heldout is not None and (step + 1 == steps or controller.block_of(step + 1) != controller.block_of(step)):
            ends, spent = heldout.at_block_end(controller)  # the full model and the network that trains
            heldout_rows.append(row := row | ends)
            run_dir.log(f"step {step + 1}/{steps} | {finetune_heldout.describe(row)}")
            started, now = started + spent, time.perf_counter()  # measuring is not training time
        run_dir.metric(**row)
        if (step < LOGGED_FIRST_STEPS or (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == steps
                or now - last_line >= LOG_EVERY_SECONDS):
            last_line = now
            run_dir.log(f"step {step + 1}/{steps} | {loss_name} {total_loss:.4f} | lr {lr:.2e} | {step_ms[-1]:.0f} ms | "
                        f"{progress.pace(step + 1, steps, now - started)}")
    train_seconds = time.perf_counter() - started  # held-out measuring moved `started` on
    peak = par.max(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)  # training's, not eval's
    controller.end(optimizer)
    par.release()

    # ---- save the full model, evaluate it ------------------------------------------------------
    model.config.use_cache = True
    saving = cfg.train.save and tokenizer is not None
    full = par.full_state_dict() if saving else None  # FSDP: the whole model gathered on rank 0 (all take part)
    if saving and main:
        model.save_pretrained(run_dir.file("model"), **({} if full is None else {"state_dict": full}))
        tokenizer.save_pretrained(run_dir.file("model"))
        stage.saved = str(run_dir.file("model"))
        run_dir.log(f"saved the fine-tuned model in {stage.saved}")
    stage.what = "evaluating after training"
    results = {}
    if full is not None and eval_sets and main:  # FSDP: rank 0 evaluates the saved whole model
        model = hf.load_model(stage.saved, device=device, dtype=model.dtype)[0]
    for name, t in eval_sets.items() if main else ():  # rank 0 only; the other ranks are done
        results[name] = evaluate_task(model, tokenizer, t, inputs.eval_examples[name], decode, label=f"eval {name}")
        acc = results[name]["accuracy"]
        run_dir.log(f"{name}: accuracy {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] on {results[name]['n']} examples")

    summary = FinetuneSummary(
        name=cfg.name,
        run_dir=str(run_dir.path),
        method=method,
        steps=steps,
        first_loss=losses[0],
        final_loss=statistics.mean(losses[-max(1, min(10, len(losses) // 5)):]),
        training_seconds=round(train_seconds, 3),
        median_ms_per_step=statistics.median(step_ms),
        mean_ms_per_step=statistics.mean(step_ms),
        peak_memory_bytes=peak,
        eval=results,
        eval_before=results_before,
        **finetune_heldout.summary_fields(heldout_rows),
    )
    run_dir.save_summary(summary)
    if not main:
        return summary
    note = " (train loss of the hoisted/masked sub-network, not the saved model)" * controller.trains_a_different_network
    plots.loss_curve(run_dir.metrics(), run_dir.file("loss.png"), title=f"{cfg.name} ({method}){note}", x="step")
    if heldout_rows:
        plots.heldout_curve(run_dir.metrics(), run_dir.file("heldout_loss.png"), finetune_heldout.LABELS,
                            title=f"{cfg.name} ({method}): held-out loss")
    controller.report(layouts, run_dir)  # e.g. chaos_modes.png
    return summary
