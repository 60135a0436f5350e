"""A prepared data folder opened for training and scoring: its manifest, tokenizer, byte
tables, validation tokens and a rank-sliced train loader, read once and shared."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from underpar import dist
from underpar.data import shards
from underpar.data.config import DataConfig
from underpar.data.manifest import TOKENIZER, load_manifest, split_files
from underpar.data.prepare import prepare
from underpar.data.tokenizer import ByteLUTs, Tokenizer, build_byte_luts


class PreparedData:
    """What `underpar data prepare` wrote into one folder."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.dir = Path(manifest["dir"])

    @classmethod
    def open(cls, cfg: DataConfig) -> PreparedData:
        """An already prepared folder (a DataError says how to prepare it otherwise)."""
        return cls(load_manifest(cfg))

    @classmethod
    def ready(cls, cfg: DataConfig, env: dist.Env) -> PreparedData:
        """Prepare the data if needed (rank 0 only, the others wait), then open it on every rank."""
        if env.is_main:
            prepare(cfg)
        dist.barrier(env)
        return cls.open(cfg)

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def train_token_count(self) -> int:
        return self.manifest["tokens"]["train"]

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.dir / TOKENIZER)

    def byte_luts(self, vocab_size: int | None = None, device: torch.device | str = "cpu") -> ByteLUTs:
        """Byte tables for bpb, padded to a model's `vocab_size` (default: the tokenizer's)."""
        return build_byte_luts(self.tokenizer, vocab_size or self.vocab_size).to(device)

    @functools.cached_property
    def val_tokens(self) -> torch.Tensor:
        return shards.load_tokens(split_files(self.manifest, "val"), self.vocab_size)

    def train_tokens(self) -> torch.Tensor:
        return shards.load_tokens(split_files(self.manifest, "train"), self.vocab_size)

    def train_loader(self, rank: int = 0, world_size: int = 1) -> shards.TokenLoader:
        return shards.TokenLoader(split_files(self.manifest, "train"), rank, world_size, vocab_size=self.vocab_size)
