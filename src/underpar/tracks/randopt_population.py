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
gated MLP; optional q/k/v biases, tied or untied head); the forward and the attention kernels
are in randopt_population_forward.py. The KV cache is static, one (rows x P, kv_heads, max_len,
head_dim) tensor per layer; on CUDA each decode step (its layers compiled by Inductor with
`fuse`) is captured as a CUDA graph per attention length bucket (multiples of `bucket` slots),
so early steps read a short cache. A finished candidate's rows need no attention output: the
step passes them to the kernel, which may leave them out ("fused_decode" does). Prompts are
decoded longest first and the rows of a batch form `groups` groups, each reading the cache from
its longest prompt's first slot: the left padding of shorter prompts is mostly not read.
Shapes depend only on (P, rows, max_len) and the batch's prompt lengths, never on which
candidates are decoded, so a candidate's tokens do not depend on its population slot or its
neighbours (tested on CPU).
"""

from __future__ import annotations

import time
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from underpar.errors import ConfigError
from underpar.eval.generate import (
    Completion, DecodeConfig, GenerationStats, _finish, _has_stop, _left_pad, _pick, _positions, eos_ids_of,
)
from underpar.kernels.perturb import Terms
from underpar.kernels.perturb_space import PerturbSpace
from underpar.tracks.randopt_population_forward import (
    Group, PopulationForward, additive, attention_of, layer_in, layer_out, layer_weights,
)
from underpar.tracks.randopt_search import PromptSet, score_texts

ARCHITECTURES = ("llama", "qwen2", "mistral")
ALIGN = 16  # cache slices start and masks are as wide as multiples of this (the CUDA kernels' alignment)


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


def compiled(fn: Any, backend: str, use: str) -> Any:
    """fn compiled by torch.compile for fixed shapes (a prefill of another prompt width compiles
    again: Inductor's code for any width ran 1.17x slower than eager on an H200), as a copy named
    for its use, with its own code object (torch.compile keeps its graphs with the code it
    compiles: two compilations of one function would share them); Inductor in its
    deterministic mode where torch has it (no on-device benchmarking that could pick another
    reduction order in another process). Not fullgraph: past dynamo's recompile limit (8
    shapes: prompt widths, or row counts after compactions) a call runs eager instead of
    failing (tests check that the pieces compile without graph breaks)."""
    import torch._inductor.config as inductor

    name = f"{fn.__name__}_{use}"
    copy = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__)
    deterministic = backend == "inductor" and hasattr(inductor, "deterministic")
    return torch.compile(copy, backend=backend, dynamic=False,
                         options={"deterministic": True} if deterministic else None)


class PopulationDecoder(PopulationForward):
    """Static caches, stacked weights and the decode step for `size` candidates x `rows` prompts.
    attention, prefill_attention: registered kernels (randopt_population_forward.ATTENTION) of
    the decode steps and of the prefill; fuse: the torch.compile backend of the layer pieces,
    decode steps and prefill (None: eager); groups: row groups with their own first cache slot; bucket:
    decode steps read the cache up to a multiple of it;
    compact: at each check (every decode.check_every steps) the prompt rows still running for
    some candidate move to the front and the step runs on the fewest of rows, rows/2, rows/4 ...
    that holds them (its own graphs). Off by default: a row's matmuls then run in a batch
    shape that depends on when its neighbours finish, which on CUDA may pick another kernel
    (bf16 near-ties could then differ with the chunk's composition)."""

    def __init__(self, model: Any, space: PerturbSpace, size: int, rows: int, max_len: int, graphs: bool = True,
                 attention: str = "fused_decode", groups: int = 1, bucket: int = 64, compact: bool = False,
                 prefill_attention: str = "sdpa_efficient", fuse: str | None = None):
        check_model(model, space)
        if groups < 1 or bucket < ALIGN or bucket % ALIGN:
            raise ConfigError(f"population decoder: groups ({groups}) must be >= 1 and bucket ({bucket}) "
                              f"a multiple of {ALIGN}")
        self.attend, self.attention = attention_of(attention), attention
        self.prefill_attend = attention_of(prefill_attention)
        self.fused = self.fused_prefill = None
        if fuse is not None:
            self.fused = compiled(layer_in, fuse, "decode"), compiled(layer_out, fuse, "decode")
            self.fused_prefill = compiled(layer_in, fuse, "prefill"), compiled(layer_out, fuse, "prefill")
        self.groups, self.bucket, self.compact = groups, bucket, compact
        self.compactions = 0  # row compactions done (all batches)
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
        self.layer_weights = [layer_weights(self.weights, i) for i in range(self.layers)]
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
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[Tensor, Tensor]]] = {}
        self._pool = None
        self._starts: tuple[int, ...] = ()  # each row group's first cache slot (set per batch)
        self._n = rows  # rows the decode step runs on (fewer after a compaction)

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

    def _step(self, length: int) -> tuple[Tensor, Tensor]:
        """One decode step from the static inputs (tok, pos, slot, finished); no input is
        written, so running it again (graph warm-up, capture) changes nothing."""
        B = self._n
        L = torch.arange(length, device=self.device)
        mask = additive(self.valid_bl[:B, :length] & (L <= self.slot), self.dtype)[:, None, None, :]  # [B, 1, 1, L]
        rows = self._group_rows(B)
        groups = [(b, min(b + rows, B), s, mask[b:b + rows, :, :, s:]) for b, s in zip(range(0, B, rows), self._starts)]
        done = self.finished_pb[:, :B]  # these candidates' rows need no attention output
        skip = done.t()[:, :, None].expand(B, self.size, self.kv_heads).reshape(B, -1)
        logits = self._forward(self.tok_pb[:, :B, None], self.pos_b[:B, None], groups, self.slot, length,
                               self.attend, skip)
        return _pick(logits, done, self.eos_t, self.pad_id)

    def _replay(self, length: int) -> tuple[Tensor, Tensor]:
        if not self.graphs_on:
            return self._step(length)
        key = (self._n, length, self._starts)
        if key not in self._graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step(length)  # warm-up outside the capture (allocator, cuBLAS handles)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # one memory pool for every graph: each reads only the static inputs and its outputs
            # are copied out before the next replay, so their intermediates can share memory
            # (P x rows x vocab logits per graph otherwise)
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                outputs = self._step(length)
            self._graphs[key] = (graph, outputs)
        graph, outputs = self._graphs[key]
        graph.replay()
        return outputs

    def _prefill(self, ids_bw: Tensor, mask_bw: Tensor) -> Tensor:
        """Logits [P, B, V] after the prompts, attention in the decode step's row groups from
        slot 0; pad queries see themselves (no NaN)."""
        P, B, W = self.size, self.rows, ids_bw.shape[1]
        slots = torch.arange(W, device=self.device)
        allowed = mask_bw[:, None, :] & (slots[None, :, None] >= slots[None, None, :])
        allowed |= torch.eye(W, dtype=torch.bool, device=self.device)
        rep = self.heads // self.kv_heads  # query rows ordered (head in group, position)
        mask = additive(allowed, self.dtype)[:, None].expand(B, rep, W, W).reshape(B, 1, rep * W, W)
        rows = self._group_rows(B)
        groups: list[Group] = [(b, min(b + rows, B), 0, mask[b:b + rows]) for b in range(0, B, rows)]
        return self._forward(ids_bw.expand(P, B, W), _positions(mask_bw), groups, 0, W, self.prefill_attend)

    def _group_rows(self, B: int) -> int:
        """Rows per row group when B rows are decoded (the last group may have fewer)."""
        return -(-B // min(self.groups, B))

    def _group_starts(self, mask_bw: Tensor) -> tuple[int, ...]:
        """Each row group's first cache slot: its longest prompt's first, rounded down to ALIGN."""
        B = mask_bw.shape[0]
        first = (mask_bw.shape[1] - mask_bw.sum(-1)).tolist()
        rows = self._group_rows(B)
        return tuple(min(first[b:b + rows]) // ALIGN * ALIGN for b in range(0, B, rows))

    def _compact(self, live: Tensor, width: int, written: int) -> Tensor:
        """Move the rows still running for some candidate to the front, onto the fewest of
        rows, rows/2, ... that holds them (finished rows fill the rest), keeping their order;
        returns the original row of each row now decoded."""
        n, P = self._n, self.size
        running = (~self.finished_pb[:, :n].all(0)).nonzero().flatten()
        m = n
        while m > 1 and -(-m // 2) >= len(running):
            m = -(-m // 2)
        if m == n:
            return live
        done = (self.finished_pb[:, :n].all(0)).nonzero().flatten()
        keep = torch.cat([running, done[:m - len(running)]]).sort().values
        for cache in (*self.k_cache, *self.v_cache):
            rows = cache[:n * P].view(n, P, *cache.shape[1:])[keep, :, :, :written]
            cache[:m * P].view(m, P, *cache.shape[1:])[:, :, :, :written] = rows
        for state in (self.tok_pb, self.finished_pb):
            state[:, :m] = state[:, :n][:, keep]
        self.pos_b[:m] = self.pos_b[:n][keep]
        self.valid_bl[:m] = self.valid_bl[:n][keep]
        self._n, self._starts = m, self._group_starts(self.valid_bl[:m, :width])
        self.compactions += 1
        return live[keep]

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
        self._n, self._starts = B, self._group_starts(mask_bw)
        live = torch.arange(B, device=self.device)  # the original row of each decoded row
        logits = self._prefill(ids_bw, mask_bw)
        tok, finished = _pick(logits, torch.zeros((P, B), dtype=torch.bool, device=self.device), self.eos_t, pad_id)
        self.tok_pb.copy_(tok)
        self.finished_pb.copy_(finished)
        self.pos_b.copy_(mask_bw.sum(-1))
        out = torch.full((P, B, cfg.max_new_tokens), pad_id, dtype=torch.long, device=self.device)
        out[:, :, 0] = tok
        done = 1
        while done < cfg.max_new_tokens:
            if done % cfg.check_every == 0:
                if cfg.stop_strings:
                    flat = out[:, :, :done].reshape(P * B, done)
                    hit = _has_stop(flat, cfg.stop_strings, tokenizer).view(P, B)
                    self.finished_pb[:, :self._n] |= hit[:, live]
                if bool(self.finished_pb[:, :self._n].all()):
                    break
                if self.compact:
                    live = self._compact(live, W, W + done - 1)
            n = self._n
            self.slot.fill_(W + done - 1)  # the previous token's slot
            length = min(self.max_len, -(-(W + done) // self.bucket) * self.bucket)
            tok, finished = self._replay(length)
            if n == B:
                out[:, :, done] = tok
            else:
                out[:, live, done] = tok  # rows not decoded any more are finished: pad_id
            self.tok_pb[:, :n].copy_(tok)
            self.finished_pb[:, :n].copy_(finished)
            self.pos_b[:n] += 1
            done += 1
        return out[:, :, :done]


def generate_population(decoder: PopulationDecoder, tokenizer: Any, population: Sequence[Terms | None],
                        prompts: Sequence[Sequence[int]], cfg: DecodeConfig, backend: str = "auto",
                        stats: GenerationStats | None = None) -> list[list[Completion]]:
    """Greedy completions [candidate][prompt] of each (seed, sigma) combination in `population`
    (None = the base model), decoded together in batches of `decoder.rows` prompts, longest
    first; a short last batch is filled with copies of its first prompt (dropped afterwards)."""
    start = time.perf_counter()
    model = decoder.model
    eos = eos_ids_of(model, tokenizer)
    pad_id = next(i for i in (tokenizer.pad_token_id, *eos, 0) if i is not None)
    prompts = [list(map(int, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    decoder.load(population, backend)
    results: list[list[Completion]] = [[None] * len(prompts) for _ in population]  # type: ignore[list-item]
    with torch.no_grad():
        for b in range(0, len(prompts), decoder.rows):
            idx = order[b:b + decoder.rows]
            batch = [prompts[i] for i in idx]
            batch += [batch[0]] * (decoder.rows - len(idx))
            ids, mask = _left_pad(batch, pad_id, decoder.device)
            tokens = decoder.decode(ids, mask, eos, pad_id, cfg, tokenizer).tolist()
            for c in range(len(population)):
                for r, i in enumerate(idx):
                    results[c][i] = _finish(tokens[c][r], eos, cfg.stop_strings, tokenizer)
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
    every set; its cache fits the longest prompt of `sets` plus `decode.max_new_tokens`.
    attention, prefill_attention, groups, bucket, compact: `PopulationDecoder`'s; fuse: compile
    the layers with Inductor (on CUDA with decode.compile on; eager elsewhere)."""

    def __init__(self, model: Any, tokenizer: Any, space: PerturbSpace, decode: DecodeConfig, rows: int,
                 size: int, backend: str, sets: Sequence[PromptSet], attention: str = "fused_decode", groups: int = 1,
                 bucket: int = 64, compact: bool = False, prefill_attention: str = "sdpa_efficient", fuse: bool = True):
        longest = max(len(ids) for s in sets for ids in s.ids)
        max_len = -(-(longest + decode.max_new_tokens) // ALIGN) * ALIGN
        cuda = decode.compile and next(model.parameters()).device.type == "cuda"
        self.decoder = PopulationDecoder(model, space, size, rows, max_len, graphs=decode.compile,
                                         attention=attention, groups=groups, bucket=bucket, compact=compact,
                                         prefill_attention=prefill_attention,
                                         fuse="inductor" if fuse and cuda else None)
        self.tokenizer, self.decode, self.backend, self.rows, self.size = tokenizer, decode, backend, rows, size

    def warm_up(self, sets: Sequence[PromptSet]) -> None:
        """Decode every set once with the base model in every slot, untimed: compiles the layers
        for each set's prompt width and captures the decode step's graphs, so the timed search
        does neither."""
        for prompts in sets:
            self.texts([(0, 0.0)], prompts)

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

    def score(self, population: Sequence[tuple[int, float]], prompts: PromptSet,
              log: list[GenerationStats] | None = None) -> list[dict[str, Any]]:
        """`score_candidate`'s row for each candidate (its seconds: the chunk's time shared out);
        the chunk's GenerationStats is appended to `log` if given."""
        stats = GenerationStats()
        if log is not None:
            log.append(stats)
        texts = self.texts(population, prompts, stats)
        seconds = round(stats.seconds / len(population), 4)
        return [{**score_texts(prompts, row), "tokens": stats.generated_tokens // len(population), "seconds": seconds}
                for row in texts]
