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

Attention kernels, a registered choice (`decode.population_attention` for the decode steps,
`decode.population_prefill_attention` for the prefill):
- "fused_decode" (the decode default): one Triton pass per (row, kv head) that reads only the
  slots between the row's first and last allowed ones and nothing for a finished candidate
  (kernels/decode_attention.py); a prefill's many query rows take "matmul";
- "matmul": scores = q k^T * scale + mask, softmax in fp32, @ V (scores materialized);
- "sdpa": F.scaled_dot_product_attention with the additive mask (flash cannot take a mask, so
  on CUDA torch picks the memory-efficient or cuDNN kernel);
- "sdpa_efficient" (the prefill default): the same held to the memory-efficient kernel.
With the layers compiled by Inductor (`decode.population_fuse`), these defaults ran a chunk of
32 candidates x 128 prompts 2.0-2.2x faster end to end than matmul for both (SmolLM2-135M on
an H200: 7.61-8.08 against 3.71-3.80 candidates/s, benchmarks/results/randopt_speed-fast-h200.json
and -sizes-h200.json) with the same completions in another process; docs/BENCHMARKS.md has the steps' breakdown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from underpar.errors import ConfigError
from underpar.kernels.decode_attention import decode_attention, decode_attention_reference

AttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | None], Tensor]
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


# q [n, H, M, D], k/v [n, H, L, D], mask broadcastable to [n, 1, M, L], skip [n, H] or None (pairs
# whose output is not needed: a kernel may leave them out) -> [n, H, M, D]
register_attention("matmul")(decode_attention_reference)


@register_attention("sdpa")
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, skip: Tensor | None = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@register_attention("sdpa_efficient")
def sdpa_efficient_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, skip: Tensor | None = None) -> Tensor:
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


def linear(x_pnd: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    y = torch.bmm(x_pnd, weight.transpose(1, 2))
    return y if bias is None else y + bias[:, None, :]


def rms_norm(x_pnd: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm: normalize in fp32, cast back, then scale (HF's order)."""
    h = F.rms_norm(x_pnd.float(), (x_pnd.shape[-1],), eps=eps)
    return weight[:, None, :] * h.to(x_pnd.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def layer_in(x: Tensor, w: Sequence[Tensor | None], cos: Tensor, sin: Tensor, eps: float, B: int, G: int,
             D: int) -> tuple[Tensor, Tensor, Tensor]:
    """A layer up to attention: x [P, B x T, hidden], w = (norm, q, k, v weights, q, k, v biases)
    -> q [B x P, G, rep x T, D] (query rows of kv head g: head in group, then position), k and v
    [B x P, G, T, D] (the cache layout)."""
    P, T = x.shape[0], x.shape[1] // B
    norm, wq, wk, wv, bq, bk, bv = w
    h = rms_norm(x, norm, eps)
    H = wq.shape[1] // D
    q = rope(linear(h, wq, bq).view(P, B, T, H, D), cos, sin)
    k = rope(linear(h, wk, bk).view(P, B, T, G, D), cos, sin)
    v = linear(h, wv, bv).view(P, B, T, G, D)
    q = q.view(P, B, T, G, H // G, D).permute(1, 0, 3, 4, 2, 5).reshape(B * P, G, H // G * T, D)
    k = k.permute(1, 0, 3, 2, 4).reshape(B * P, G, T, D)
    v = v.permute(1, 0, 3, 2, 4).reshape(B * P, G, T, D)
    return q, k, v


def layer_out(x: Tensor, attn: Tensor, w: Sequence[Tensor | None], eps: float, act: Callable[[Tensor], Tensor],
              B: int) -> Tensor:
    """The rest of a layer: x + o_proj(attn), then the gated MLP with its residual; attn in
    layer_in's q layout, w = (o weight, o bias, norm, gate, up, down weights)."""
    P, T = x.shape[0], x.shape[1] // B
    wo, bo, norm, wg, wu, wd = w
    n, G, MT, D = attn.shape
    attn = attn.view(B, P, G, MT // T, T, D).permute(1, 0, 4, 2, 3, 5).reshape(P, B * T, -1)
    x = x + linear(attn, wo, bo)
    h = rms_norm(x, norm, eps)
    return x + linear(act(linear(h, wg, None)) * linear(h, wu, None), wd, None)


LayerWeights = tuple[tuple[Tensor | None, ...], tuple[Tensor | None, ...]]  # layer_in's w, layer_out's w


def layer_weights(weights: dict[str, Tensor], i: int) -> LayerWeights:
    """Layer i's stacked weights from a model's parameter names, as layer_in and layer_out take them."""
    w = weights.get
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    return ((w(p + "input_layernorm.weight"), w(a + "q_proj.weight"), w(a + "k_proj.weight"),
             w(a + "v_proj.weight"), w(a + "q_proj.bias"), w(a + "k_proj.bias"), w(a + "v_proj.bias")),
            (w(a + "o_proj.weight"), w(a + "o_proj.bias"), w(p + "post_attention_layernorm.weight"),
             w(m + "gate_proj.weight"), w(m + "up_proj.weight"), w(m + "down_proj.weight")))


class PopulationForward:
    """The forward of `PopulationDecoder` (which sets the attributes used here). A layer is
    layer_in -> cache write -> attention -> layer_out; `fused` and `fused_prefill` (or None:
    eager) hold the two compiled for the decode steps and for the prefill, so their elementwise
    work and layout copies run as a few fused kernels (the matmuls stay cuBLAS calls; one
    compiled graph serves every layer)."""

    size: int
    kv_heads: int
    head_dim: int
    eps: float
    weights: dict[str, Tensor]
    layer_weights: list[LayerWeights]
    head: Tensor
    k_cache: list[Tensor]
    v_cache: list[Tensor]
    act: Callable[[Tensor], Tensor]
    rotary: torch.nn.Module
    fused: tuple[Callable, Callable] | None
    fused_prefill: tuple[Callable, Callable] | None

    def _attention(self, attend: AttentionFn, i: int, q: Tensor, groups: Sequence[Group], length: int,
                   skip: Tensor | None) -> Tensor:
        """q [B x P, G, M, D] -> [B x P, G, M, D], candidates as heads: [B, P x G, M, D]."""
        n, G, M, D = q.shape
        B, heads = n // self.size, self.size * G
        k = self.k_cache[i][:n].view(B, heads, -1, D)
        v = self.v_cache[i][:n].view(B, heads, -1, D)
        q = q.view(B, heads, M, D)
        outs = [attend(q[b0:b1], k[b0:b1, :, s:length], v[b0:b1, :, s:length], mask,
                            None if skip is None else skip[b0:b1])
                for b0, b1, s, mask in groups]
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).reshape(n, G, M, D)  # SDPA's may be strided

    def _forward(self, ids_pbt: Tensor, pos_bt: Tensor, groups: Sequence[Group], start: int | Tensor,
                 length: int, attend: AttentionFn, skip: Tensor | None = None) -> Tensor:
        """Logits [P, B, V] of the last position. Tokens sit at cache slots start..start+T-1
        (an int in prefill, a 0-dim tensor when decoding); attention reads slots [s, length) of
        each group's rows; skip [B, P x G] (decoding): the finished candidates' (row, kv head)
        pairs, whose attention output is not needed."""
        P, B, T = ids_pbt.shape
        G, D = self.kv_heads, self.head_dim
        emb = self.weights["model.embed_tokens.weight"]
        x = emb[torch.arange(P, device=ids_pbt.device)[:, None], ids_pbt.reshape(P, B * T)]  # not a view: every
        # layer's x is then alike to torch.compile
        cos, sin = self.rotary(x, pos_bt)  # [B, T, D] in the model dtype, as HF computes them
        cos, sin = cos[None, :, :, None, :], sin[None, :, :, None, :]
        prefill = isinstance(start, int)
        first, rest = (self.fused_prefill if prefill else self.fused) or (layer_in, layer_out)
        for i, (w_in, w_out) in enumerate(self.layer_weights):
            q, k, v = first(x, w_in, cos, sin, self.eps, B, G, D)
            k_cache, v_cache = self.k_cache[i][:B * P], self.v_cache[i][:B * P]  # fewer rows after a compaction
            if prefill:
                k_cache[:, :, start:start + T] = k
                v_cache[:, :, start:start + T] = v
            else:
                k_cache.index_copy_(2, start.view(1), k)
                v_cache.index_copy_(2, start.view(1), v)
            x = rest(x, self._attention(attend, i, q, groups, length, skip), w_out, self.eps, self.act, B)
        last = rms_norm(x.view(P, B, T, -1)[:, :, -1], self.weights["model.norm.weight"], self.eps)
        return torch.bmm(last, self.head.transpose(1, 2))
