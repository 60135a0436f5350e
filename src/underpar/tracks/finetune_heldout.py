"""Held-out loss during fine-tuning, like with like: the full model (restored: what is saved and
evaluated) and, for methods that train a different network (Deep Chaos: hoisted or masked),
that network too, on the same held-out examples.

Training loss alone misleads for Deep Chaos: it is the loss of the hoisted or masked
sub-network, which is not the model that is kept. The held-out examples are the training
task's "validation" split (generated tasks keep it disjoint from "train" by construction), or
random token rows with another seed for a random-init architecture; a task without a
validation split gets no held-out loss (said once, in the log).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from underpar.data.sft import IGNORE_INDEX, collate, encode_sft_examples
from underpar.data.tasks import get_task
from underpar.errors import DataError

if TYPE_CHECKING:
    from underpar.tracks.finetune import FinetuneConfig
    from underpar.tracks.finetune_methods import Controller

FULL = "heldout_loss"  # the full, restored model
TRAINED = "heldout_loss_trained_net"  # the hoisted / masked network that trains (a different network)
TRAINED_AT_START = "heldout_loss_trained_net_block_start"  # the same, right after the block is applied
LABELS = {
    FULL: "full model (restored; saved and evaluated)",
    TRAINED: "network that trains (hoisted/masked sub-network; a different network)",
    TRAINED_AT_START: "network that trains, at its block's start (a different network)",
}


RANDOM_ROWS = 4  # held-out rows of a random-init architecture (random tokens: nothing to learn)


@dataclasses.dataclass
class HeldOut:
    """Collated held-out batches; `loss(model)` is their token-weighted mean loss (nats)."""

    batches: list[dict[str, torch.Tensor]]
    device: torch.device
    seconds: float = 0.0  # spent measuring, excluded from the training time

    @property
    def tokens(self) -> int:
        return sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in self.batches)

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for batch in self.batches:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # the model shifts labels by one
            if n:
                total += float(model(**batch, use_cache=False).loss) * n
                count += n
        return total / max(count, 1)

    def measure(self, controller: Controller, *, full: bool = True, trained: bool = True,
                trained_key: str = TRAINED) -> dict[str, float]:
        """The full model's held-out loss (inside `controller.restored()`, eval mode) and, when
        the controller trains a different network, that network's (in training mode, as it
        trains: published mask hooks act in training mode only), under their own keys."""
        started = time.perf_counter()
        model, out = controller.model, {}
        was_training = model.training
        if full:
            with controller.restored():
                model.eval()
                out[FULL] = self.loss(model)
        if trained and controller.trains_a_different_network:
            model.train()
            out[trained_key] = self.loss(model)
        model.train(was_training)
        self.seconds += time.perf_counter() - started
        return out

    def at_block_start(self, controller: Controller) -> tuple[dict[str, float], float]:
        """(the network that trains, right after its block is applied; {} when it is the full
        model), and the seconds it took."""
        spent = self.seconds
        out = self.measure(controller, full=False, trained_key=TRAINED_AT_START)
        return out, self.seconds - spent

    def at_block_end(self, controller: Controller) -> tuple[dict[str, float], float]:
        """(both networks' losses at a block's end, the seconds it took)."""
        spent = self.seconds
        out = self.measure(controller)
        return out, self.seconds - spent


def build(cfg: FinetuneConfig, tokenizer: Any, vocab_size: int, device: torch.device,
          pad_id: int) -> tuple[HeldOut | None, str]:
    """The held-out set of `cfg` (`eval.heldout_examples`, 0 = none) and a line for the log."""
    n = cfg.eval.heldout_examples
    if n == 0:
        return None, ""
    if tokenizer is None:  # random-init speed runs: a few random rows (it only shows the networks differ)
        n = min(n, RANDOM_ROWS)
        generator = torch.Generator().manual_seed(cfg.data.seed + 1_000_003)
        ids = torch.randint(0, vocab_size, (n, cfg.data.max_length), generator=generator).tolist()
        rows = [{"input_ids": r, "labels": r} for r in ids]
        where = f"{n} random token rows"
    else:
        task = get_task(cfg.data.task)
        if "validation" not in task.splits:
            return None, (f"no held-out loss: task {task.name} has no validation split "
                          "(eval.heldout_examples applies to tasks with one)")
        folder = Path(cfg.data.path).expanduser() if cfg.data.path else None
        if folder is not None and not any((folder / f"validation{ext}").is_file() for ext in (".jsonl", ".json")):
            return None, (f"no held-out loss: data.path {cfg.data.path} has no validation.jsonl beside its "
                          "training data (a single file serves every split: it would not be held out)")
        examples = task.load("validation", limit=n, seed=cfg.data.seed, path=cfg.data.path or None)
        rows, _ = encode_sft_examples(tokenizer, examples, task, cfg.data.max_length)
        if not rows:
            raise DataError(f"task {task.name}: no validation example fits data.max_length = "
                            f"{cfg.data.max_length}; raise it or set eval.heldout_examples=0")
        where = f"{len(rows)} validation examples of {task.name}"
    size = cfg.train.micro_batch_size
    heldout = HeldOut([collate(rows[i : i + size], pad_id) for i in range(0, len(rows), size)], device)
    return heldout, f"held-out loss on {where} ({heldout.tokens:,} target tokens)"


def summary_fields(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The summary's held-out losses from the held-out rows (before training first, end last)."""
    return {"heldout_loss_before": rows[0][FULL] if rows else None,
            "heldout_loss": rows[-1][FULL] if rows else None,
            "heldout_loss_trained_net": rows[-1].get(TRAINED) if rows else None}


def describe(values: dict[str, float]) -> str:
    """'held-out loss: full model ... 1.234 | network that trains (...) 5.678' for the log."""
    return "held-out loss: " + " | ".join(f"{LABELS[k]} {v:.4f}" for k, v in values.items() if k in LABELS)
