"""`DataConfig`: where tokens come from and where the prepared shards live, and the
`underpar data prepare` command line that builds a config's folder."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from underpar.config import bounded, choice
from underpar.data import corpora
from underpar.errors import ConfigError

SOURCES = ("builtin", "text", "jsonl", "fineweb")
# The settings each source's data depends on (the others are ignored for it). A text or
# jsonl corpus is compared by its files' names, sizes and times, wherever it now lies.
DATA_FIELDS = {
    "builtin": ("vocab_size", "val_docs", "min_chars", "seed", "shard_tokens"),
    "text": ("vocab_size", "val_docs", "seed", "shard_tokens"),
    "jsonl": ("field", "vocab_size", "val_docs", "seed", "shard_tokens"),
    "fineweb": ("path", "vocab_size", "fineweb_variant", "fineweb_train_shards"),
}
# How text and jsonl corpora are prepared; recipe 1 (no "recipe" in the manifest) let the
# tokenizer trainer skip documents over 4,192 bytes and held out 1,500 documents by default.
RECIPE = 2


@dataclasses.dataclass
class DataConfig:
    """Where tokens come from and where the prepared shards live."""

    source: str = choice("builtin", SOURCES)
    path: str = ""  # input file or folder for text / jsonl; a local hub mirror for fineweb
    field: str = "text"  # the jsonl field holding the document
    vocab_size: int = bounded(1024, 260, 65536)  # 256 byte-fallback pieces + 4 control ids
    # Documents held out for validation; 0 = a tenth of them, at most 1,500 (builtin: 1,500).
    val_docs: int = bounded(0, 0)
    min_chars: int = bounded(200, 0)  # builtin: drop passages shorter than this
    seed: int = 1337  # document shuffle before the train/val split
    shard_tokens: int = bounded(100_000_000, 1, 2**31 - 1)
    fineweb_variant: str = "sp1024"
    fineweb_train_shards: int = bounded(1, 1)
    out: str = ""  # "" = $UNDERPAR_CACHE/datasets/<source>_sp<vocab>

    def check(self) -> None:
        if self.source in ("text", "jsonl") and not self.path:
            raise ConfigError(f"data.source = {self.source} needs data.path (data prepare: --path), a file or folder")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        return corpora.cache_dir() / "datasets" / f"{self.source}_sp{self.vocab_size}"


def prepare_command(cfg: DataConfig, force: bool = False) -> str:
    """The `underpar data prepare` line that builds `cfg`'s folder."""
    parts = ["underpar data prepare", f"--source {cfg.source}", f"--vocab {cfg.vocab_size}"]
    if cfg.path or cfg.source in ("text", "jsonl"):
        parts.append(f"--path {shlex.quote(cfg.path) if cfg.path else 'CORPUS'}")
    parts.append(f"--out {shlex.quote(str(cfg.out_dir))}")
    defaults = DataConfig()
    for key in DATA_FIELDS[cfg.source]:
        if key not in ("path", "vocab_size") and getattr(cfg, key) != getattr(defaults, key):
            parts.append(f"--set {shlex.quote(f'{key}={getattr(cfg, key)}')}")
    return " ".join(parts + (["--force"] if force else []))
