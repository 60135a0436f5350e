"""`underpar data prepare`: corpus -> tokenizer -> train/val token shards + manifest.json.

The output folder is built under a temporary name and renamed into place, so a failed run
leaves nothing that looks complete; a second run on unchanged input does no work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from underpar import __version__
from underpar.config import bounded, choice
from underpar.data import corpora, shards
from underpar.data.byte_count import target_bytes
from underpar.data.tokenizer import Tokenizer, build_byte_luts, train_tokenizer
from underpar.errors import ConfigError, DataError
from underpar.ui import console, progress

SOURCES = ("builtin", "text", "jsonl", "fineweb")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


@dataclasses.dataclass
class DataConfig:
    """Where tokens come from and where the prepared shards live."""

    source: str = choice("builtin", SOURCES)
    path: str = ""  # input file or folder for text / jsonl; a local hub mirror for fineweb
    field: str = "text"  # the jsonl field holding the document
    vocab_size: int = bounded(1024, 260, 65536)  # 256 byte-fallback pieces + 4 control ids
    val_docs: int = bounded(1500, 1)
    min_chars: int = bounded(200, 0)  # builtin: drop passages shorter than this
    seed: int = 1337  # document shuffle before the train/val split
    shard_tokens: int = bounded(100_000_000, 1)
    fineweb_variant: str = "sp1024"
    fineweb_train_shards: int = bounded(1, 1)
    out: str = ""  # "" = $UNDERPAR_CACHE/datasets/<source>_sp<vocab>

    def check(self) -> None:
        if self.source in ("text", "jsonl") and not self.path:
            raise ConfigError(f"data.source = {self.source} needs data.path (a file or folder)")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out).expanduser()
        return corpora.cache_dir() / "datasets" / f"{self.source}_sp{self.vocab_size}"


def _input_identity(cfg: DataConfig) -> list[Any]:
    """What the output depends on, cheap to compute: settings and the input files' stats."""
    settings = dataclasses.asdict(cfg)
    settings.pop("out")
    identity: list[Any] = [settings]
    if cfg.source in ("text", "jsonl"):
        root = Path(cfg.path).expanduser()
        if not root.exists():
            raise DataError(f"data path {root} does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        identity += [(str(p.relative_to(root) if p != root else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return identity


def _fingerprint(cfg: DataConfig) -> str:
    text = json.dumps(_input_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_complete(out: Path, fingerprint: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for entry in manifest["shards"] + [manifest["tokenizer"]]:
        path = out / entry["file"]
        if not path.is_file() or corpora.sha256_file(path) != entry["sha256"]:
            return None
    return manifest


def prepare(cfg: DataConfig, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the prepared data folder; returns its manifest plus "dir" and "reused"."""
    out = cfg.out_dir
    fingerprint = _fingerprint(cfg)
    if not force and (manifest := _is_complete(out, fingerprint)) is not None:
        return {**manifest, "dir": str(out), "reused": True}

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        started = time.time()
        if cfg.source == "fineweb":
            stats = _fetch_fineweb(cfg, work)
        else:
            stats = _tokenize_corpus(cfg, work)
        manifest = {
            "source": cfg.source,
            "fingerprint": fingerprint,
            "config": dataclasses.asdict(cfg),
            "underpar_version": __version__,
            "seconds": round(time.time() - started, 1),
            **stats,
        }
        _add_token_stats(work, manifest)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {**manifest, "dir": str(out), "reused": False}


def _tokenize_corpus(cfg: DataConfig, work: Path) -> dict[str, Any]:
    with console.status(f"reading the {cfg.source} corpus"):
        documents = corpora.load_documents(
            cfg.source, cfg.path or None, field=cfg.field, min_chars=cfg.min_chars if cfg.source == "builtin" else None
        )
        train_docs, val_docs = corpora.split_documents(documents, val_docs=cfg.val_docs, seed=cfg.seed)
    with console.status(f"training a {cfg.vocab_size}-piece BPE tokenizer on {len(train_docs):,} documents"):
        train_tokenizer(train_docs, cfg.vocab_size, work / TOKENIZER)
    tokenizer = Tokenizer.load(work / TOKENIZER)
    shard_list = []
    with progress() as bar:
        for split, docs in (("val", val_docs), ("train", train_docs)):
            task = bar.add_task(f"tokenizing {split}", total=len(docs), info="")
            pieces = []
            for start in range(0, len(docs), 1000):
                batch = docs[start : start + 1000]
                for ids in tokenizer.encode_documents(batch):
                    pieces.append(np.asarray([tokenizer.bos_id, *ids], dtype=np.uint16))
                bar.update(task, advance=len(batch))
            tokens = np.concatenate(pieces)
            shard_list += _write_shards(work, split, tokens, cfg.shard_tokens)
    return {
        "documents": {"train": len(train_docs), "val": len(val_docs)},
        "text_bytes": {
            "train": sum(len(d.encode("utf-8")) for d in train_docs),
            "val": sum(len(d.encode("utf-8")) for d in val_docs),
        },
        "tokenizer": {"file": TOKENIZER, "sha256": corpora.sha256_file(work / TOKENIZER), "vocab_size": cfg.vocab_size},
        "shards": shard_list,
    }


def _write_shards(work: Path, split: str, tokens: np.ndarray, shard_tokens: int) -> list[dict[str, Any]]:
    entries = []
    for index, start in enumerate(range(0, len(tokens), shard_tokens)):
        name = f"{split}_{index:06d}.bin"
        shards.write_shard(work / name, tokens[start : start + shard_tokens])
        entries.append({"file": name, "split": split, "sha256": corpora.sha256_file(work / name)})
    return entries


def _fetch_fineweb(cfg: DataConfig, work: Path) -> dict[str, Any]:
    files = corpora.fineweb_download(
        work, variant=cfg.fineweb_variant, train_shards=cfg.fineweb_train_shards, local_root=cfg.path or None
    )
    entries = []
    for split in ("val", "train"):
        for path in files[split]:
            path = Path(path)
            entries.append({"file": str(path.relative_to(work)), "split": split, "sha256": corpora.sha256_file(path)})
    tokenizer = Path(files["tokenizer"])
    shutil.copyfile(tokenizer, work / TOKENIZER)
    return {
        "tokenizer": {"file": TOKENIZER, "sha256": corpora.sha256_file(work / TOKENIZER), "vocab_size": cfg.vocab_size},
        "shards": entries,
    }


def _add_token_stats(work: Path, manifest: dict[str, Any]) -> None:
    """Tokens and scored bytes per split, counted from the shards with the bpb byte rules."""
    luts = build_byte_luts(Tokenizer.load(work / TOKENIZER), manifest["tokenizer"]["vocab_size"])
    tokens: dict[str, int] = {}
    scored: dict[str, int] = {}
    last: dict[str, torch.Tensor] = {}  # each split is one stream across its shards
    for entry in manifest["shards"]:
        split = entry["split"]
        ids = torch.from_numpy(shards.read_shard(work / entry["file"]).astype(np.int64))
        entry["tokens"] = len(ids)
        tokens[split] = tokens.get(split, 0) + len(ids)
        stream = torch.cat([last.get(split, ids[:0]), ids])
        scored[split] = scored.get(split, 0) + int(target_bytes(stream[:-1], stream[1:], luts).sum())
        last[split] = ids[-1:]
    manifest["tokens"] = tokens
    manifest["scored_bytes"] = scored  # the bpb denominator: every token after the first is a target
    manifest["bytes_per_token"] = {s: round(scored[s] / max(1, tokens[s] - 1), 4) for s in tokens}


def load_manifest(cfg: DataConfig) -> dict[str, Any]:
    """The manifest of an already prepared folder, with absolute shard paths by split."""
    out = cfg.out_dir
    path = out / MANIFEST
    if not path.is_file():
        raise DataError(f"no prepared data at {out}; run `underpar data prepare --source {cfg.source} --vocab {cfg.vocab_size}` first")
    manifest = json.loads(path.read_text())
    return {**manifest, "dir": str(out)}


def split_files(manifest: dict[str, Any], split: str) -> list[Path]:
    files = [Path(manifest["dir"]) / e["file"] for e in manifest["shards"] if e["split"] == split]
    if not files:
        raise DataError(f"prepared data at {manifest['dir']} has no {split} shards")
    return files
