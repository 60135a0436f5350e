"""A model's parameters as one RandOpt perturbation space: the selected tensors in sorted-name
order, their global element offsets, a resident base copy, and switching to W0 + sum sigma R.

Flat layout (the default when every selected tensor has one dtype and device): the live
parameters become views of one contiguous buffer laid out at their global offsets, and the base
copy is one buffer of the same layout, so a switch is one fused kernel launch over all weights
(`perturb(base_flat, live_flat, terms, 0)`) and a restore is one copy. Per-element arithmetic
and indices are those of the per-tensor path, so both give the same bits (tested). The flat
layout stays on the model: a later space over the same model and selection reuses the buffer
instead of moving the parameters again (compiled decode graphs captured its addresses).
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from underpar.errors import ConfigError
from underpar.kernels.perturb import (
    Terms, _check_range, _launch, _prepare, perturb, resolve_backend, to_f32, triton,
)


def _flat_view(params: list[Tensor], numel: int) -> Tensor | None:
    """The one buffer that `params` already are views of, laid out back to back from offset 0
    in this order (a space built earlier on the same model), else None."""
    first = params[0]
    storage = first.untyped_storage()
    if storage.nbytes() != numel * first.element_size():
        return None
    offset = 0
    for p in params:
        if (p.untyped_storage().data_ptr() != storage.data_ptr() or p.dtype != first.dtype
                or not p.is_contiguous() or p.storage_offset() != offset):
            return None
        offset += p.numel()
    return first.new_empty(0).set_(storage, 0, (numel,))


class PerturbSpace:
    """The selected parameters of a model, their global offsets and a resident base copy.

    Memory: the base copy costs one extra copy of the selected parameters (1x model bytes, same
    dtype and device). `apply` rebuilds the live weights from it in one pass (one launch in the
    flat layout, one per tensor otherwise), so any seed is reachable from any other and there is
    no restore pass between seeds. Names sort as strings; a tensor under several names (tied
    weights) counts once, under its first selected name, so a module and its named-parameter
    dict give the same stream. `flat=False` keeps each tensor's own storage (the old path).
    """

    def __init__(self, params: Mapping[str, Tensor] | nn.Module,
                 include: Iterable[str] = ("*",), exclude: Iterable[str] = (), flat: bool = True):
        named = (dict(params.named_parameters(remove_duplicate=False))
                 if isinstance(params, nn.Module) else dict(params))
        include, exclude = list(include), list(exclude)
        self.names: list[str] = []
        self.params: list[Tensor] = []
        for name in sorted(named):
            if (any(fnmatch.fnmatchcase(name, p) for p in include)
                    and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
                    and all(named[name] is not q for q in self.params)):  # tied: once
                self.names.append(name)
                self.params.append(named[name])
        if not self.names:
            raise ConfigError(f"perturbation include={include} exclude={exclude} selects none of "
                              f"the {len(named)} parameters; check the glob patterns")
        sizes = [p.numel() for p in self.params]
        self.offsets: dict[str, int] = dict(zip(self.names, itertools.accumulate(sizes, initial=0)))
        self.numel = sum(sizes)
        _check_range(0, self.numel)
        one_kind = len({(p.dtype, p.device) for p in self.params}) == 1
        self.flat = flat and one_kind
        self.master: Tensor | None = None  # fp32 base for ES updates, made by the first one
        self.live_flat: Tensor | None = None
        self.base_flat: Tensor | None = None
        with torch.no_grad():
            if self.flat:
                self._flatten(params)
                self.bases = [self.base_flat[o:o + n].view(p.shape)
                              for o, n, p in zip(self.offsets.values(), sizes, self.params)]
            else:
                self.bases = [p.detach().clone(memory_format=torch.contiguous_format) for p in self.params]
        self._flat_bases = [b.view(-1) for b in self.bases]

    def _flatten(self, owner) -> None:
        """Live parameters -> views of one buffer at their global offsets; base -> its copy."""
        live = _flat_view([p.data for p in self.params], self.numel)
        if live is None:
            first = self.params[0]
            live = torch.empty(self.numel, dtype=first.dtype, device=first.device)
            for offset, p in zip(self.offsets.values(), self.params):
                view = live[offset:offset + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
            if isinstance(owner, nn.Module) and hasattr(owner, "_underpar_static_decoder"):
                del owner._underpar_static_decoder  # its graphs may hold the old addresses
        self.live_flat, self.base_flat = live, live.clone()

    @property
    def base_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bases)

    def apply(self, seed: int, sigma: float, backend: str = "auto") -> None:
        """Live weights <- base + sigma * R(seed), in place (param.data)."""
        self.apply_combination([(seed, sigma)], backend)

    def apply_combination(self, terms: Terms, backend: str = "auto") -> None:
        """Live weights <- base + sum(sigma_k * R(seed_k)) in one pass (merge diagnostics:
        average = both sigmas halved, sum = both in full)."""
        terms = [(int(s), to_f32(sig)) for s, sig in terms]
        if not terms:
            raise ValueError("apply_combination needs at least one (seed, sigma) term")
        if self.flat:
            perturb(self.base_flat, self.live_flat, terms, 0, backend)  # one launch for all weights
            return
        prepared = _prepare(terms) if triton is not None and len(terms) <= 2 else None
        for name, p, base, flat in zip(self.names, self.params, self.bases, self._flat_bases):
            live = p.data
            start = self.offsets[name]
            if (prepared is not None and resolve_backend(backend, live, len(terms)) == "triton"
                    and live.is_cuda and live.is_contiguous() and live.device == base.device
                    and live.shape == base.shape):
                _launch(flat, live.view(-1), start, prepared)  # the hot path: checks done once
                continue
            target = live if live.is_contiguous() else torch.empty_like(base)
            perturb(base, target, terms, start, backend)
            if target is not live:
                live.copy_(target)

    def write(self, out_flat: Tensor, terms: Terms, backend: str = "auto") -> None:
        """out_flat <- base + sum(sigma_k * R(seed_k)) over the flat layout (no terms: the base),
        without touching the live weights: one row of a population's stacked weights."""
        if not self.flat:
            raise ValueError("write needs the flat layout (every selected tensor of one dtype and device)")
        if terms:
            perturb(self.base_flat, out_flat, [(int(s), to_f32(sig)) for s, sig in terms], 0, backend)
        else:
            out_flat.copy_(self.base_flat)

    def update_base(self, terms: Terms, backend: str = "auto") -> None:
        """An ES step: base <- base + sum(c_k * R(seed_k)), accumulated in an fp32 master copy
        (kept from the first update on, so updates far below a bf16 weight's spacing add up)
        and rounded once into the base; the live weights become the new base. Never
        materializes noise: each term is one pass of the fused kernel over the flat layout
        (the torch path: one chunked pass for all terms; the sums are the same fp32 additions
        in the same order, so both give the same bits)."""
        if not self.flat:
            raise ValueError("update_base needs the flat layout (every selected tensor of one dtype and device)")
        terms = [(int(s), to_f32(c)) for s, c in terms]
        with torch.no_grad():
            if self.master is None:
                self.master = self.base_flat.float()  # a copy, also when the base is fp32
            if resolve_backend(backend, self.master, 2) == "triton":
                for k in range(0, len(terms), 2):
                    perturb(self.master, self.master, terms[k:k + 2], 0, "triton")  # in place, elementwise
            elif terms:
                perturb(self.master, self.master, terms, 0, "torch")
            self.base_flat.copy_(self.master)
            self.live_flat.copy_(self.base_flat)

    def restore(self) -> None:
        """Live weights <- base, exactly."""
        with torch.no_grad():
            if self.flat:
                self.live_flat.copy_(self.base_flat)
                return
            for p, base in zip(self.params, self.bases):
                p.data.copy_(base)
