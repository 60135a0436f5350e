"""Deep Chaos Scheduler: full fine-tuning of a different random sub-network every sticky block.

Every `sticky_interval` optimizer steps a seeded scheduler keeps the sacred layers and picks
30-70% of the other ("victim") layers as active; each active victim draws a mode (both /
attention only / MLP only / identity); the rest are "dead". The controller applies the plan to
a Hugging Face Llama/Qwen2 model either by hoisting (rebuilding `model.model.layers` without
the dead layers, so they cost no compute) or by masking (forward hooks that zero heads,
channels and whole layers). Model surgery lives in `underpar.model.surgery`.

Semantics, following the team's published code (JuiceB0xC0de/lucky-pick-scheduler,
`deep_chaos.py`) unless a field says otherwise:
- identity: an active victim that runs its natural, unmasked forward; the published code
  touches no `requires_grad`, so it also trains, like "both" (`train_identity=True`). The
  write-up instead "yanks dead and identity layers out": `hoist_identity=True` treats identity
  like dead (removed when hoisting, zeroed when masking).
- dead: hoist -> removed from the list, a frozen `x + b` stub at the start of each removed run;
  mask -> the layer's outputs are zeroed, so it runs as x -> x (no stub). Frozen here in both
  by default; `masked_params="zero_grad"` is the published mask behaviour (nothing frozen: masked
  parameters get zero gradients, which AdamW momentum and weight decay still act on).
- attn / mlp: hoist -> the other half is skipped (`AttentionOnly` / `MlpOnly`); mask -> the
  other half's output is zeroed. The skipped half (and its norm) is frozen.
- embeddings, final norm, lm_head: the published code never freezes them, so they train
  (`train_embeddings=True`).
- masks (strategy "mask"; "slice" hoists and runs the same kept units as smaller matmuls,
  model/sliced.py; "hoist" runs active layers at full width, as published):
  projection outputs are multiplied by 0/1 masks in forward hooks, which zeroes both the
  contribution and the gradient of the masked rows. MLP channels are kept in two stages (a
  U(0.3, 0.7) share of the groups, then a U(0.35, 0.8) share of those), and the hooks act in
  training mode only, both as published (`mask_in_eval=True`: in eval mode too); either way
  evaluate the full model inside `controller.restored()`.
- active victims per block: underpar's bounds stay inside the configured fractions
  (`active_count="strict"`); `"round"` is the published rounding (see the field).
- slice forms (`slice_form`): "gather" gathers the kept rows / columns from the full weights in
  every forward and backward (zero gradients elsewhere: AdamW momentum and weight decay still
  move entries that are not kept); "pack" copies them once per block into contiguous parameters
  that train instead (tracks/chaos_pack.py): entries that are not kept do not move at all, the
  kept entries' AdamW moments carry across blocks, and the values are written back before the
  full model is used (`restored()`, `end()`) and at each block's end.
- stubs are seeded by (seed, original index of the run's first layer), so a run that starts at
  the same layer gets the same stub in every block, as in the published code.

Registered as the fine-tuning method "chaos" (`--set method=chaos`, settings `method.*`); the
strategies are apply / undo pairs registered in `underpar.tracks.chaos_strategies`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from underpar.config import bounded, choice, items, validate
from underpar.errors import ConfigError
from underpar.model import surgery
from underpar.tracks import chaos_repairs
from underpar.tracks.chaos_pack import Packs
from underpar.tracks.chaos_scheduler import BlockPlan, ChaosScheduler, resolve_layers  # noqa: F401 (re-exported)
from underpar.tracks.chaos_strategies import CHAOS_STRATEGIES
from underpar.tracks.finetune_methods import METHODS, Controller, MethodConfig

if TYPE_CHECKING:
    from underpar.runs.rundir import RunDir


@METHODS.register("chaos")
@dataclasses.dataclass
class ChaosConfig(MethodConfig):
    sticky_interval: int = bounded(50, 1)  # optimizer steps per block (>= grad accumulation)
    sacred_layers: list[int] = items([0, 1, -2, -1])  # negative = from the end
    active_fraction_min: float = bounded(0.3, 0.0, 1.0)  # of the victims, per block
    active_fraction_max: float = bounded(0.7, 0.0, 1.0)
    force_on_after: int = bounded(10, 1)  # a victim off this many blocks in a row is forced on
    force_off_after: int = bounded(5, 1)  # on this many blocks in a row is forced off
    p_both: float = bounded(0.30, 0.0, 1.0)  # mode probabilities of an active victim
    p_attn: float = bounded(0.25, 0.0, 1.0)
    p_mlp: float = bounded(0.25, 0.0, 1.0)
    p_identity: float = bounded(0.20, 0.0, 1.0)
    strategy: str = choice("hoist", CHAOS_STRATEGIES)
    kv_heads_keep_min: float = bounded(0.3, 0.0, 1.0)  # mask, slice: fraction of KV heads kept
    kv_heads_keep_max: float = bounded(0.7, 0.0, 1.0)
    mlp_channels_keep_min: float = bounded(0.3, 0.0, 1.0)  # mask, slice: MLP channel groups kept
    mlp_channels_keep_max: float = bounded(0.7, 0.0, 1.0)
    # mask, slice: second stage (the published `mlp_gate_survival`): of those kept groups, this fraction
    # keeps running through gate/up/down; 1.0 and 1.0 = one stage
    mlp_core_keep_min: float = bounded(0.35, 0.0, 1.0)
    mlp_core_keep_max: float = bounded(0.80, 0.0, 1.0)
    mlp_group_size: int = bounded(128, 1)
    hidden_keep_min: float = bounded(0.6, 0.0, 1.0)  # mask, slice: o/down output groups kept
    hidden_keep_max: float = bounded(0.95, 0.0, 1.0)
    hidden_group_size: int = bounded(64, 1)
    hoist_identity: bool = False  # True: identity layers are skipped like dead ones (write-up)
    train_identity: bool = True  # identity layers that run also train (published code)
    train_embeddings: bool = True  # embeddings, final norm, lm_head
    stub_std: float = bounded(0.01, 0.0)
    # stubs of removed runs (hoist, slice): "random" x + N(0, stub_std^2) (published), or "mean":
    # x + the run's mean contribution measured on the full model at each block's start over
    # `calibration_batches` training micro-batches (an opt-in repair, tracks/chaos_repairs.py)
    # "mean_halves": also the skipped half of each attn / mlp layer
    stub: str = choice("random", ["random", "mean", "mean_halves"])
    calibration_batches: int = bounded(4, 1)
    seed: int = bounded(0, 0)
    optimizer_state: str = choice("keep", ["keep", "reset", "offload"])  # of params sitting out
    # slice: "gather" the kept rows / cols of the full weights in each forward and backward (zero
    # gradients for the rest, which AdamW momentum and weight decay still move), or "pack" them once
    # per block into contiguous parameters that train instead (no per-step gather / scatter; entries
    # not kept do not move; kept entries' AdamW moments are carried from and back to the full
    # parameters' state; optimizer_state="reset": a packed copy's moments last one block)
    slice_form: str = choice("gather", ["gather", "pack"])
    # mask: hooks act in training mode only (published), or in eval mode too (True)
    mask_in_eval: bool = False
    # mask: parameters of dead layers and disabled halves are frozen ("freeze": no gradient, AdamW
    # skips them), or keep training with the zero gradients the masks give them ("zero_grad",
    # published: AdamW momentum and weight decay still move them)
    masked_params: str = choice("freeze", ["freeze", "zero_grad"])
    # active victims per block: "strict" = uniform in [ceil(n*min), floor(n*max)], forced-on layers
    # capped at the maximum; "round" (published) = [max(1, round(n*min)), round(n*max)], every
    # forced-on layer on even past the maximum
    active_count: str = choice("strict", ["strict", "round"])

    def check(self) -> None:
        for name in ("active_fraction", "kv_heads_keep", "mlp_channels_keep", "mlp_core_keep", "hidden_keep"):
            lo, hi = getattr(self, f"{name}_min"), getattr(self, f"{name}_max")
            if lo > hi:
                raise ConfigError(f"method.{name}_min = {lo} is larger than method.{name}_max = {hi}")
        total = self.p_both + self.p_attn + self.p_mlp + self.p_identity
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"method.p_both + p_attn + p_mlp + p_identity = {total:g}; they must sum to 1")
        if self.masked_params != "freeze" and self.strategy != "mask":
            raise ConfigError(f"method.masked_params = {self.masked_params!r} applies to method.strategy = 'mask' "
                              f"only (strategy {self.strategy!r} takes what sits out out of the graph); "
                              "leave it at 'freeze'")
        if self.slice_form != "gather" and self.strategy != "slice":
            raise ConfigError(f"method.slice_form = {self.slice_form!r} applies to method.strategy = 'slice' only "
                              f"(strategy {self.strategy!r} slices no weights); leave it at 'gather' or set "
                              "method.strategy=slice")
        if self.stub != "random" and self.strategy == "mask":
            raise ConfigError(f"method.stub = {self.stub!r} applies to strategies that remove layers (hoist, slice); "
                              "strategy 'mask' runs dead layers as x -> x and has no stubs")

    def check_with(self, train: Any) -> None:
        if self.sticky_interval < train.grad_accum_steps:
            raise ConfigError(
                f"method.sticky_interval = {self.sticky_interval} must be >= "
                f"train.grad_accum_steps = {train.grad_accum_steps}"
            )

    def mode_probabilities(self) -> dict[str, float]:
        return {"both": self.p_both, "attn": self.p_attn, "mlp": self.p_mlp, "identity": self.p_identity}

    def controller(self, model: nn.Module) -> ChaosController:
        return ChaosController(model, self)


# ---------------------------------------------------------------------------------- controller


class ChaosController(Controller):
    """Applies the scheduler's plans to a Hugging Face causal LM.

    Loop: `ctl.begin(optimizer_step, optimizer)` before each optimizer step (it starts a new
    block, `ctl.plan`, when the step crosses a block boundary, never mid gradient
    accumulation), train, and `ctl.end(optimizer)` when done. Evaluate and save inside
    `with ctl.restored():` (or `save_pretrained_restored`): the full model, with its original
    layer list and config."""

    trains_a_different_network = True  # hoisted or masked: not the model that is saved

    def __init__(self, model: nn.Module, cfg: ChaosConfig):
        validate(cfg)
        if surgery.is_hoisted(model):
            raise ValueError("ChaosController needs the full model; this one is hoisted")
        super().__init__(model)
        self.cfg = cfg
        self.strategy = CHAOS_STRATEGIES[cfg.strategy]
        self.dims = surgery.layer_dims(model)
        self.scheduler = ChaosScheduler(self.dims.num_layers, cfg, dims=self.dims)
        self.plan: BlockPlan | None = None
        self.params = list(model.parameters())  # all of them: hoisted ones leave model.parameters()
        self._requires_grad = [(p, p.requires_grad) for p in self.params]
        self._offloaded: dict[torch.Tensor, torch.device] = {}
        self._host: dict[tuple[torch.Tensor, str], torch.Tensor] = {}  # optimizer_state="offload"
        self.packs = Packs()  # slice_form="pack": this block's packed copies
        self._optimizer: torch.optim.Optimizer | None = None  # where the packed copies train

    def block_of(self, step: int) -> int:
        return step // self.cfg.sticky_interval

    def begin(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list[str] | None:
        """Start the block of optimizer step `step` if it is not the current one (and sort out
        the optimizer state of what sits out); returns the new block's layer modes, or None
        when the block did not change."""
        block = self.block_of(step)
        if self.plan is not None and self.plan.block == block:
            return None
        plan = self.begin_block(block)
        if optimizer is not None:
            self.on_block_change(optimizer)
        return plan.modes

    def begin_block(self, block: int) -> BlockPlan:
        """Undo the previous block's changes, apply block `block`'s plan (structure and
        `requires_grad`), drop stale gradients of frozen parameters; returns the plan."""
        self._undo()
        self.plan = self.scheduler.plan(block)
        if self.cfg.stub != "random":  # the model is whole here: measure what each removed part adds
            if not self.calibration:
                raise ConfigError(f"method.stub = {self.cfg.stub!r} needs training batches to calibrate on; the "
                                  "controller got none (use_calibration)")
            runs = chaos_repairs.removed_runs(self.plan.modes, self.cfg.hoist_identity)
            halves = {i: m for i, m in enumerate(self.plan.modes) if m in ("attn", "mlp")}
            self.plan.stub_biases, self.plan.half_biases = chaos_repairs.mean_contributions(
                self.model, runs, self.calibration[: self.cfg.calibration_batches],
                halves if self.cfg.stub == "mean_halves" else {})
        self._apply()
        cfg, modes = self.cfg, self.plan.modes
        if cfg.masked_params == "zero_grad":  # published: what the masks zero still "trains"
            modes = ["both" if m in ("dead", "attn", "mlp") or (m == "identity" and cfg.hoist_identity) else m
                     for m in modes]
        surgery.set_trainable(self.model, modes, train_embeddings=cfg.train_embeddings,
                              train_identity=cfg.train_identity, skip_identity=cfg.hoist_identity)
        self.packs.freeze_sources()  # pack: the copies train, not the full weights behind them
        for p in self.params:
            if not p.requires_grad:
                p.grad = None
        return self.plan

    def _apply(self) -> None:
        self.strategy.apply(self.model, self.plan, self.cfg)
        if self.cfg.slice_form == "pack":
            self.packs.attach(self.model)

    def _undo(self, block_end: bool = True) -> None:
        """The full model; slice_form="pack": with the packed values written back, and at a
        block's end (`block_end`) the copies' optimizer state too, and the copies dropped."""
        self.packs.write_back()
        if block_end:
            self._drop_packs(self._optimizer)
        self.strategy.undo(self.model)

    def _drop_packs(self, optimizer: torch.optim.Optimizer | None) -> None:
        if optimizer is not None:
            self.packs.leave(optimizer, self.cfg.optimizer_state != "reset", self._new_state)
        self.packs, self._optimizer = Packs(), None

    def _new_state(self, p: torch.Tensor, key: str, like: torch.Tensor) -> torch.Tensor:
        """A zero state tensor `key` of full parameter `p` (for packed moments to land in):
        optimizer_state="offload" makes it on the host, as an offloaded one."""
        if self.cfg.optimizer_state == "offload":
            pin = torch.cuda.is_available() and p.device.type == "cuda"
            self._offloaded.setdefault(p, p.device)
            if (p, key) not in self._host:
                self._host[p, key] = torch.empty_like(p, dtype=like.dtype, device="cpu", pin_memory=pin)
            return self._host[p, key].zero_()
        return torch.zeros_like(p, dtype=like.dtype)

    @contextlib.contextmanager
    def restored(self) -> Iterator[nn.Module]:
        """The full model (original layers, config, no masks) inside the block; `requires_grad`
        is left as the block set it. The block's structure comes back on exit."""
        self._undo(block_end=False)
        try:
            yield self.model
        finally:
            if self.plan is not None:
                self._apply()

    def on_block_change(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW state of parameters that sit out this block: "keep" leaves it; "reset" drops it
        (they restart from zero moments when they return; frees memory meanwhile); "offload"
        moves the moment tensors to (pinned) CPU memory and brings them back on return.
        Call it right after `begin_block` (`begin(..., optimizer)` does). slice_form="pack": the
        packed copies join `optimizer` first, with their full parameters' state (chaos_pack)."""
        mode = self.cfg.optimizer_state
        if self.packs:
            self._optimizer = optimizer
            self.packs.join(optimizer)
        if mode == "keep":
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                if mode == "reset" and not p.requires_grad:
                    del optimizer.state[p]
                elif mode == "offload":
                    self._move_state(p, state, to_cpu=not p.requires_grad)

    def _move_state(self, p: torch.Tensor, state: dict, to_cpu: bool) -> None:
        if to_cpu == (p in self._offloaded):
            return
        pin = torch.cuda.is_available() and p.device.type == "cuda"
        for key, value in state.items():
            if not torch.is_tensor(value) or value.shape != p.shape:
                continue  # 'step' and other scalars stay where the optimizer keeps them
            if to_cpu:  # pinned host buffers are made once and reused (pinning is slow)
                if (p, key) not in self._host:
                    self._host[p, key] = torch.empty_like(value, device="cpu", pin_memory=pin)
                state[key] = self._host[p, key].copy_(value, non_blocking=pin)
            else:
                state[key] = value.to(self._offloaded[p], non_blocking=True)
        if to_cpu:
            self._offloaded[p] = p.device
        else:
            del self._offloaded[p]

    def end(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore the model (layers, config, masks, `requires_grad`) and any offloaded state
        (slice_form="pack": the packed values and their moments, written back)."""
        if optimizer is not None and self.packs:
            self._optimizer = optimizer
        self._undo()
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        if optimizer is not None:
            for p in list(self._offloaded):
                self._move_state(p, optimizer.state[p], to_cpu=False)
        self.plan = None

    def report(self, layouts: list[list[str]], run_dir: RunDir) -> None:
        """chaos_modes.png: which layer ran in which mode in each block."""
        if not layouts:
            return
        from underpar.runs import plots  # matplotlib only when a run reports

        plots.mode_heatmap(layouts, run_dir.file("chaos_modes.png"))


def save_pretrained_restored(controller: ChaosController, model: nn.Module, path: str | Path,
                             **kwargs: Any) -> None:
    """Save `model` in plain Hugging Face format from its restored full form (original layer
    keys, no stub buffers, original config), then re-apply the current block."""
    if model is not controller.model:
        raise ValueError("save_pretrained_restored: the model is not the one the controller edits")
    with controller.restored():
        model.save_pretrained(path, **kwargs)
