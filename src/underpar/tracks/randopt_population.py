"""Population-batched greedy decoding for RandOpt: P candidates W0 + sigma_c R(seed_c) answer the
same prompts in one forward per decode step, so a step's kernel launches and host work are paid
once for P candidates instead of P times (a 135M model's decode step is launch-bound).

Form chosen: stacked per-candidate weights and batched matmuls. Each candidate's weights are one
row of a [P, numel] buffer in the perturbation space's flat layout, filled by one fused kernel
launch per candidate from the resident base (no noise tensor), and every linear layer is one
`bmm` over the P rows. The other form, x @ W0^T + sigma (x @ R^T), reads the base once but needs
R either materialized per candidate (the same bytes as stacked weights, and twice the matmuls)
or regenerated from the hash inside a custom GEMM; benchmarks/randopt_speed.py measures the
materialized variant against the stacked one on SmolLM2's layer shapes.

The forward is written out for Llama-family models (Llama, Qwen2, Mistral without a sliding
window: RMSNorm, rotary positions from the model's own rotary module, grouped-query attention,
gated MLP; optional q/k/v biases, tied or untied head). The KV cache is static, one (P x rows,
kv_heads, max_len, head_dim) tensor per layer; on CUDA each decode step is captured as a CUDA
graph per attention length bucket (multiples of 64 slots), so early steps read a short cache.
Shapes depend only on (P, rows, max_len), never on which candidates are decoded, so a
candidate's tokens do not depend on its population slot or its neighbours (tested on CPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar.errors import ConfigError
from underpar.eval.generate import (
    LENGTH_BUCKET, Completion, DecodeConfig, GenerationStats, _finish, _has_stop, _left_pad, _pick, _positions,
    eos_ids_of,
)
from underpar.kernels.perturb import Terms
from underpar.kernels.perturb_space import PerturbSpace
from underpar.tracks.randopt_search import PromptSet, score_texts

ARCHITECTURES = ("llama", "qwen2", "mistral")


def check_model(model: Any, space: PerturbSpace) -> None:
    """Refuse, before any work, a model or space the population engine cannot decode."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise ConfigError(f"decode.population > 1 decodes Llama-family models ({', '.join(ARCHITECTURES)}); "
                          f"{kind!r} is not one: use decode.population=1")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", kind == "mistral"):
        raise ConfigError("decode.population > 1 has no sliding-window attention; use decode.population=1")
    if getattr(config, "hidden_act", "silu") not in ("silu", "gelu", "gelu_new", "relu"):
        raise ConfigError(f"decode.population > 1: activation {config.hidden_act!r} is not supported; "
                          "use decode.population=1")
    if not space.flat:
        raise ConfigError("decode.population > 1 needs every perturbed tensor in one dtype on one device")


class PopulationDecoder:
    """Static caches, stacked weights and the decode step for `size` candidates x `rows` prompts."""

    def __init__(self, model: Any, space: PerturbSpace, size: int, rows: int, max_len: int, graphs: bool = True):
        check_model(model, space)
        c = model.config
        self.model, self.space = model, space
        self.size, self.rows, self.max_len = size, rows, max_len
        self.layers = c.num_hidden_layers
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.act = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                    "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[c.hidden_act]
        self.rotary = model.model.rotary_emb
        first = space.params[0]
        self.device, self.dtype = first.device, first.dtype
        # candidate c's weights are row c of one buffer, in the space's flat layout
        self.stacked = torch.empty((size, space.numel), dtype=self.dtype, device=self.device)
        index = {id(p): k for k, p in enumerate(space.params)}
        self.weights: dict[str, Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            k = index.get(id(p))
            if k is None:  # not perturbed: shared by all candidates
                self.weights[name] = p.detach().unsqueeze(0).expand(size, *p.shape)
            else:
                off = space.offsets[space.names[k]]
                self.weights[name] = self.stacked[:, off:off + p.numel()].view(size, *p.shape)
        self.head = self.weights.get("lm_head.weight", self.weights["model.embed_tokens.weight"])
        shape = (size * rows, self.kv_heads, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.valid_bl = torch.ones((rows, max_len), dtype=torch.bool, device=self.device)
        self.slot = torch.zeros((), dtype=torch.long, device=self.device)
        self.tok_pb = torch.zeros((size, rows), dtype=torch.long, device=self.device)
        self.pos_b = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.finished_pb = torch.zeros((size, rows), dtype=torch.bool, device=self.device)
        self.eos_t = torch.full((1,), -1, dtype=torch.long, device=self.device)  # -1: never a token
        self.pad_id = 0
        self._stops: tuple = ()
        self.graphs_on = graphs and self.device.type == "cuda"
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]] = {}

    # ------------------------------------------------------------------ weights

    def load(self, population: Sequence[Terms | None], backend: str = "auto") -> None:
        """Row c <- base + sum sigma R over population[c] (None or [] = the base): one fused
        launch per candidate; rows past len(population) repeat its last candidate, so a short
        population decodes in the same shapes."""
        if not 0 < len(population) <= self.size:
            raise ValueError(f"a population of {len(population)} does not fit {self.size} slots")
        with torch.no_grad():
            for c in range(self.size):
                terms = population[min(c, len(population) - 1)]
                self.space.write(self.stacked[c], list(terms or []), backend)

    # ------------------------------------------------------------------ the forward

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

    def _forward(self, ids_pbt: Tensor, pos_bt: Tensor, allowed_btl: Tensor, start: int | Tensor,
                 length: int) -> Tensor:
        """Logits [P, B, V] of the last position. Tokens sit at cache slots start..start+T-1
        (an int in prefill, a 0-dim tensor when decoding); attention reads slots [0, length)."""
        P, B, T = ids_pbt.shape
        H, G, D = self.heads, self.kv_heads, self.head_dim
        rep = H // G
        emb = self.weights["model.embed_tokens.weight"]
        x = emb[torch.arange(P, device=ids_pbt.device)[:, None, None], ids_pbt].view(P, B * T, -1)
        cos, sin = self.rotary(x, pos_bt)  # [B, T, D] in the model dtype, as HF computes them
        cos, sin = cos[None, :, :, None, :], sin[None, :, :, None, :]
        masked = ~allowed_btl[None, :, None, None, :, :]  # [1, B, 1, 1, T, L]
        scale = D ** -0.5
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._norm(x, p + "input_layernorm")
            q = self._rope(self._linear(h, p + "self_attn.q_proj").view(P, B, T, H, D), cos, sin)
            k = self._rope(self._linear(h, p + "self_attn.k_proj").view(P, B, T, G, D), cos, sin)
            v = self._linear(h, p + "self_attn.v_proj").view(P, B, T, G, D)
            k = k.permute(0, 1, 3, 2, 4).reshape(P * B, G, T, D)
            v = v.permute(0, 1, 3, 2, 4).reshape(P * B, G, T, D)
            if isinstance(start, int):
                self.k_cache[i][:, :, start:start + T] = k
                self.v_cache[i][:, :, start:start + T] = v
            else:
                self.k_cache[i].index_copy_(2, start.view(1), k)
                self.v_cache[i].index_copy_(2, start.view(1), v)
            keys, values = self.k_cache[i][:, :, :length], self.v_cache[i][:, :, :length]
            # query heads g*rep .. g*rep+rep-1 share kv head g: group them, read K and V once
            q = q.view(P, B, T, G, rep, D).permute(0, 1, 3, 4, 2, 5).reshape(P * B, G, rep * T, D)
            scores = (q @ keys.transpose(-1, -2)) * scale
            scores = scores.view(P, B, G, rep, T, length).masked_fill(masked, torch.finfo(scores.dtype).min)
            attn = scores.view(P * B, G, rep * T, length).softmax(-1, dtype=torch.float32).to(q.dtype) @ values
            attn = attn.view(P, B, G, rep, T, D).permute(0, 1, 4, 2, 3, 5).reshape(P, B * T, H * D)
            x = x + self._linear(attn, p + "self_attn.o_proj")
            h = self._norm(x, p + "post_attention_layernorm")
            gated = self.act(self._linear(h, p + "mlp.gate_proj")) * self._linear(h, p + "mlp.up_proj")
            x = x + self._linear(gated, p + "mlp.down_proj")
        last = self._norm(x.view(P, B, T, -1)[:, :, -1], "model.norm")
        return torch.bmm(last, self.head.transpose(1, 2))

    def _step(self, length: int) -> tuple[Tensor, Tensor]:
        """One decode step from the static inputs (tok, pos, slot, finished); no input is
        written, so running it again (graph warm-up, capture) changes nothing."""
        L = torch.arange(length, device=self.device)
        allowed = (self.valid_bl[:, :length] & (L <= self.slot))[:, None, :]  # [B, 1, L]
        logits = self._forward(self.tok_pb[:, :, None], self.pos_b[:, None], allowed, self.slot, length)
        return _pick(logits, self.finished_pb, self.eos_t, self.pad_id)

    def _replay(self, length: int) -> tuple[Tensor, Tensor]:
        if not self.graphs_on:
            return self._step(length)
        if length not in self._graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(length)  # warm-up outside the capture (allocator, cuBLAS handles)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self._step(length)
            self._graphs[length] = (graph, outputs)
        graph, outputs = self._graphs[length]
        graph.replay()
        return outputs

    # ------------------------------------------------------------------ decoding one batch

    def decode(self, ids_bw: Tensor, mask_bw: Tensor, eos: list[int], pad_id: int, cfg: DecodeConfig,
               tokenizer: Any) -> Tensor:
        """Greedy tokens [P, B, n] for a left-padded batch (B = rows), n <= max_new_tokens."""
        P, B, W = self.size, self.rows, ids_bw.shape[1]
        if ids_bw.shape[0] != B or W + cfg.max_new_tokens > self.max_len:
            raise ValueError(f"batch {tuple(ids_bw.shape)} does not fit {B} rows x {self.max_len} slots")
        if (tuple(eos), pad_id) != self._stops:  # graphs hold the EOS ids' address and the pad id
            self._stops, self.pad_id, self._graphs = (tuple(eos), pad_id), pad_id, {}
            self.eos_t = torch.tensor(eos or [-1], dtype=torch.long, device=self.device)
        self.valid_bl.fill_(True)
        self.valid_bl[:, :W] = mask_bw
        slots = torch.arange(W, device=self.device)
        allowed = self.valid_bl[:, None, :W] & (slots[None, :, None] >= slots[None, None, :])
        allowed |= torch.eye(W, dtype=torch.bool, device=self.device)  # pad queries see themselves: no NaN
        logits = self._forward(ids_bw.expand(P, B, W), _positions(mask_bw), allowed, 0, W)
        tok, finished = _pick(logits, torch.zeros((P, B), dtype=torch.bool, device=self.device), self.eos_t, pad_id)
        self.tok_pb.copy_(tok)
        self.finished_pb.copy_(finished)
        self.pos_b.copy_(mask_bw.sum(-1))
        out = torch.empty((P, B, cfg.max_new_tokens), dtype=torch.long, device=self.device)
        out[:, :, 0] = tok
        done = 1
        while done < cfg.max_new_tokens:
            if done % cfg.check_every == 0:
                if cfg.stop_strings:
                    flat = out[:, :, :done].reshape(P * B, done)
                    hit = _has_stop(flat, cfg.stop_strings, tokenizer).view(P, B)
                    self.finished_pb |= hit
                if bool(self.finished_pb.all()):
                    break
            self.slot.fill_(W + done - 1)  # the previous token's slot
            length = min(self.max_len, -(-(W + done) // LENGTH_BUCKET) * LENGTH_BUCKET)
            tok, finished = self._replay(length)
            out[:, :, done] = tok
            self.tok_pb.copy_(tok)
            self.finished_pb.copy_(finished)
            self.pos_b += 1
            done += 1
        return out[:, :, :done]


def generate_population(decoder: PopulationDecoder, tokenizer: Any, population: Sequence[Terms | None],
                        prompts: Sequence[Sequence[int]], cfg: DecodeConfig, backend: str = "auto",
                        stats: GenerationStats | None = None) -> list[list[Completion]]:
    """Greedy completions [candidate][prompt] of each (seed, sigma) combination in `population`
    (None = the base model), decoded together in batches of `decoder.rows` prompts; a short
    last batch is filled with copies of its first prompt (dropped afterwards)."""
    start = time.perf_counter()
    model = decoder.model
    eos = eos_ids_of(model, tokenizer)
    pad_id = next(i for i in (tokenizer.pad_token_id, *eos, 0) if i is not None)
    prompts = [list(map(int, p)) for p in prompts]
    decoder.load(population, backend)
    results: list[list[Completion]] = [[] for _ in population]
    with torch.no_grad():
        for b in range(0, len(prompts), decoder.rows):
            batch = prompts[b:b + decoder.rows]
            real = len(batch)
            batch += [batch[0]] * (decoder.rows - real)
            ids, mask = _left_pad(batch, pad_id, decoder.device)
            tokens = decoder.decode(ids, mask, eos, pad_id, cfg, tokenizer).tolist()
            for c in range(len(population)):
                results[c] += [_finish(gen, eos, cfg.stop_strings, tokenizer) for gen in tokens[c][:real]]
            if stats is not None:
                stats.batches += 1
                stats.decode_steps += len(tokens[0][0]) - 1
    if stats is not None:
        stats.prompts += len(prompts) * len(population)
        stats.prompt_tokens += sum(map(len, prompts)) * len(population)
        stats.generated_tokens += sum(len(c.token_ids) for row in results for c in row)
        stats.seconds += time.perf_counter() - start
        stats.compiled = decoder.graphs_on
    return results


class PopulationScorer:
    """RandOpt's answerer for whole chunks of candidates: every prompt set is padded to `rows`
    prompts (copies of its first, dropped afterwards) like `Answerer`, so one decoder serves
    every set; its cache fits the longest prompt of `sets` plus `decode.max_new_tokens`."""

    def __init__(self, model: Any, tokenizer: Any, space: PerturbSpace, decode: DecodeConfig, rows: int,
                 size: int, backend: str, sets: Sequence[PromptSet]):
        longest = max(len(ids) for s in sets for ids in s.ids)
        max_len = -(-longest // LENGTH_BUCKET) * LENGTH_BUCKET + decode.max_new_tokens
        self.decoder = PopulationDecoder(model, space, size, rows, max_len, graphs=decode.compile)
        self.tokenizer, self.decode, self.backend, self.rows, self.size = tokenizer, decode, backend, rows, size

    def texts(self, population: Sequence[tuple[int, float]], prompts: PromptSet,
              stats: GenerationStats | None = None) -> list[list[str]]:
        """[candidate][question] completion texts of (seed, sigma) candidates."""
        ids = prompts.ids + [prompts.ids[0]] * (self.rows - len(prompts.ids))
        done = generate_population(self.decoder, self.tokenizer, [[c] for c in population], ids, self.decode,
                                   self.backend, stats)
        return [[c.text for c in row[:len(prompts.ids)]] for row in done]

    def answers(self, population: Sequence[tuple[int, float]], sets: Sequence[PromptSet]) -> list[list[list[str | None]]]:
        """[candidate][set][question] extracted answers."""
        per_set = [[[s.task.extract(t) for t in row] for row in self.texts(population, s)] for s in sets]
        return [[per_set[k][c] for k in range(len(sets))] for c in range(len(population))]

    def score(self, population: Sequence[tuple[int, float]], prompts: PromptSet) -> list[dict[str, Any]]:
        """`score_candidate`'s row for each candidate (its seconds: the chunk's time shared out)."""
        stats = GenerationStats()
        texts = self.texts(population, prompts, stats)
        seconds = round(stats.seconds / len(population), 4)
        return [{**score_texts(prompts, row), "tokens": stats.generated_tokens // len(population), "seconds": seconds}
                for row in texts]
