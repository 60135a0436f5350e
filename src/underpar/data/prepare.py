"""`underpar data prepare`: corpus -> tokenizer -> train/val token shards + manifest.json.

The output folder is built under a temporary name and renamed into place, so a failed run
leaves nothing behind; a second run on unchanged input does no work. An existing folder is
replaced only when it holds the same data with a damaged file (said in a line), or with
`--force` when it holds other prepared data; anything else is refused and left as it is.
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
from underpar.data import corpora, shards
from underpar.data.byte_count import target_bytes
from underpar.data.config import DATA_FIELDS, RECIPE, DataConfig, prepare_command
from underpar.data.manifest import MANIFEST, TOKENIZER, check_file, read_manifest
from underpar.data.tokenizer import Tokenizer, build_byte_luts, train_tokenizer
from underpar.errors import DataError
from underpar.ui import console, progress


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- what a folder holds

def _file_stats(path: str) -> list[Any]:
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root) if p != root else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _fingerprint(settings: dict[str, Any], path: str) -> str:
    """What the output depends on, cheap to compute: the settings and the input files' stats
    (files are read from `path`, so a moved corpus keeps its fingerprint)."""
    settings = {k: v for k, v in settings.items() if k != "out"}
    identity: list[Any] = [settings]
    if settings.get("source") in ("text", "jsonl"):
        identity += _file_stats(path)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _existing(out: Path) -> dict[str, Any] | str | None:
    """None (nothing at `out`, or an empty folder), a prepared folder's manifest, or why its
    manifest cannot be read. Anything else is refused: it is not ours to replace."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out} is a file, not a data folder; choose another data.out (data prepare: --out)")
    if not (out / MANIFEST).exists():
        if next(out.iterdir(), None) is None:
            return None
        raise DataError(f"{out} is not empty and holds no prepared data (no {MANIFEST}); it is left as is: "
                        "choose another data.out (data prepare: --out)")
    try:
        return read_manifest(out)
    except DataError as e:
        return str(e)


def _differences(manifest: dict[str, Any], cfg: DataConfig) -> list[str]:
    """How the data in a prepared folder differs from what `cfg` asks for ([] = the same)."""
    recorded = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    there = recorded.get("source", manifest.get("source"))
    if there != cfg.source:
        return [f"source = {there!r} there, {cfg.source!r} asked"]
    defaults = dataclasses.asdict(DataConfig())
    diffs = []
    for key in DATA_FIELDS[cfg.source]:
        old, new = recorded.get(key, defaults[key]), getattr(cfg, key)
        if key == "val_docs":  # compared by count: 0 (a tenth) and 1500 agree on the builtin corpus
            docs = manifest.get("documents") or {}
            old = docs.get("val")
            try:
                new = corpora.validation_count(new, docs.get("train", 0) + docs.get("val", 0))
            except DataError:
                pass
            key = "validation documents"
        elif key == "path" and _same_path(old, new):
            continue
        if old != new:
            diffs.append(f"{key} = {old!r} there, {new!r} asked")
    if cfg.source in ("text", "jsonl"):
        if manifest.get("recipe", 1) != RECIPE:
            diffs.append(f"it was made by underpar {manifest.get('underpar_version', '?')}, whose text recipe "
                         "differs (long documents, default val_docs)")
        elif _fingerprint(recorded, cfg.path) != manifest.get("fingerprint"):
            moved = not _same_path(recorded.get("path", ""), cfg.path)
            diffs.append(f"the files under {cfg.path} differ from those under {recorded.get('path')} it was prepared from"
                         if moved else f"the files under {cfg.path} changed since it was prepared (added, removed or modified)")
    return diffs


def _same_path(a: str, b: str) -> bool:
    return a == b or bool(a and b and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def _damage(out: Path, manifest: dict[str, Any]) -> str | None:
    """The first file of a prepared folder that does not match its manifest, or None."""
    entries = [*manifest["shards"], manifest["tokenizer"]]
    size = sum((out / e["file"]).stat().st_size for e in entries if (out / e["file"]).is_file())
    with progress(disable=size < 2**30) as bar:  # hashing runs at ~1 GB/s: show it past a second
        task = bar.add_task(f"checking {out.name}", total=len(entries), info="")
        for entry in entries:
            if (why := check_file(out / entry["file"], entry["sha256"])) is not None:
                return why
            bar.update(task, advance=1)
    return None


# ---------------------------------------------------------------- prepare

def prepare(cfg: DataConfig, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the prepared data folder; returns its manifest plus "dir" and "reused".
    `force` rebuilds it even when up to date and replaces a folder that holds other prepared
    data; a folder that holds anything else is never replaced."""
    out = cfg.out_dir
    fingerprint = _fingerprint(dataclasses.asdict(cfg), cfg.path)  # checks that the input path exists
    existing = _existing(out)
    if isinstance(existing, str):
        if not force:
            raise DataError(f"{existing}; the folder is left as is: choose another data.out, or replace it: "
                            f"{prepare_command(cfg, force=True)}")
        _say(f"replacing {out} (--force): {existing}")
    elif existing is not None:
        differs = _differences(existing, cfg)
        if differs and not force:
            raise DataError(f"{out} holds other prepared data ({'; '.join(differs)}); it is left as is: "
                            f"choose another data.out, or replace it: {prepare_command(cfg, force=True)}")
        damage = None if differs else _damage(out, existing)
        if not differs and damage is None and not force:
            return {**existing, "dir": str(out), "reused": True}
        if differs:
            _say(f"replacing {out} (--force): {'; '.join(differs)}")
        else:
            _say(f"{damage}: rebuilding {out} with the same settings" if damage else f"rebuilding {out} (--force)")

    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    work = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        started = time.time()
        stats = _fetch_fineweb(cfg, work) if cfg.source == "fineweb" else _tokenize_corpus(cfg, work)
        manifest = {
            "source": cfg.source,
            "fingerprint": fingerprint,
            "recipe": RECIPE,
            "config": dataclasses.asdict(cfg),
            "underpar_version": __version__,
            "seconds": round(time.time() - started, 1),
            **stats,
        }
        _add_token_stats(work, manifest)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(work, out)
    except BaseException as e:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for folder in made:  # the parents this run created, deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, DataError):
            where = f" ({e.filename})" if e.filename else ""
            raise DataError(f"cannot prepare {out}: {e.strerror or e}{where}; choose a folder you can write") from None
        raise
    return {**manifest, "dir": str(out), "reused": False}


def _replace(work: Path, out: Path) -> None:
    """Move the finished folder into place; the one it replaces goes only once it is there."""
    if not out.exists():
        os.replace(work, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "data")
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def _tokenize_corpus(cfg: DataConfig, work: Path) -> dict[str, Any]:
    started = time.perf_counter()
    with console.status(f"reading the {cfg.source} corpus"):
        documents = corpora.load_documents(
            cfg.source, cfg.path or None, field=cfg.field, min_chars=cfg.min_chars if cfg.source == "builtin" else None
        )
    train_docs, val_docs = corpora.split_documents(documents, val_docs=cfg.val_docs, seed=cfg.seed)
    rule = "" if cfg.val_docs else f" (val_docs=0: a tenth, at most {corpora.AUTO_VAL_DOCS:,})"
    _say(f"read {len(documents):,} documents in {time.perf_counter() - started:.1f} s: "
         f"{len(train_docs):,} to train on, {len(val_docs):,} to validate{rule}")
    # The built-in corpus keeps the reference's recipe (the trainer skips documents over its
    # sentence limit); a user's long documents are split so that every one trains it.
    train_tokenizer(train_docs, cfg.vocab_size, work / TOKENIZER, split_long_documents=cfg.source != "builtin", log=_say)
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
    pieces = Tokenizer.load(work / TOKENIZER).vocab_size
    if pieces != cfg.vocab_size:
        raise DataError(f"the FineWeb {cfg.fineweb_variant} tokenizer has {pieces} pieces, not vocab_size = "
                        f"{cfg.vocab_size}; pass --vocab {pieces}")
    return {
        "tokenizer": {"file": TOKENIZER, "sha256": corpora.sha256_file(work / TOKENIZER), "vocab_size": cfg.vocab_size},
        "shards": entries,
    }


def _add_token_stats(work: Path, manifest: dict[str, Any]) -> None:
    """Tokens and scored bytes per split, counted from the shards with the bpb byte rules
    (each shard's ids are checked against the vocabulary first)."""
    vocab_size = manifest["tokenizer"]["vocab_size"]
    luts = build_byte_luts(Tokenizer.load(work / TOKENIZER), vocab_size)
    tokens: dict[str, int] = {}
    scored: dict[str, int] = {}
    last: dict[str, torch.Tensor] = {}  # each split is one stream across its shards
    total = sum(shards.read_header(work / e["file"]) for e in manifest["shards"])
    with progress(disable=total < 50_000_000) as bar:
        task = bar.add_task("counting bytes", total=total, info="")
        for entry in manifest["shards"]:
            split = entry["split"]
            raw = shards.read_shard(work / entry["file"])
            shards.check_ids(work / entry["file"], raw, vocab_size)
            ids = torch.from_numpy(raw.astype(np.int64))
            entry["tokens"] = len(ids)
            tokens[split] = tokens.get(split, 0) + len(ids)
            stream = torch.cat([last.get(split, ids[:0]), ids])
            scored[split] = scored.get(split, 0) + int(target_bytes(stream[:-1], stream[1:], luts).sum())
            last[split] = ids[-1:]
            bar.update(task, advance=len(ids))
    manifest["tokens"] = tokens
    manifest["scored_bytes"] = scored  # the bpb denominator: every token after the first is a target
    manifest["bytes_per_token"] = {s: round(scored[s] / max(1, tokens[s] - 1), 4) for s in tokens}


