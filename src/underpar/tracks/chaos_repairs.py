"""Opt-in repairs of Deep Chaos beyond its source (off by default; the defaults stay faithful).

Mean stubs (`method.stub = "mean"`): the published stub for a removed run of layers is
`x + b` with `b ~ N(0, 0.01^2)`, tiny against what the removed layers add to the residual
stream. A mean stub instead adds the run's measured mean contribution, `E[h_out - h_in]` over
the tokens of a few training micro-batches, computed on the full model at the start of each
block (so it follows the weights as they train). Its token-dependent part is still lost.
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
def mean_contributions(model: nn.Module, runs: list[tuple[int, int]], batches: list[dict[str, Any]]
                       ) -> dict[int, torch.Tensor]:
    """{first layer of a run: mean over real tokens of (output of its last layer - input of its
    first)} on the full model (call it restored). Float32 means, cast to the weights' dtype."""
    if not runs:
        return {}
    layers = surgery.original_layers(model)
    wanted = {i for run in runs for i in run}
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def capture(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[index] = hidden
            outputs[index] = output[0] if isinstance(output, tuple) else output
        return capture

    handles = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in sorted(wanted)]
    ref = layers[0].input_layernorm.weight
    sums = {first: torch.zeros(ref.numel(), dtype=torch.float32, device=ref.device) for first, _ in runs}
    count = 0
    try:
        for batch in batches:
            batch = {k: v.to(ref.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model(**batch, use_cache=False)
            real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            count += int(real.sum())
            for first, last in runs:
                delta = (outputs[last] - inputs[first]).float()
                sums[first] += delta[real].sum(0)
    finally:
        for handle in handles:
            handle.remove()
    return {first: (total / max(count, 1)).to(ref.dtype) for first, total in sums.items()}
