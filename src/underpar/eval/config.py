"""Settings of the final evaluation of a trained GPT: the window length and stride of the
sliding-window score, and score-first test-time training (eval/ttt.py). Defaults are the
plain evaluation only; the records' settings are a `--set` away (eval.stride=64,
eval.ttt.enabled=true)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from underpar import config as cfglib
from underpar.config import bounded, choice, nested
from underpar.errors import ConfigError

TTT_OPTIMIZERS = ("sgd", "adam")
TTT_PARAMS = ("all", "lora")
TTT_LR_SCHEDULES = ("cosine", "constant")
TTT_SCOPES = ("stream", "document")


@dataclasses.dataclass
class TTTConfig:
    """Score-first test-time training (PR #461/#549's recipe by default): the validation
    stream in chunks; each chunk is scored under the current weights, then the model trains on
    it. `phases` > 0 switches to the later records' phased schedule (PR #1610/#1626): the
    first `phase_fraction` of the stream is scored in `phases` groups of chunks, after each
    group the model trains on everything scored so far, and the rest is scored with the
    adapted weights. `scope = "document"` is the records' per-document LoRA TTT (PR #1530
    onwards, eval/ttt_docs.py): each document gets fresh adapters, and is scored in chunks of
    `doc_chunk_tokens`, one optimizer step on each chunk after it is scored; context never
    crosses a document boundary."""

    enabled: bool = False
    scope: str = choice("stream", TTT_SCOPES)
    chunk_tokens: int = bounded(32_768, 1)
    # Chunk ends move back to the last document start (BOS) in the chunk's second half.
    respect_documents: bool = True
    bos_id: int = bounded(1, 0)
    optimizer: str = choice("sgd", TTT_OPTIMIZERS)
    lr: float = bounded(0.005, 0.0)
    momentum: float = bounded(0.9, 0.0, 0.999999)  # SGD momentum, or Adam's beta1
    weight_decay: float = bounded(0.0, 0.0)
    epochs: int = bounded(3, 0)  # passes over each chunk (0: scoring only, = sliding)
    lr_schedule: str = choice("cosine", TTT_LR_SCHEDULES)  # across the chunks of a pass
    grad_clip_norm: float = bounded(1.0, 0.0)  # 0: no clipping
    batch_seqs: int = bounded(32, 1)  # training sequences of eval.seq_len per step (all ranks)
    params: str = choice("all", TTT_PARAMS)  # every weight, or LoRA adapters on the blocks' linears
    lora_rank: int = bounded(80, 1)
    phases: int = bounded(0, 0)  # 0: train after every chunk
    phase_fraction: float = bounded(0.04, 0.0, 1.0)
    doc_chunk_tokens: int = bounded(48, 1)  # scope = document: targets scored per step
    doc_batch: int = bounded(64, 1)  # scope = document: documents adapted side by side (per rank)

    def check(self) -> None:
        if self.scope == "document" and (self.params != "lora" or self.phases):
            raise ConfigError(f"eval.ttt.scope = 'document' trains per-document LoRA adapters: it needs "
                              f"eval.ttt.params = 'lora' (got {self.params!r}) and eval.ttt.phases = 0 (got {self.phases})")


@dataclasses.dataclass
class EvalConfig:
    """The final evaluation after the round trip: plain val_bpb always; sliding windows when
    `stride` > 0; score-first TTT when `ttt.enabled`."""

    seq_len: int = bounded(0, 0)  # window length; 0: train.seq_len (longer needs model.attention.rope_scaling)
    stride: int = bounded(0, 0)  # 0: no sliding-window score; the records use 64
    batch_seqs: int = bounded(32, 1)  # windows scored together
    ttt: TTTConfig = nested(TTTConfig)

    def check(self) -> None:
        if self.seq_len and self.stride > self.seq_len:
            raise ConfigError(f"eval.stride = {self.stride} must not exceed eval.seq_len = {self.seq_len}")

    def window(self, train_seq_len: int) -> int:
        """The evaluation window length for a model trained at `train_seq_len`."""
        return self.seq_len or train_seq_len

    def stride_for(self, train_seq_len: int) -> int:
        """The sliding stride (0: none), checked against the window."""
        window = self.window(train_seq_len)
        if self.stride > window:
            raise ConfigError(f"eval.stride = {self.stride} must not exceed the window eval.seq_len = {window}")
        return self.stride


@dataclasses.dataclass
class _Root:
    eval: EvalConfig = nested(EvalConfig)


def eval_config(assignments: Sequence[str], base: EvalConfig | None = None) -> EvalConfig:
    """An EvalConfig from `key=value` assignments (paths inside the section, e.g.
    "ttt.lr=0.002"), validated; errors name the field as eval.<key>."""
    root = _Root(base or EvalConfig())
    for assignment in assignments:
        root = cfglib.override(root, f"eval.{assignment}")
    cfglib.validate(root)
    return root.eval
