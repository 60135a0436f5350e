"""The inputs of a fine-tuning run, checked before its run directory exists (so a bad one leaves
nothing behind): the task's training and evaluation examples, the model and tokenizer, the
encoded SFT rows; and the micro-batches the training loop draws from them."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from underpar import dist
from underpar.data.sft import collate, encode_sft_examples, pack
from underpar.data.tasks import Example, get_task
from underpar.errors import DataError
from underpar.model import hf

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from underpar.tracks.finetune import FinetuneConfig, FTModelConfig


CPU_PARAMETERS_WARNING = 1e9  # a random-init architecture larger than this on a CPU gets a warning


@dataclasses.dataclass
class Inputs:
    """What a run needs, checked before its run directory exists."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None: a random-init architecture, random tokens
    encoded: list[dict]  # SFT rows (input_ids, labels)
    eval_examples: dict[str, list[Example]]  # task -> the first eval.examples of its test split
    notes: list[str]  # the lines said while checking them; they open train.log


def check_inputs(cfg: FinetuneConfig, device: torch.device, model: PreTrainedModel | None,
                 tokenizer: PreTrainedTokenizerBase | None) -> Inputs:
    """Everything that can be wrong with the inputs shows here, fastest checks first: the model
    name, the task data (train and eval), the model load, its chat template, the encoding."""
    notes: list[str] = []

    def say(line: str) -> None:
        dist.print0(line)  # rank 0's (torchrun)
        notes.append(line)

    pretrained = tokenizer is not None if model is not None else not cfg.model.architecture
    model_name = cfg.model.architecture or cfg.model.name
    task = get_task(cfg.data.task)
    examples, eval_examples = [], {}
    if pretrained:
        if model is None:
            hf.check_model_name(cfg.model.name)
        examples = task.load("train", limit=cfg.data.train_examples, seed=cfg.data.seed, path=cfg.data.path or None)
        if not examples:
            raise DataError(f"{cfg.data.path or f'task {task.name}'} has no training examples")
        for name in cfg.eval.tasks:
            eval_examples[name] = get_task(name).load("test", limit=cfg.eval.examples, seed=cfg.data.seed)
            if not eval_examples[name]:
                raise DataError(f"task {name} has no test examples to evaluate")
    else:
        say(f"{model_name} has random weights and no tokenizer: it trains on random tokens, and data.task and "
            "eval.tasks are not used")
    if model is None and cfg.model.architecture and device.type == "cpu":
        size = hf.num_parameters(hf.random_model(cfg.model.architecture, device="meta", **depth(cfg.model)))  # shapes only
        if size > CPU_PARAMETERS_WARNING:
            say(f"warning: {model_name} has {size:,} parameters; on a CPU that is ~{16 * size / 1e9:.0f} GB of "
                "float32 weights, gradients and AdamW state and minutes per step (it is a GPU job)")
    if model is None:
        say(f"loading {model_name} ..." if pretrained else f"building {model_name} with random weights ...")
        started = time.perf_counter()
        model, tokenizer = load(cfg.model, device, cfg.train.seed)
        say(f"{'loaded' if pretrained else 'built'} {model_name} in {time.perf_counter() - started:.1f} s")
    if not pretrained:
        hf.check_positions(model, model_name, **{"data.max_length": cfg.data.max_length})
        return Inputs(model, None, random_tokens(cfg, model.config.vocab_size), {}, notes)
    hf.require_chat_template(tokenizer, model_name)
    hf.check_positions(model, model_name, **{"data.max_length": cfg.data.max_length,
                                             "eval.max_new_tokens": cfg.eval.max_new_tokens})
    encoded, dropped = encode_sft_examples(tokenizer, examples, task, cfg.data.max_length)
    if not encoded:
        raise DataError(f"no training example of task {task.name} fits data.max_length = {cfg.data.max_length} "
                        f"(all {len(examples)} prompts are longer); raise data.max_length")
    say(f"{len(encoded)} training examples of {task.name} ({dropped} dropped: prompt longer than max_length)")
    return Inputs(model, tokenizer, encoded, eval_examples, notes)


def depth(cfg: FTModelConfig) -> dict[str, int]:
    """The config override of a random-init architecture's depth (model.num_layers; none at 0)."""
    return {"num_hidden_layers": cfg.num_layers} if cfg.num_layers else {}


def load(cfg: FTModelConfig, device: torch.device, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer); a random-init architecture has no tokenizer."""
    dtype = None if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    if cfg.architecture:
        return hf.random_model(cfg.architecture, dtype=dtype, device=device, seed=seed, **depth(cfg)), None
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


def random_tokens(cfg: FinetuneConfig, vocab_size: int) -> list[dict]:
    """Speed runs on a random-init model: sequences of random tokens of exactly max_length."""
    generator = torch.Generator().manual_seed(cfg.data.seed)
    count = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * 4
    rows = torch.randint(0, vocab_size, (count, cfg.data.max_length), generator=generator).tolist()
    return [{"input_ids": r, "labels": r} for r in rows]
