"""Sanity baselines for val_bpb: a uniform and a unigram model scored exactly like a GPT."""

from __future__ import annotations

from typing import Any

from underpar.data import shards
from underpar.data.config import DataConfig
from underpar.data.manifest import TOKENIZER, load_manifest, split_files
from underpar.data.tokenizer import Tokenizer, build_byte_luts
from underpar.errors import UnderparError
from underpar.eval.bpb import count_tokens, evaluate_bpb, uniform_logits_fn, unigram_logits_fn
from underpar.ui import progress

BASELINES = ("uniform", "unigram")


def score_baseline(data: DataConfig, model: str, seq_len: int = 1024, batch_seqs: int = 8) -> dict[str, Any]:
    """val_bpb of a baseline model on the prepared validation shards."""
    if model not in BASELINES:
        raise UnderparError(f"unknown baseline model '{model}'; choose one of: {', '.join(BASELINES)}")
    if seq_len < 1:
        raise UnderparError(f"seq_len must be at least 1, got {seq_len}")
    manifest = load_manifest(data)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    luts = build_byte_luts(Tokenizer.load(f"{manifest['dir']}/{TOKENIZER}"), vocab_size)
    val_tokens = shards.load_tokens(split_files(manifest, "val"), vocab_size)
    if len(val_tokens) <= seq_len:
        raise UnderparError(f"the validation split has {len(val_tokens):,} tokens, too few for one window of "
                            f"seq_len={seq_len} (+1); use a shorter sequence length or more validation data")
    if model == "uniform":
        logits_fn = uniform_logits_fn(vocab_size)
    else:
        counts = count_tokens(shards.load_tokens(split_files(manifest, "train"), vocab_size), vocab_size)
        logits_fn = unigram_logits_fn(counts)
    with progress() as bar:
        scored = (len(val_tokens) - 1) // seq_len * seq_len  # the tail short of a window is not scored
        task = bar.add_task(f"scoring {model}", total=scored, info="")
        meter = evaluate_bpb(
            logits_fn, val_tokens, luts, seq_len, batch_seqs, progress=lambda n: bar.update(task, advance=n)
        )
    return {
        "model": model,
        "data": manifest["dir"],
        "val_bpb": meter.bpb,
        "val_loss": meter.loss,
        "tokens": meter.tokens,
        "bytes": meter.bytes,
    }
