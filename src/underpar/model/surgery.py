"""Structural edits of a Hugging Face Llama/Qwen2-style decoder for layer-wise training methods
(Deep Chaos, LISA): remove ("hoist") layers from the forward graph and put everything back
exactly, mask attention heads / MLP channels with forward hooks, and set `requires_grad` per
layer mode.

Modes (one per original layer): "sacred" and "both" run and train the whole layer; "attn"
runs and trains only attention (+ its input norm), "mlp" only the MLP (+ its norm);
"identity" runs the whole layer unchanged unless it is skipped like "dead"; "dead" layers
contribute nothing (hoist: removed from the list; mask: outputs zeroed).

Written against transformers 5.x (checked on 5.17 and 5.23), where the decoder loop is
`for i, layer in enumerate(self.layers[: config.num_hidden_layers])`, each layer returns a
tensor, Qwen2 picks the attention mask by `config.layer_types[i]` (position in the list), the KV
cache is indexed by each attention's `layer_idx`, and `output_hidden_states` is recorded by
forward hooks on decoder-layer instances that are installed once, lazily.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from underpar.errors import ConfigError
from underpar.model.sliced import SlicedLayer, kept_rows

try:  # gradient checkpointing support for the wrappers (transformers >= 4.52)
    from transformers.modeling_layers import GradientCheckpointingLayer as _LayerBase
except ImportError:  # pragma: no cover
    _LayerBase = nn.Module

MODES = ("sacred", "both", "attn", "mlp", "identity", "dead")
_HOISTED = "_underpar_hoisted"  # attribute on the decoder while hoisted
_MASKS = "_underpar_mask_handles"  # attribute on the decoder while masks are on


# ---------------------------------------------------------------------------------- structure


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that owns `layers` and `config` (`model.model` of a *ForCausalLM)."""
    for candidate in (getattr(model, "model", None), model):
        if isinstance(getattr(candidate, "layers", None), nn.ModuleList) and hasattr(candidate, "config"):
            return candidate
    raise ConfigError(
        f"{type(model).__name__} has no `model.layers` list of decoder blocks; layer-wise methods "
        "(chaos, LISA) support Llama/Qwen2-style causal LMs such as LlamaForCausalLM"
    )


def original_layers(model: nn.Module) -> nn.ModuleList:
    """The full list of decoder layers, also while the model is hoisted."""
    decoder = decoder_of(model)
    saved = decoder.__dict__.get(_HOISTED)
    return saved.layers if saved is not None else decoder.layers


def is_hoisted(model: nn.Module) -> bool:
    return _HOISTED in decoder_of(model).__dict__


@dataclasses.dataclass(frozen=True)
class LayerDims:
    """Shapes that mask plans need (identical across layers in Llama/Qwen2)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def layer_dims(model: nn.Module) -> LayerDims:
    layers = original_layers(model)
    attn, mlp = layers[0].self_attn, layers[0].mlp
    head_dim = int(attn.head_dim)
    return LayerDims(
        num_layers=len(layers),
        hidden_size=attn.o_proj.out_features,
        intermediate_size=mlp.up_proj.out_features,
        num_heads=attn.q_proj.out_features // head_dim,
        num_kv_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
    )


# ---------------------------------------------------------------------------------- stand-ins


class BiasStub(nn.Module):
    """Frozen `x + b` standing in for a removed run of layers, so the next surviving layer does
    not receive the previous survivor's output verbatim. `b ~ N(0, std^2)` is a non-persistent
    buffer: never trained, never in a state dict, rebuilt identically from its seed."""

    def __init__(self, hidden_size: int, std: float, seed: int, dtype: torch.dtype, device: torch.device,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if bias is None:  # `bias` given: a calibrated stub (Deep Chaos stub="mean")
            bias = torch.randn(hidden_size, generator=torch.Generator().manual_seed(seed)) * std
        self.register_buffer("bias", bias.to(dtype=dtype, device=device), persistent=False)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states + self.bias


def _share_checkpointing(wrapper: nn.Module, layer: nn.Module) -> None:
    wrapper.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False)
    if hasattr(layer, "_gradient_checkpointing_func"):
        wrapper._gradient_checkpointing_func = layer._gradient_checkpointing_func


class AttentionOnly(_LayerBase):
    """A decoder layer whose MLP is skipped: `x + attn(norm(x))` (`+ skipped`, a frozen bias for
    the skipped half, when given). Holds the layer's own attention and input norm (shared
    modules, no copies); same call signature as the layer."""

    def __init__(self, layer: nn.Module, skipped: torch.Tensor | None = None):
        super().__init__()
        self.input_layernorm = layer.input_layernorm
        self.self_attn = layer.self_attn
        self.register_buffer("skipped", skipped, persistent=False)
        _share_checkpointing(self, layer)

    def forward(self, hidden_states, **kwargs) -> torch.Tensor:
        # The decoder passes everything by keyword, and its names change across transformers
        # versions (5.17 `past_key_values`, 5.24 `cache`): pass them on as they came, as the
        # decoder layer itself does.
        out = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        out = hidden_states + (out[0] if isinstance(out, tuple) else out)
        return out if self.skipped is None else out + self.skipped


class MlpOnly(_LayerBase):
    """A decoder layer whose attention is skipped: `x + mlp(norm(x))`, with `x + skipped` for x
    when a bias for the skipped half is given."""

    def __init__(self, layer: nn.Module, skipped: torch.Tensor | None = None):
        super().__init__()
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.register_buffer("skipped", skipped, persistent=False)
        _share_checkpointing(self, layer)

    def forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        if self.skipped is not None:
            hidden_states = hidden_states + self.skipped
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ---------------------------------------------------------------------------------- hoist


@dataclasses.dataclass
class _Saved:
    layers: nn.ModuleList  # the original list object
    num_hidden_layers: int
    layer_types: Any  # the original object (or None)
    layer_idx: list[tuple[nn.Module, int]]


def removed_layers(modes: Sequence[str], skip_identity: bool) -> list[int]:
    """Original indices that run no computation: dead (and identity if it is skipped)."""
    gone = ("dead", "identity") if skip_identity else ("dead",)
    return [i for i, mode in enumerate(modes) if mode in gone]


def stub_seed(seed: int, layer: int) -> int:
    """One stub per (seed, original index of the run's first layer), the same in every block."""
    return (seed * 1_000_003 + layer) % (2**63)


def _capture_api():
    try:
        from transformers.utils import output_capturing
    except ImportError:  # pragma: no cover - older transformers record hidden states in the loop
        return None
    return output_capturing


def _install_capture_hooks(decoder: nn.Module, new_modules: Sequence[nn.Module]) -> None:
    """transformers records hidden states with forward hooks on decoder-layer instances,
    installed once on first use. Install them on the full list now (so layers that are hoisted
    at that moment are not missed forever), and on our stand-ins so that `hidden_states` has
    one entry per element of the pruned list (+1 for the embeddings)."""
    api = _capture_api()
    if api is None or not hasattr(api, "maybe_install_capturing_hooks"):
        return
    api.maybe_install_capturing_hooks(decoder)
    for module in new_modules:
        api.install_output_capuring_hook(module, "hidden_states", 0)


def hoist(model: nn.Module, plan: Any, *, skip_identity: bool = False, stub_std: float = 0.01,
          seed: int = 0, sliced: bool = False, stub_biases: dict[int, torch.Tensor] | None = None,
          half_biases: dict[int, torch.Tensor] | None = None) -> list[nn.Module]:
    """Rebuild `layers` as the survivors of `plan.modes` in original order: whole layers for
    sacred/both/identity, `AttentionOnly`/`MlpOnly` for attn/mlp, nothing for dead (and identity
    when `skip_identity`), with a `BiasStub` at the start of each removed run. `sliced`: the
    both/attn/mlp layers run only the plan's kept units instead (`sliced.SlicedLayer`);
    `stub_biases` (by a run's first layer) replace the random stub biases; `half_biases` (by
    layer) stand in for the skipped half of attn / mlp layers. Sets
    `config.num_hidden_layers`, `config.layer_types` and each attention's `layer_idx` to match
    the pruned list until `restore`. Returns the new list's modules."""
    restore(model)
    decoder = decoder_of(model)
    layers, config = decoder.layers, decoder.config
    modes = list(plan.modes)
    if len(modes) != len(layers):
        raise ConfigError(f"plan has {len(modes)} layer modes but the model has {len(layers)} layers")
    removed = set(removed_layers(modes, skip_identity))
    old_types = getattr(config, "layer_types", None)
    ref = layers[0].input_layernorm.weight
    new, types, stand_ins = [], [], []
    for i, layer in enumerate(layers):
        if i in removed:
            if i - 1 not in removed:
                stub = BiasStub(ref.numel(), stub_std, stub_seed(seed, i), ref.dtype, ref.device,
                                bias=(stub_biases or {}).get(i))
                new.append(stub)
                stand_ins.append(stub)
                types.append(old_types[i] if old_types is not None else None)
            continue
        skipped = (half_biases or {}).get(i)
        if sliced and modes[i] in ("both", "attn", "mlp"):
            module = SlicedLayer(layer, modes[i], kept_rows(plan, i, layer_dims(model), ref.device), skipped)
        elif modes[i] in ("attn", "mlp"):
            module = {"attn": AttentionOnly, "mlp": MlpOnly}[modes[i]](layer, skipped)
        else:
            module = layer
        if module is not layer:
            stand_ins.append(module)
        new.append(module)
        types.append(old_types[i] if old_types is not None else None)

    _install_capture_hooks(decoder, stand_ins)
    saved = _Saved(layers, config.num_hidden_layers, old_types,
                   [(layer.self_attn, layer.self_attn.layer_idx) for layer in layers])
    decoder.layers = nn.ModuleList(new)
    decoder.__dict__[_HOISTED] = saved
    config.num_hidden_layers = len(new)
    if old_types is not None:
        config.layer_types = types
    for position, module in enumerate(new):
        attn = getattr(module, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = position
    return new


def restore(model: nn.Module) -> bool:
    """Undo `hoist`: the original ModuleList object, config values and `layer_idx`s. Returns
    whether anything was hoisted."""
    decoder = decoder_of(model)
    saved = decoder.__dict__.pop(_HOISTED, None)
    if saved is None:
        return False
    decoder.layers = saved.layers
    decoder.config.num_hidden_layers = saved.num_hidden_layers
    if saved.layer_types is not None:
        decoder.config.layer_types = saved.layer_types
    for attn, idx in saved.layer_idx:
        attn.layer_idx = idx
    return True


# ---------------------------------------------------------------------------------- masks


def _keep_mask(linear: nn.Linear, keep: Sequence[int], unit: int) -> torch.Tensor:
    """0/1 over `linear`'s outputs: 1 on units (heads, channel groups) in `keep`."""
    w = linear.weight
    mask = torch.zeros(linear.out_features, dtype=w.dtype, device=w.device)
    for k in keep:
        mask[k * unit : (k + 1) * unit] = 1
    return mask


def _mask_hook(mask: torch.Tensor, in_eval: bool):
    def hook(module, args, output):
        return output * mask if module.training or in_eval else output
    return hook


def apply_masks(model: nn.Module, plan: Any, *, skip_identity: bool = False, in_eval: bool = False) -> None:
    """Multiply projection outputs by 0/1 channel masks (forward hooks), as the published Deep
    Chaos code does: masked outputs contribute zero and the matching weight rows (and the input
    columns of the next projection) get zero gradient. Per layer mode: both/attn mask q/k/v by
    kept KV heads (a kept KV head keeps its whole query group) and o_proj's output by kept hidden
    groups; both/mlp mask gate/up by kept channel groups and down_proj's output by kept hidden
    groups; a disabled half has its output projection zeroed; dead (and identity when skipped)
    layers have both zeroed, i.e. run as x -> x; sacred/identity layers are untouched. As in the
    published hooks, masks act in training mode only unless `in_eval`."""
    remove_masks(model)
    dims = layer_dims(model)
    group_q = dims.num_heads // dims.num_kv_heads
    hidden_unit, mlp_unit = plan.hidden_group_size, plan.mlp_group_size
    handles = []
    for i, (layer, mode) in enumerate(zip(original_layers(model), plan.modes)):
        if mode == "sacred" or (mode == "identity" and not skip_identity):
            continue
        attn, mlp = layer.self_attn, layer.mlp
        if mode in ("both", "attn"):
            kv = plan.kv_heads[i]
            q = [h * group_q + j for h in kv for j in range(group_q)]
            masks = [
                (attn.q_proj, _keep_mask(attn.q_proj, q, dims.head_dim)),
                (attn.k_proj, _keep_mask(attn.k_proj, kv, dims.head_dim)),
                (attn.v_proj, _keep_mask(attn.v_proj, kv, dims.head_dim)),
                (attn.o_proj, _keep_mask(attn.o_proj, plan.attn_hidden_groups[i], hidden_unit)),
            ]
        else:
            masks = [(attn.o_proj, _keep_mask(attn.o_proj, [], 1))]
        if mode in ("both", "mlp"):
            channels = plan.mlp_groups[i]
            masks += [
                (mlp.gate_proj, _keep_mask(mlp.gate_proj, channels, mlp_unit)),
                (mlp.up_proj, _keep_mask(mlp.up_proj, channels, mlp_unit)),
                (mlp.down_proj, _keep_mask(mlp.down_proj, plan.mlp_hidden_groups[i], hidden_unit)),
            ]
        else:
            masks.append((mlp.down_proj, _keep_mask(mlp.down_proj, [], 1)))
        handles += [module.register_forward_hook(_mask_hook(mask, in_eval)) for module, mask in masks]
    decoder_of(model).__dict__[_MASKS] = handles


def remove_masks(model: nn.Module) -> bool:
    handles = decoder_of(model).__dict__.pop(_MASKS, None)
    for handle in handles or ():
        handle.remove()
    return handles is not None


# ---------------------------------------------------------------------------------- training


def set_trainable(model: nn.Module, modes: Sequence[str], *, train_embeddings: bool = True,
                  train_identity: bool = True, skip_identity: bool = False) -> None:
    """`requires_grad` per mode: sacred/both -> the whole layer; attn -> attention + input norm;
    mlp -> MLP + post-attention norm; identity -> the whole layer if `train_identity` and it is
    not skipped; dead -> nothing. Parameters outside the layers (embeddings, final norm,
    lm_head) follow `train_embeddings`."""
    in_layers = set()
    for layer, mode in zip(original_layers(model), modes):
        if mode not in MODES:
            raise ConfigError(f"unknown layer mode {mode!r}; modes: {', '.join(MODES)}")
        for p in layer.parameters():
            p.requires_grad_(False)
            in_layers.add(id(p))
        if mode == "identity":
            parts = [layer] if train_identity and not skip_identity else []
        else:
            parts = {
                "sacred": [layer], "both": [layer], "dead": [],
                "attn": [layer.self_attn, layer.input_layernorm],
                "mlp": [layer.mlp, layer.post_attention_layernorm],
            }[mode]
        for part in parts:
            for p in part.parameters():
                p.requires_grad_(True)
    for p in model.parameters():
        if id(p) not in in_layers:
            p.requires_grad_(train_embeddings)
