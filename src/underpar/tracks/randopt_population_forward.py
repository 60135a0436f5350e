"""The population engine's forward (randopt_population.py): a Llama-family model for P candidates
with stacked weights, and the attention kernels it can use over the static KV cache.

Cache layout: one (B x P, kv_heads, max_len, head_dim) tensor per layer, row b * P + p holding
prompt b of candidate p, so the rows of a group of prompts are contiguous for all candidates.
Query heads g*rep .. g*rep+rep-1 share kv head g: they are grouped as rep query rows of kv head g,
so K and V are read once per kv head. Attention sees candidates as heads: [B, P x G, rep*T, D]
against [B, P x G, L, D] (views, no copy), so a prompt row's mask [B, 1, rep*T or 1, L] is
broadcast over its candidates and never materialized per candidate.

Attention over a group of prompt rows reads only the cache slots [start, length) of that group:
with rows sorted by prompt length (generate_population does), the left padding of the shorter
prompts is not read. Masks are additive (0 where allowed, -inf elsewhere) in the model's dtype.

Attention kernels, a registered choice (`decode.population_attention`):
- "matmul" (the default): scores = q k^T * scale + mask, softmax in fp32, @ V (scores
  materialized per layer);
- "sdpa": F.scaled_dot_product_attention with the additive mask (flash cannot take a mask, so
  on CUDA torch picks the memory-efficient or cuDNN kernel: no materialized scores, K and V
  streamed once; capturable in a CUDA graph);
- "sdpa_efficient": the same held to the memory-efficient kernel on CUDA;
- "fused_decode": decode steps in one Triton pass per (row, kv head) that skips the blocks of
  slots the mask rules out (kernels/decode_attention.py); the prefill takes "matmul".
"matmul" with one row group and 64-slot buckets is the fastest measured end to end on an H200
(decode step at P = 32 x 128 rows: 18.9-26.4 ms against 24.1-39.3 for sdpa_efficient with 8
groups and 16-slot buckets, benchmarks/results/randopt_step_profile-h200.json; 3.68 against
3.27 candidates/s, randopt_speed-repro-h200.json): a decode step has 3 query rows per kv head,
where batched matmuls stream K and V near the copy rate and torch's SDPA kernels do not, and
more row groups cost more launches than the left padding they skip. "fused_decode" ran a whole
chunk 1.17x faster than "matmul" (randopt_step_profile-fused-h200.json, random weights); it is
opt-in until measured end to end on a real model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from underpar.errors import ConfigError
from underpar.kernels.decode_attention import decode_attention, decode_attention_reference

AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ATTENTION: dict[str, AttentionFn] = {}


def register_attention(name: str) -> Callable[[AttentionFn], AttentionFn]:
    def add(fn: AttentionFn) -> AttentionFn:
        ATTENTION[name] = fn
        return fn
    return add


def attention_of(name: str) -> AttentionFn:
    if name not in ATTENTION:
        raise ConfigError(f"decode.population_attention={name!r} is not one of {', '.join(ATTENTION)}")
    return ATTENTION[name]


# q [n, H, M, D], k/v [n, H, L, D], mask broadcastable to [n, 1, M, L] -> [n, H, M, D]
register_attention("matmul")(decode_attention_reference)


@register_attention("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@register_attention("sdpa_efficient")
def sdpa_efficient_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """SDPA held to the memory-efficient kernel (math where it cannot run, e.g. on a CPU),
    whatever torch would prefer: one known kernel, chosen by rule."""
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


register_attention("fused_decode")(decode_attention)


def additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where `allowed`, -inf elsewhere, in `dtype` (fill kernels only: no host-to-device copy,
    so it can be captured in a CUDA graph)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


# a group of prompt rows: (first row, end row, first cache slot read, its mask [rows, 1, M or 1, L])
Group = tuple[int, int, int, Tensor]


class PopulationForward:
    """The forward of `PopulationDecoder` (which sets the attributes used here)."""

    size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    weights: dict[str, Tensor]
    head: Tensor
    k_cache: list[Tensor]
    v_cache: list[Tensor]
    attend: AttentionFn
    act: Callable[[Tensor], Tensor]
    rotary: torch.nn.Module

    def _linear(self, x_pnd: Tensor, name: str) -> Tensor:
        y = torch.bmm(x_pnd, self.weights[name + ".weight"].transpose(1, 2))
        bias = self.weights.get(name + ".bias")
        return y if bias is None else y + bias[:, None, :]

    def _norm(self, x_pnd: Tensor, name: str) -> Tensor:
        """LlamaRMSNorm: normalize in fp32, cast back, then scale (HF's order); one fused
        normalization instead of HF's five elementwise passes (a launch-bound step counts them)."""
        h = F.rms_norm(x_pnd.float(), (x_pnd.shape[-1],), eps=self.eps)
        return self.weights[name + ".weight"][:, None, :] * h.to(x_pnd.dtype)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attention(self, i: int, q: Tensor, groups: Sequence[Group], length: int) -> Tensor:
        """q [B x P, G, M, D] -> [B x P, G, M, D], candidates as heads: [B, P x G, M, D]."""
        n, G, M, D = q.shape
        B, heads = n // self.size, self.size * G
        k = self.k_cache[i][:n].view(B, heads, -1, D)
        v = self.v_cache[i][:n].view(B, heads, -1, D)
        q = q.view(B, heads, M, D)
        outs = [self.attend(q[b0:b1], k[b0:b1, :, s:length], v[b0:b1, :, s:length], mask)
                for b0, b1, s, mask in groups]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).view(n, G, M, D)

    def _forward(self, ids_pbt: Tensor, pos_bt: Tensor, groups: Sequence[Group], start: int | Tensor,
                 length: int) -> Tensor:
        """Logits [P, B, V] of the last position. Tokens sit at cache slots start..start+T-1
        (an int in prefill, a 0-dim tensor when decoding); attention reads slots [s, length) of
        each group's rows."""
        P, B, T = ids_pbt.shape
        H, G, D = self.heads, self.kv_heads, self.head_dim
        rep = H // G
        emb = self.weights["model.embed_tokens.weight"]
        x = emb[torch.arange(P, device=ids_pbt.device)[:, None, None], ids_pbt].view(P, B * T, -1)
        cos, sin = self.rotary(x, pos_bt)  # [B, T, D] in the model dtype, as HF computes them
        cos, sin = cos[None, :, :, None, :], sin[None, :, :, None, :]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._norm(x, p + "input_layernorm")
            q = self._rope(self._linear(h, p + "self_attn.q_proj").view(P, B, T, H, D), cos, sin)
            k = self._rope(self._linear(h, p + "self_attn.k_proj").view(P, B, T, G, D), cos, sin)
            v = self._linear(h, p + "self_attn.v_proj").view(P, B, T, G, D)
            k = k.permute(1, 0, 3, 2, 4).reshape(B * P, G, T, D)
            v = v.permute(1, 0, 3, 2, 4).reshape(B * P, G, T, D)
            k_cache, v_cache = self.k_cache[i][:B * P], self.v_cache[i][:B * P]  # fewer rows after a compaction
            if isinstance(start, int):
                k_cache[:, :, start:start + T] = k
                v_cache[:, :, start:start + T] = v
            else:
                k_cache.index_copy_(2, start.view(1), k)
                v_cache.index_copy_(2, start.view(1), v)
            q = q.view(P, B, T, G, rep, D).permute(1, 0, 3, 4, 2, 5).reshape(B * P, G, rep * T, D)
            attn = self._attention(i, q, groups, length)
            attn = attn.view(B, P, G, rep, T, D).permute(1, 0, 4, 2, 3, 5).reshape(P, B * T, H * D)
            x = x + self._linear(attn, p + "self_attn.o_proj")
            h = self._norm(x, p + "post_attention_layernorm")
            gated = self.act(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
            x = x + self._linear(gated, p + "mlp.down_proj")
        last = self._norm(x.view(P, B, T, -1)[:, :, -1], "model.norm")
        return torch.bmm(last, self.head.transpose(1, 2))
