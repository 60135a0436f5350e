"""The fine-tuning track: full fine-tuning, LISA, or the Deep Chaos Scheduler on a Hugging Face
causal LM, with an explicit loop (what trains, and what is in the graph, changes every block).

load model -> encode the task's SFT data -> method controller -> AdamW loop (the LR schedule of
progress, gradient accumulation, clipping) -> restore the full model -> evaluate -> save (HF
format). Methods (tracks/finetune_methods.py: full; lisa.py; chaos.py) are registered
controllers the loop drives the same way: `begin` a step (maybe a new block), `end`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, items, nested, variant
from underpar.data.sft import collate, encode_sft_examples, pack, packed_attention_mask
from underpar.data.tasks import get_task
from underpar.errors import ConfigError, DataError, TrainingError
from underpar.eval.accuracy import evaluate_task
from underpar.eval.generate import DecodeConfig
from underpar.model import hf
from underpar.optim.schedule import SCHEDULES, Schedule
from underpar.runs import plots
from underpar.runs.rundir import RunDir, Summary
from underpar.tracks import chaos, lisa  # noqa: F401  (register the methods "chaos" and "lisa")
from underpar.tracks.finetune_methods import METHODS, MethodConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclasses.dataclass
class FTModelConfig:
    name: str = "smollm2-135m"  # smollm2-135m, a local save_pretrained folder, or a hub id
    architecture: str = ""  # instead of name: random init of hf.ARCHITECTURES[...] (speed runs)
    dtype: str = choice("auto", ("auto", "bfloat16", "float32"))  # auto: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class FTDataConfig:
    task: str = "gsm_symbolic"
    path: str = ""  # local file/folder in the task's schema ("" = hub or generated)
    train_examples: int = bounded(1000, 1)
    max_length: int = bounded(1024, 8)
    packing: bool = False  # pack examples into rows of max_length, isolated by a 4-D mask
    seed: int = 0


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
    log_every_steps: int = bounded(10, 1)
    save: bool = True  # save the final model (plain HF format) in the run directory
    # Create AdamW state for every parameter before the first step, so peak memory is the steady
    # state (after every layer has trained once) rather than a short run's.
    preallocate_optimizer_state: bool = False
    runs_root: str = "runs"


@dataclasses.dataclass
class FTEvalConfig:
    tasks: list[str] = items(["gsm_symbolic"])  # evaluated after training ([] = none)
    examples: int = bounded(200, 0)  # per task (test split)
    before: bool = False  # also evaluate the model before training
    max_new_tokens: int = bounded(256, 1)
    batch_size: int = bounded(64, 1)
    engine: str = choice("static", ("static", "loop", "hf"))
    compile: bool = True  # static engine on CUDA: compile the decode step (CUDA graphs)


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
        self.method.check_with(self.train)
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
    peak_memory_bytes: int | None  # CUDA only
    eval: dict[str, dict[str, Any]]  # task -> evaluate_task's result after training
    eval_before: dict[str, dict[str, Any]]  # the same before training (eval.before)


def lr_at(cfg: FTOptimConfig, step: int, total: int) -> float:
    """The learning rate of optimizer step `step` of `total`: the schedule at the middle of the
    step, so a warmup does not start at 0 and a cosine to 0 does not end at 0."""
    return cfg.lr * cfg.schedule((step + 0.5) / total)


def load(cfg: FTModelConfig, device: torch.device, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer); a random-init architecture has no tokenizer."""
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if cfg.architecture:
        return hf.random_model(cfg.architecture, dtype=dtype, device=device, seed=seed), None
    return hf.load_model(cfg.name, device=device, dtype=dtype)


def batches(encoded: list[dict], cfg: FinetuneConfig, pad_id: int, steps: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches for `steps` optimizer steps: shuffled each epoch with the run's seed."""
    rows = pack(encoded, cfg.data.max_length, pad_id) if cfg.data.packing else encoded
    rng = random.Random(cfg.train.seed)
    order: list[int] = []
    needed = steps * cfg.train.grad_accum_steps * cfg.train.micro_batch_size
    while len(order) < needed:
        epoch = list(range(len(rows)))
        rng.shuffle(epoch)
        order += epoch
    size = cfg.train.micro_batch_size
    for start in range(0, needed, size):
        yield collate([rows[i] for i in order[start : start + size]], pad_id)


def run(cfg: FinetuneConfig, model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None) -> FinetuneSummary:
    """Fine-tune per `cfg`. A caller may pass an already loaded (model, tokenizer), e.g. to run
    several seeds on one model object whose weights it resets between runs."""
    cfglib.validate(cfg)
    device = dist.resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    run_dir = RunDir.create(cfg.train.runs_root, cfg.name)
    run_dir.save_config(cfg)

    # ---- model and data -------------------------------------------------------------------
    if model is None:
        model, tokenizer = load(cfg.model, device, cfg.train.seed)
    task = get_task(cfg.data.task)
    if tokenizer is None:  # random weights: speed and memory runs on random tokens, no evaluation
        encoded = _random_tokens(cfg, model.config.vocab_size)
    else:
        examples = task.load("train", limit=cfg.data.train_examples, seed=cfg.data.seed, path=cfg.data.path or None)
        encoded, dropped = encode_sft_examples(tokenizer, examples, task, cfg.data.max_length)
        if not encoded:
            raise DataError(f"no training example of task {task.name} fits data.max_length = {cfg.data.max_length}")
        run_dir.log(f"{len(encoded)} training examples of {task.name} ({dropped} dropped: prompt longer than max_length)")
    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    per_step = cfg.train.grad_accum_steps * cfg.train.micro_batch_size
    steps = cfg.train.steps or max(1, math.ceil(cfg.train.epochs * len(encoded) / per_step))

    decode = DecodeConfig(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                          engine=cfg.eval.engine, compile=cfg.eval.compile)
    eval_sets = {name: get_task(name) for name in cfg.eval.tasks} if tokenizer is not None else {}
    eval_examples = {name: t.load("test", limit=cfg.eval.examples, seed=cfg.data.seed) for name, t in eval_sets.items()}
    results_before = {}
    if cfg.eval.before:
        for name, t in eval_sets.items():
            results_before[name] = evaluate_task(model, tokenizer, t, eval_examples[name], decode)
            run_dir.log(f"before: {name} accuracy {results_before[name]['accuracy']['mean']:.3f}")

    # ---- method, optimizer ----------------------------------------------------------------
    model.train()
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    method = METHODS.name_of(cfg.method)
    controller = cfg.method.controller(model)
    optimizer = torch.optim.AdamW(
        list(model.parameters()), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda",
    )
    if cfg.train.preallocate_optimizer_state:
        _preallocate_adamw_state(optimizer)
    run_dir.log(f"{method} fine-tuning of {cfg.model.architecture or cfg.model.name}: {hf.num_parameters(model):,} "
                f"parameters, {steps} steps of {per_step} sequences on {device}")

    # ---- the loop ---------------------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    micro_batches = batches(encoded, cfg, pad_id, steps)
    step_ms, layouts = [], []
    started = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        layout = controller.begin(step, optimizer)  # a new block's layout, or None
        if layout is not None:
            layouts.append(layout)
        lr = lr_at(cfg.optim, step, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total_loss = 0.0
        for _ in range(cfg.train.grad_accum_steps):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(micro_batches).items()}
            if "position_ids" in batch:  # packed rows: block-diagonal causal attention
                batch["attention_mask"] = packed_attention_mask(batch["position_ids"], dtype=model.dtype)
            loss = model(**batch, use_cache=False).loss / cfg.train.grad_accum_steps
            loss.backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss):
            raise TrainingError(f"training loss became {total_loss} at step {step + 1}; try a lower optim.lr")
        if cfg.optim.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(controller.trainable_parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_ms.append(1000 * (time.perf_counter() - t0))
        row = dict(step=step + 1, train_loss=total_loss, lr=lr, ms=round(step_ms[-1], 2),
                   elapsed=round(time.perf_counter() - started, 3))
        if layout is not None:
            row["block"] = layout
        if device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        run_dir.metric(**row)
        if step == 0 or (step + 1) % cfg.train.log_every_steps == 0 or step + 1 == steps:
            run_dir.log(f"step {step + 1}/{steps} | loss {total_loss:.4f} | lr {lr:.2e} | {step_ms[-1]:.0f} ms")
    train_seconds = time.perf_counter() - started
    controller.end(optimizer)

    # ---- evaluate and save the full model ----------------------------------------------------
    model.config.use_cache = True
    results = {name: evaluate_task(model, tokenizer, t, eval_examples[name], decode) for name, t in eval_sets.items()}
    for name, result in results.items():
        acc = result["accuracy"]
        run_dir.log(f"{name}: accuracy {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] on {result['n']} examples")
    if cfg.train.save and not cfg.model.architecture:
        model.save_pretrained(run_dir.file("model"))
        tokenizer.save_pretrained(run_dir.file("model"))

    losses = [r["train_loss"] for r in run_dir.metrics()]
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
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        eval=results,
        eval_before=results_before,
    )
    run_dir.save_summary(summary)
    plots.loss_curve(run_dir.metrics(), run_dir.file("loss.png"), title=f"{cfg.name} ({method})", x="step")
    controller.report(layouts, run_dir)  # e.g. chaos_modes.png
    return summary


def _random_tokens(cfg: FinetuneConfig, vocab_size: int) -> list[dict]:
    """Speed runs on a random-init model: sequences of random tokens of exactly max_length."""
    generator = torch.Generator().manual_seed(cfg.data.seed)
    count = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 4
    rows = torch.randint(0, vocab_size, (count, cfg.data.max_length), generator=generator).tolist()
    return [{"input_ids": r, "labels": r} for r in rows]


def _preallocate_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """The state AdamW creates for a parameter on its first update (step, exp_avg, exp_avg_sq)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group.get("fused") else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
