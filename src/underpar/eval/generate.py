"""Batched greedy decoding with a KV cache for Hugging Face causal LMs (Llama, Qwen2, ...),
for scoring many prompts: fine-tuning evaluation and RandOpt population scoring.

Three engines give the same tokens: "hf" (`model.generate`, the reference), "loop" (prefill +
decode with a `DynamicCache`) and "static" (a preallocated `StaticCache` and a fixed-shape
decode step that `torch.compile(mode="reduce-overhead")` turns into a CUDA graph on CUDA).

Prompts are token-id lists (already chat-templated) or strings; strings are tokenized with
`add_special_tokens=False` because templated text already carries its BOS/special tokens.
A `Completion` keeps the generated ids up to and including the token that ended it (an EOS id,
or the token that completed a stop string); its `text` is decoded without special tokens and
stops before the stop string. Needs transformers >= 5 (a `StaticLayer` tracks its own write
position; forwards take no `cache_position`).
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from underpar.config import bounded, choice, items, validate
from underpar.errors import ConfigError, UnderparError

ENGINES = ("static", "hf", "loop")
LENGTH_BUCKET = 64  # static cache length is rounded up to this, so similar calls share a graph


@dataclass
class DecodeConfig:
    max_new_tokens: int = bounded(256, 1)
    batch_size: int = bounded(64, 1)
    engine: str = choice("static", ENGINES)
    stop_strings: list[str] = items([])
    compile: bool = False  # static engine on CUDA only: torch.compile the decode step
    # compiled step: Inductor's deterministic mode (reduction kernels get one config by rule
    # instead of the fastest of several timed on the device at first run, a choice that can
    # differ between processes and changes the reduction order, hence bf16 greedy paths)
    deterministic: bool = False
    check_every: int = bounded(16, 1)  # decode steps between host syncs ("all finished?")

    def check(self) -> None:
        if any(not s for s in self.stop_strings):
            raise ConfigError("stop_strings must not contain an empty string")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # ended by EOS or a stop string (False: ran out of max_new_tokens)


@dataclass
class GenerationStats:
    """Filled in by `generate(..., stats=GenerationStats())` for throughput reports."""

    prompts: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens kept in the completions
    decode_steps: int = 0  # forward calls after prefill, summed over batches
    seconds: float = 0.0
    compiled: bool = False

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


StepFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def eos_ids_of(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id plus every EOS id of the model's generation config."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return sorted({int(i) for i in ids if i is not None})


def _pick(logits_bv: Tensor, finished_b: Tensor, eos_t: Tensor, pad_id: int):
    """Greedy token per row; finished rows get `pad_id` and stay finished."""
    tok_b = torch.where(finished_b, pad_id, logits_bv.argmax(-1))
    return tok_b, finished_b | torch.isin(tok_b, eos_t)


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    cfg: DecodeConfig | None = None,
    stats: GenerationStats | None = None,
) -> list[Completion]:
    """Greedy completions of `prompts`, in input order (batches are formed by length)."""
    cfg = cfg or DecodeConfig()
    validate(cfg)
    if prompts and isinstance(prompts[0], str):
        prompts = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise UnderparError("an empty prompt cannot be continued: give every prompt a token")
    eos = eos_ids_of(model, tokenizer)
    pad_id = next(i for i in (tokenizer.pad_token_id, *eos, 0) if i is not None)
    device = next(model.parameters()).device
    stats = stats if stats is not None else GenerationStats()

    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: OOM early
    decoder = None
    if cfg.engine == "static" and prompts:
        rows = min(cfg.batch_size, len(prompts))
        longest = -(-len(prompts[order[0]]) // LENGTH_BUCKET) * LENGTH_BUCKET
        decoder = _static_decoder(model, rows, longest + cfg.max_new_tokens, cfg.compile, cfg.deterministic)
    results: list[Completion] = [None] * len(prompts)  # type: ignore[list-item]
    was_training = model.training
    model.eval()  # dropout off: greedy decoding is deterministic
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for b in range(0, len(order), cfg.batch_size):
                idx = order[b : b + cfg.batch_size]
                batch = [prompts[i] for i in idx]
                if decoder is not None:  # fixed batch shape: repeat a prompt in the empty rows
                    batch += [batch[0]] * (decoder.rows - len(batch))
                ids_bp, mask_bp = _left_pad(batch, pad_id, device)
                if cfg.engine == "hf":
                    out = _hf_batch(model, ids_bp, mask_bp, cfg, eos, pad_id)
                else:
                    out = _decode_batch(model, ids_bp, mask_bp, cfg, eos, pad_id, tokenizer,
                                        decoder)
                for i, gen in zip(idx, out):
                    results[i] = _finish(gen, eos, cfg.stop_strings, tokenizer)
                stats.batches += 1
                stats.decode_steps += len(out[0]) - 1
    finally:
        model.train(was_training)
    stats.prompts += len(prompts)
    stats.prompt_tokens += sum(map(len, prompts))
    stats.generated_tokens += sum(len(c.token_ids) for c in results)
    stats.seconds += time.perf_counter() - start
    stats.compiled = decoder is not None and decoder.compiled
    return results


def _left_pad(batch: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for r, p in enumerate(batch):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def _positions(mask_bp: Tensor) -> Tensor:
    """Position ids that count real tokens only (pads get 0, as `generate` does)."""
    return (mask_bp.long().cumsum(-1) - 1).clamp(min=0)


def _hf_batch(model, ids_bp, mask_bp, cfg, eos, pad_id) -> list[list[int]]:
    # Explicit settings override sampling/penalty defaults in the model's generation_config,
    # so the reference is plain greedy. Stop strings are applied afterwards, as for the others.
    seqs = model.generate(
        input_ids=ids_bp,
        attention_mask=mask_bp.long(),
        max_new_tokens=cfg.max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
    )
    return seqs[:, ids_bp.shape[1] :].tolist()


def _decode_batch(model, ids_bp, mask_bp, cfg, eos, pad_id, tokenizer, decoder):
    eos_t = torch.tensor(eos, dtype=torch.long, device=ids_bp.device)
    if decoder is None:
        return _run(_loop_start(model, ids_bp, mask_bp, eos_t, pad_id), cfg, tokenizer)
    try:
        return _run(decoder.start(ids_bp, mask_bp, eos_t, pad_id), cfg, tokenizer)
    except Exception as e:  # noqa: BLE001 - compile problems surface on the first calls
        if not decoder.compiled:
            raise
        warnings.warn(f"compiled decode step failed ({type(e).__name__}: {e}); running eagerly")
        decoder.use_eager()
        return _run(decoder.start(ids_bp, mask_bp, eos_t, pad_id), cfg, tokenizer)


def _run(start: tuple[Tensor, Tensor, Tensor, StepFn], cfg: DecodeConfig, tokenizer):
    """Feed each row's last token until `max_new_tokens`; host syncs only every `check_every`
    steps, to stop early once all rows hit EOS or a stop string."""
    tok_b, pos_b, finished_b, step = start
    out_bt = tok_b.new_empty((tok_b.shape[0], cfg.max_new_tokens))
    out_bt[:, 0] = tok_b
    done = 1
    while done < cfg.max_new_tokens:
        if done % cfg.check_every == 0:
            if cfg.stop_strings:
                finished_b = finished_b | _has_stop(out_bt[:, :done], cfg.stop_strings, tokenizer)
            if bool(finished_b.all()):
                break
        tok_b, pos_b, finished_b = step(tok_b, pos_b, finished_b)
        out_bt[:, done] = tok_b
        done += 1
    return out_bt[:, :done].tolist()


def _has_stop(out_bt: Tensor, stop_strings: list[str], tokenizer) -> Tensor:
    texts = tokenizer.batch_decode(out_bt.tolist(), skip_special_tokens=True)
    return torch.tensor([any(s in t for s in stop_strings) for t in texts], device=out_bt.device)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The forward argument that takes the KV cache: `cache` since transformers 5.24 (where
    `past_key_values` still works but warns that it goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(model, cache, **kwargs) -> Tensor:
    return model(**kwargs, **{_cache_argument(type(model)): cache}, use_cache=True).logits


def _prefill(model, ids_bp, mask_bp, attention_mask, cache, eos_t, pad_id):
    logits = _forward(model, cache, input_ids=ids_bp, attention_mask=attention_mask,
                      position_ids=_positions(mask_bp), logits_to_keep=1)
    no_row_finished = torch.zeros(ids_bp.shape[0], dtype=torch.bool, device=ids_bp.device)
    tok_b, finished_b = _pick(logits[:, -1], no_row_finished, eos_t, pad_id)
    return tok_b, mask_bp.sum(-1), finished_b  # the first new token sits at position len(prompt)


def _loop_start(model, ids_bp, mask_bp, eos_t, pad_id):
    """`DynamicCache` and a mask that grows by one column per step, as `generate` does."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = mask_bp.long()

    def step(tok_b, pos_b, finished_b):
        nonlocal mask
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        logits = _forward(model, cache, input_ids=tok_b[:, None], attention_mask=mask, position_ids=pos_b[:, None])
        tok_b, finished_b = _pick(logits[:, -1], finished_b, eos_t, pad_id)
        return tok_b, pos_b + 1, finished_b

    return (*_prefill(model, ids_bp, mask_bp, mask, cache, eos_t, pad_id), step)


class _StaticDecoder:
    """A `StaticCache` of (rows, max_len) and a fixed-shape decode step. Kept on the model
    (like `generate`'s own compiled call) so repeated calls, e.g. RandOpt scoring with weights
    changed in place, reuse one compiled graph; a different shape replaces it."""

    def __init__(self, model, key: tuple, compile: bool, deterministic: bool = False) -> None:
        from transformers import StaticCache

        self.model, self.key = model, key
        self.rows, self.max_len = key[0], key[1]
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.compiled = compile
        # reduce-overhead = CUDA graphs; options cannot be combined with a mode, so spell it out
        options = {"triton.cudagraphs": True, "deterministic": True} if deterministic else None
        self._compiled_step = (torch.compile(self._step, options=options) if deterministic
                               else torch.compile(self._step, mode="reduce-overhead")) if compile else None

    def __deepcopy__(self, memo):  # a copied model builds its own decoder
        return None

    def use_eager(self) -> None:
        self.compiled, self._compiled_step = False, None

    def _step(self, tok_b, pos_b, finished_b, mask_bl, eos_t, pad_id: int):
        logits = _forward(self.model, self.cache, input_ids=tok_b[:, None], attention_mask=mask_bl,
                          position_ids=pos_b[:, None])
        tok_b, finished_b = _pick(logits[:, -1], finished_b, eos_t, pad_id)
        return tok_b, pos_b + 1, finished_b

    def start(self, ids_bp, mask_bp, eos_t, pad_id):
        self.cache.reset()  # in place: the cache tensors keep their (graph-captured) addresses
        # One mask over every cache slot for the whole batch: prompt padding, then ones; the
        # causal mask hides slots not yet written, so the decode step never changes shape.
        mask_bl = torch.ones((self.rows, self.max_len), dtype=torch.bool, device=ids_bp.device)
        mask_bl[:, : ids_bp.shape[1]] = mask_bp

        def step(tok_b, pos_b, finished_b):
            if self._compiled_step is None:
                return self._step(tok_b, pos_b, finished_b, mask_bl, eos_t, pad_id)
            torch.compiler.cudagraph_mark_step_begin()
            out = self._compiled_step(tok_b, pos_b, finished_b, mask_bl, eos_t, pad_id)
            return tuple(t.clone() for t in out)  # graph outputs are overwritten by the next replay

        return (*_prefill(self.model, ids_bp, mask_bp, mask_bl, self.cache, eos_t, pad_id), step)


def _static_decoder(model, rows: int, max_len: int, compile: bool, deterministic: bool = False) -> _StaticDecoder:
    param = next(model.parameters())
    compile = compile and param.device.type == "cuda"
    key = (rows, max_len, compile, str(param.device), param.dtype, compile and deterministic)
    decoder = getattr(model, "_underpar_static_decoder", None)
    # A decoder with room for longer sequences serves shorter ones too: one graph, no recompiles.
    if decoder is None or decoder.key[0] != rows or decoder.key[2:] != key[2:] or decoder.max_len < max_len:
        decoder = _StaticDecoder(model, key, compile, deterministic)
        model._underpar_static_decoder = decoder
    return decoder


def _finish(gen: list[int], eos: list[int], stop_strings: list[str], tokenizer) -> Completion:
    """Cut at the first EOS (kept in `token_ids`, not in `text`), then at the first stop string:
    keep the fewest tokens whose text contains it, and the text before it."""
    cut = next((n for n, t in enumerate(gen) if t in eos), None)
    ids = gen if cut is None else gen[: cut + 1]
    body = ids if cut is None else ids[:-1]
    text = tokenizer.decode(body, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop_strings if s in text]
    if not hits:
        return Completion(text, ids, cut is not None)
    at = min(hits)[0]
    lo, hi = 1, len(body)  # smallest prefix whose text holds a stop string (monotone in length)
    while lo < hi:
        mid = (lo + hi) // 2
        piece = tokenizer.decode(body[:mid], skip_special_tokens=True)
        lo, hi = (lo, mid) if any(s in piece for s in stop_strings) else (mid + 1, hi)
    return Completion(text[:at], body[:lo], True)
