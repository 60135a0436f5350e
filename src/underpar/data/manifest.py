"""Reading a prepared data folder: its manifest.json, checked for the fields readers use, and
its files, each checked against the manifest's sha256 (once per process per file)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from underpar import config as cfglib
from underpar.data import corpora
from underpar.data.config import DataConfig, prepare_command
from underpar.errors import ConfigError, DataError

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"


def read_manifest(folder: Path) -> dict[str, Any]:
    """A prepared folder's manifest, checked for the fields every reader uses."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e})") from None
    entries = manifest.get("shards") if isinstance(manifest, dict) else None
    tokenizer = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    if not (isinstance(entries, list) and all(isinstance(e, dict) and {"file", "split", "sha256"} <= e.keys() for e in entries)
            and isinstance(tokenizer, dict) and {"file", "sha256", "vocab_size"} <= tokenizer.keys()):
        raise DataError(f"{path} is not a manifest written by `underpar data prepare` (fields are missing)")
    return manifest


_SHA256: dict[tuple[str, int, int], str] = {}  # verified files of this process, by stat


def _sha256(path: Path) -> str:
    """sha256 of a file, computed once per process for an unchanged file (a run checks its
    shards when preparing and again when loading them)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = corpora.sha256_file(path)
    return _SHA256[key]


def check_file(path: Path, sha256: str) -> str | None:
    """Why `path` is not the file the manifest lists, or None."""
    if not path.is_file():
        return f"{path} is missing"
    if _sha256(path) != sha256:
        return f"{path} fails its sha256 check against {MANIFEST} (damaged or modified since it was prepared)"
    return None


def _rebuild_hint(manifest: dict[str, Any]) -> str:
    """How to rebuild a damaged folder: prepare it again with the settings it was made with."""
    recorded = manifest.get("config")
    try:
        fields = {f.name for f in dataclasses.fields(DataConfig)}
        cfg = cfglib.from_dict(DataConfig, {k: v for k, v in recorded.items() if k in fields} | {"out": manifest["dir"]})
        return f"prepare it again: {prepare_command(cfg)}"
    except (AttributeError, TypeError, ConfigError):
        return f"prepare it again with the settings in its {MANIFEST}"


def load_manifest(cfg: DataConfig) -> dict[str, Any]:
    """The manifest of an already prepared folder, with "dir" added; its tokenizer is checked
    against the manifest's sha256."""
    out = cfg.out_dir
    if not (out / MANIFEST).is_file():
        why = "does not exist" if not out.exists() else f"has no {MANIFEST}"
        raise DataError(f"no prepared data at {out} (the folder {why}); prepare it: {prepare_command(cfg)}")
    manifest = {**read_manifest(out), "dir": str(out)}
    if (why := check_file(out / manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"])) is not None:
        raise DataError(f"{why}; {_rebuild_hint(manifest)}")
    return manifest


def split_files(manifest: dict[str, Any], split: str) -> list[Path]:
    """The shards of one split, each checked against the manifest's sha256 (once per process)."""
    out = Path(manifest["dir"])
    files = [out / e["file"] for e in manifest["shards"] if e["split"] == split]
    if not files:
        raise DataError(f"prepared data at {out} has no {split} shards")
    for entry in (e for e in manifest["shards"] if e["split"] == split):
        if (why := check_file(out / entry["file"], entry["sha256"])) is not None:
            raise DataError(f"{why}; {_rebuild_hint(manifest)}")
    return files
