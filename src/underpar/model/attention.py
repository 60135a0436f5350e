"""Attention: its config (`model.attention.*`) and grouped-query causal self-attention with
RMS-normed q/k, rotary embeddings (all or part of each head, optionally scaled for longer
contexts), a learned per-head query gain, and two optional output changes: XSA and a gate.

    rotary_dims    rotate only each head's first dims (0: all; the records: 16 of 64)
    rope_scaling   none | ntk | yarn, to evaluate beyond the training length (rope_scaling.py)
    gate           none | sparse | dense sigmoid gate per head on the output (attention_gates.py)
    xsa            remove each token's own value direction from its output; xsa_layers picks
                   the layers (empty: all, as the records)

Speed switches (the same attention up to float rounding; benchmarks/reference_speed.py):

    sdpa_backend   auto | flash | cudnn | efficient | math: the SDPA kernel (auto: torch's
                   choice, FlashAttention-2 on Hopper as the reference pins); checked on the run's
                   device before training (check_sdpa_backend), since cudnn and efficient exist
                   on CUDA only
    expand_kv      repeat K/V to every query head before SDPA instead of enable_gqa (the
                   efficient kernel has no GQA; it may also be faster for another one)
    fused_qkv      q, k and v from one matmul on the three weights concatenated (in training
                   mode; evaluation, GPTQ's and TTT's hooks see the three linears)
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from underpar.config import bounded, choice, items, variant
from underpar.errors import ConfigError
from underpar.model.attention_gates import ATTENTION_GATES, AttentionGate, head_gates, init_gate_weight
from underpar.model.linear import CastedLinear, rms_norm
from underpar.model.rope import ROPE_DTYPES, Rotary, apply_rotary
from underpar.model.rope_scaling import ROPE_SCALINGS, RopeScaling

# `model.attention.sdpa_backend` -> the one SDPA kernel allowed (None: torch chooses).
SDPA_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


@dataclasses.dataclass
class AttentionConfig:
    num_heads: int = bounded(8, 1)
    # Fewer key/value heads than query heads: grouped-query attention (1: multi-query).
    num_kv_heads: int = bounded(4, 1)
    rope_base: float = bounded(10000.0, 1.0)
    # float32: exact rotary phases. bfloat16: the reference script's rounded phases.
    rope_dtype: str = choice("float32", ROPE_DTYPES)
    # q and k have unit RMS, so the gain sets the logit scale: |logit| <= gain * sqrt(head_dim).
    # The baseline uses 1.5, the records 5.0-5.25; at or below 0 attention is uniform or
    # inverted, above 10 (logits up to +-80 at head_dim 64) softmax is one-hot from the start.
    qk_gain_init: float = bounded(1.5, 0.5, 10.0)
    # Rotate only each head's first rotary_dims dims (even; 0: all of them).
    rotary_dims: int = bounded(0, 0)
    rope_scaling: RopeScaling = variant(ROPE_SCALINGS, "none")
    gate: AttentionGate = variant(ATTENTION_GATES, "none")
    xsa: bool = False
    # With xsa: the layers that use it (0-based); empty: every layer.
    xsa_layers: list[int] = items([])
    # Speed only (module docstring): the SDPA kernel, K/V expanded to every head, one QKV matmul.
    sdpa_backend: str = choice("auto", SDPA_BACKENDS)
    expand_kv: bool = False
    fused_qkv: bool = False

    def check_with(self, model_dim: int, num_layers: int) -> None:
        """Checks that need the model's width and depth (called by GPTConfig.check)."""
        head_dim = model_dim // self.num_heads
        rotary = self.rotary_dims or head_dim
        if rotary % 2 != 0 or rotary > head_dim:
            raise ConfigError(
                f"model.attention.rotary_dims = {self.rotary_dims} must be even and at most the "
                f"head dim ({head_dim}); 0 rotates all of it"
            )
        if ROPE_SCALINGS.name_of(self.rope_scaling) == "ntk" and rotary <= 2:
            raise ConfigError(
                f"model.attention.rope_scaling = 'ntk' needs more than 2 rotary dims (its base "
                f"grows by factor^(d/(d-2))); model.attention.rotary_dims gives {rotary}"
            )
        inputs = self.gate.inputs(model_dim)
        if inputs > model_dim:
            raise ConfigError(
                f"model.attention.gate.window = {inputs} must be at most model.model_dim = {model_dim}"
            )
        if self.xsa_layers and not self.xsa:
            raise ConfigError(
                "model.attention.xsa_layers is set but model.attention.xsa is false; set "
                "model.attention.xsa=true (xsa_layers empty: every layer)"
            )
        bad = [i for i in self.xsa_layers if not 0 <= i < num_layers]
        if bad or len(set(self.xsa_layers)) != len(self.xsa_layers):
            raise ConfigError(
                f"model.attention.xsa_layers = {self.xsa_layers} must be distinct layer indices "
                f"in [0, {num_layers - 1}]"
            )

    def xsa_at(self, layer_index: int) -> bool:
        """Whether the layer at `layer_index` uses XSA."""
        return self.xsa and (not self.xsa_layers or layer_index in self.xsa_layers)


def check_sdpa_backend(cfg: AttentionConfig, model_dim: int, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, with torch's reasons, an `sdpa_backend` that cannot run this model's attention
    (its heads, head dim and GQA; forward and backward) on `device` in `dtype`: one tiny call
    in eager mode, before anything is compiled."""
    backend = SDPA_BACKENDS[cfg.sdpa_backend]
    if backend is None:
        return
    head_dim = model_dim // cfg.num_heads
    kv_heads = cfg.num_heads if cfg.expand_kv else cfg.num_kv_heads
    q = torch.zeros(1, cfg.num_heads, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    kv = torch.zeros(1, kv_heads, 128, head_dim, device=device, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=kv_heads != cfg.num_heads).sum().backward()
            return
        except RuntimeError as err:
            reasons = [str(w.message).splitlines()[0] for w in caught] or [str(err).splitlines()[0]]
    if device.type != "cuda" and backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        reasons.insert(0, "that kernel exists on CUDA only")
    gqa = kv_heads != cfg.num_heads and device.type == "cuda"
    hint = " With fewer KV heads, model.attention.expand_kv=true may help." if gqa else ""
    raise ConfigError(
        f"model.attention.sdpa_backend = '{cfg.sdpa_backend}' cannot run this attention on {device} in {dtype} "
        f"(torch: {'; '.join(reasons)}).{hint} 'auto' lets torch choose; valid: {', '.join(SDPA_BACKENDS)}"
    )


def remove_self_value(y_bhtd: Tensor, v_bktd: Tensor) -> Tensor:
    """XSA: y_i <- y_i - (y_i . v_i / |v_i|^2) v_i per head, where v_i is the token's own value
    in the KV head the query head reads (query head h uses KV head h // (heads / kv_heads), as
    SDPA's GQA does). The output is orthogonal to the token's own value."""
    batch, heads, seq_len, head_dim = y_bhtd.shape
    kv_heads = v_bktd.size(1)
    y_g = y_bhtd.reshape(batch, kv_heads, heads // kv_heads, seq_len, head_dim)
    v_unit = F.normalize(v_bktd, dim=-1).unsqueeze(2)
    y_g = y_g - (y_g * v_unit).sum(dim=-1, keepdim=True) * v_unit
    return y_g.reshape(batch, heads, seq_len, head_dim)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention with RMS-normed q/k, RoPE and a learned per-head
    query gain (which sets the attention temperature, since q and k have unit RMS)."""

    def __init__(self, dim: int, cfg: AttentionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.sdpa_backend = SDPA_BACKENDS[cfg.sdpa_backend]
        self.expand_kv = cfg.expand_kv and cfg.num_kv_heads != cfg.num_heads
        self.fused_qkv = cfg.fused_qkv
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.c_q = CastedLinear(dim, dim)
        self.c_k = CastedLinear(dim, kv_dim)
        self.c_v = CastedLinear(dim, kv_dim)
        self.proj = CastedLinear(dim, dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), float(cfg.qk_gain_init)))
        self.rotary = Rotary(
            self.head_dim, cfg.rope_base, ROPE_DTYPES[cfg.rope_dtype], cfg.rotary_dims, cfg.rope_scaling
        )
        # Set per layer by the model (AttentionConfig.xsa_at); a constant under compile.
        self.xsa = False
        gate_inputs = cfg.gate.inputs(dim)
        self.attn_gate_w = None
        self.gate_scale = 1.0
        if gate_inputs:
            self.gate_scale = float(cfg.gate.scale)
            self.attn_gate_w = nn.Parameter(init_gate_weight(cfg.num_heads, gate_inputs, cfg.gate.init_std))
        # Head pruning (model.structure.prune_heads_to): a 0/1 mask per head, registered by
        # `allow_pruning`. A buffer, so the pruned and unpruned stages share one graph; saved
        # with the weights, so checkpoints, averaged weights and artifacts keep which heads.
        self.register_buffer("head_mask", None, persistent=False)

    def allow_pruning(self) -> None:
        self.register_buffer("head_mask", torch.ones(self.num_heads, device=self.proj.weight.device))

    @torch.no_grad()
    def prune_heads(self, keep: int | None) -> None:
        """Keep the `keep` heads whose columns of the output projection have the largest norm:
        mask the others and zero their columns, so they add nothing and learn nothing (no
        gradient reaches them through the mask). None: every head again (the weights are the
        caller's to restore). A pruned head's columns are zero, so pruning again (a resume)
        keeps the same heads."""
        if keep is None:
            self.head_mask.fill_(1.0)
            return
        w = self.proj.weight
        norms = w.float().view(w.size(0), self.num_heads, self.head_dim).norm(dim=(0, 2))
        dropped = torch.sort(norms, descending=True, stable=True).indices[keep:]
        self.head_mask.fill_(1.0).index_fill_(0, dropped.to(self.head_mask.device), 0.0)
        w.view(w.size(0), self.num_heads, self.head_dim).index_fill_(1, dropped.to(w.device), 0.0)

    def _qkv(self, x_btd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, T, *]: three matmuls, or with fused_qkv in training one on the weights
        concatenated (eval keeps the three, so forward hooks on them still fire)."""
        if not (self.fused_qkv and self.training):
            return self.c_q(x_btd), self.c_k(x_btd), self.c_v(x_btd)
        linears = (self.c_q, self.c_k, self.c_v)
        w = torch.cat([lin.casted_weight(x_btd.dtype) for lin in linears])
        return F.linear(x_btd, w).split([lin.out_features for lin in linears], dim=-1)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.expand_kv:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        gqa = k.size(1) != q.size(1)
        if self.sdpa_backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel([self.sdpa_backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def forward(self, x_btd: Tensor) -> Tensor:
        batch, seq_len, dim = x_btd.shape
        # q: [B, heads, T, head_dim]; k, v: [B, kv_heads, T, head_dim]
        q, k, v = (t.reshape(batch, seq_len, -1, self.head_dim).transpose(1, 2) for t in self._qkv(x_btd))
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(seq_len, x_btd.device, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        logit_scale = self.rotary.logit_scale(seq_len)  # a Python float: no branch in the graph
        if logit_scale != 1.0:
            q = q * logit_scale
        y = self._sdpa(q, k, v)
        if self.xsa:
            y = remove_self_value(y, v)
        if self.attn_gate_w is not None:
            y = y * head_gates(x_btd, self.attn_gate_w, self.gate_scale)
        if self.head_mask is not None:
            y = y * self.head_mask.to(y.dtype)[None, :, None, None]
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, dim))
