"""Opt-in repairs of Deep Chaos beyond its source (off by default; the defaults stay faithful).

Mean stubs (`method.stub = "mean"`): the published stub for a removed run of layers is
`x + b` with `b ~ N(0, 0.01^2)`, tiny against what the removed layers add to the residual
stream. A mean stub instead adds the run's measured mean contribution, `E[h_out - h_in]` over
the tokens of a few training micro-batches, computed on the full model at the start of each
block (so it follows the weights as they train). Its token-dependent part is still lost.
`method.stub = "mean_halves"` also replaces the skipped half of each attention-only / MLP-only
layer (a zero stub in the published code) with that half's mean output.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from underpar.model import surgery


def removed_runs(modes: Sequence[str], skip_identity: bool) -> list[tuple[int, int]]:
    """(first, last) original indices of each run of consecutive removed layers."""
    gone = surgery.removed_layers(modes, skip_identity)
    runs: list[tuple[int, int]] = []
    for i in gone:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


@torch.no_grad()
def mean_contributions(model: nn.Module, runs: list[tuple[int, int]], batches: list[dict[str, Any]],
                       halves: dict[int, str] | None = None
                       ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """On the full model (call it restored), means over real tokens of ({first layer of a run:
    output of its last layer - input of its first}, {layer in `halves`: the output of the half
    its mode skips -- the MLP of an "attn" layer, the attention of an "mlp" layer}). Float32
    sums, cast to the weights' dtype."""
    halves = halves or {}
    if not runs and not halves:
        return {}, {}
    layers = surgery.original_layers(model)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def hook(key: tuple[str, int]):
        def capture(module, args, kwargs, output):
            if key[0] == "in":
                seen[key] = args[0] if args else kwargs["hidden_states"]
            else:
                seen[key] = output[0] if isinstance(output, tuple) else output
        return capture

    handles = []
    for first, last in runs:
        handles.append(layers[first].register_forward_hook(hook(("in", first)), with_kwargs=True))
        handles.append(layers[last].register_forward_hook(hook(("out", last)), with_kwargs=True))
    for i, mode in halves.items():
        skipped = layers[i].mlp if mode == "attn" else layers[i].self_attn
        handles.append(skipped.register_forward_hook(hook(("half", i)), with_kwargs=True))
    ref = layers[0].input_layernorm.weight
    sums = {key: torch.zeros(ref.numel(), dtype=torch.float32, device=ref.device)
            for key in [("run", first) for first, _ in runs] + [("half", i) for i in halves]}
    count = 0
    try:
        for batch in batches:
            batch = {k: v.to(ref.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model(**batch, use_cache=False)
            real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            count += int(real.sum())
            for first, last in runs:
                sums["run", first] += (seen["out", last] - seen["in", first]).float()[real].sum(0)
            for i in halves:
                sums["half", i] += seen["half", i].float()[real].sum(0)
    finally:
        for handle in handles:
            handle.remove()
    means = {key: (total / max(count, 1)).to(ref.dtype) for key, total in sums.items()}
    return ({i: v for (kind, i), v in means.items() if kind == "run"},
            {i: v for (kind, i), v in means.items() if kind == "half"})
