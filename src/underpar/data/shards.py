"""Token shards in the 20240520 format (parameter-golf / modded-nanogpt): read, write, and a
deterministic rank-sliced training stream over them."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from underpar.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_BYTES = 1024
_HEADER_INTS = HEADER_BYTES // 4
_MAX_TOKEN = 65535

PathLike = str | os.PathLike[str]


def write_shard(path: PathLike, tokens: object) -> None:
    """Write `tokens` (1-D ints in [0, 65535]) as a shard; the file appears complete or not at all."""
    path = Path(path)
    tokens_n = np.asarray(tokens)
    if tokens_n.ndim != 1:
        raise DataError(f"{path}: tokens must be 1-D, got shape {tokens_n.shape}; flatten them first")
    if tokens_n.size and not np.issubdtype(tokens_n.dtype, np.integer):
        raise DataError(f"{path}: tokens must be integers, got dtype {tokens_n.dtype}")
    if tokens_n.size:
        lo, hi = int(tokens_n.min()), int(tokens_n.max())
        if lo < 0 or hi > _MAX_TOKEN:
            bad = lo if lo < 0 else hi
            index = int(np.argmax(tokens_n == bad))
            raise DataError(
                f"{path}: token {bad} at index {index} is outside [0, {_MAX_TOKEN}]; "
                "shards store uint16 ids, so use a vocabulary of at most 65536 tokens"
            )
    if tokens_n.size >= 2**31:
        raise DataError(f"{path}: {tokens_n.size} tokens do not fit one shard; split them into several")

    header = np.zeros(_HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens_n.size)
    # Write under a temporary name in the same folder so os.replace is an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens_n.astype("<u2").tobytes())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def read_header(path: PathLike) -> int:
    """Validate the shard's header and size; return its number of tokens."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: shard not found; check the path or download/prepare the data") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    hint = "re-download or rewrite the shard"
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header; {hint}")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic {magic}, expected {MAGIC}; not a token shard in this format")
    if version != VERSION:
        raise DataError(f"{path}: unsupported version {version}, expected {VERSION}; {hint}")
    if num_tokens < 0:
        raise DataError(f"{path}: header says {num_tokens} tokens, which is negative; {hint}")
    expected = HEADER_BYTES + 2 * num_tokens
    if size != expected:
        what = "truncated" if size < expected else "extra bytes"
        raise DataError(
            f"{path}: {what}: {size} bytes, header says {num_tokens} tokens = {expected} bytes; {hint}"
        )
    return num_tokens


def read_shard(path: PathLike) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (validated first)."""
    num_tokens = read_header(path)
    if num_tokens == 0:  # an empty file region cannot be memory-mapped
        return np.empty(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def check_ids(path: PathLike, tokens: np.ndarray, vocab_size: int) -> None:
    """Every id of a shard's `tokens` lies below `vocab_size`, else a DataError naming the file
    (a damaged shard, or one made with another tokenizer). One max over the shard: cheap."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        index = int(np.argmax(tokens >= vocab_size))
        raise DataError(
            f"{path}: token id {int(tokens[index])} at position {index} is outside the vocabulary of "
            f"{vocab_size} ids; the shard is damaged or was made with another tokenizer: prepare it again"
        )


def find_shards(pattern: str) -> list[Path]:
    """Sorted files matching a glob such as "DIR/fineweb_train_*.bin"."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataError(f"no shards match {pattern!r}; check the data directory and file pattern")
    return files


def _as_files(files: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        return find_shards(os.fspath(files))
    paths = [Path(f) for f in files]
    if not paths:
        raise DataError("no shard files given; pass a non-empty list or a glob pattern")
    return paths


def load_tokens(files: PathLike | Sequence[PathLike], vocab_size: int | None = None) -> torch.Tensor:
    """All tokens of the shards (a glob or a list, in order) as one 1-D torch.int32 tensor;
    with `vocab_size`, every id is checked to lie below it.

    int32 holds every uint16 id, halves the memory of int64 and supports the indexing and
    arithmetic torch's uint16 lacks; cast slices with .long() where embeddings need it.
    """
    paths = _as_files(files)
    lengths = [read_header(p) for p in paths]
    out = np.empty(sum(lengths), dtype=np.int32)
    start = 0
    for path, n in zip(paths, lengths):
        tokens = read_shard(path)
        if vocab_size is not None:
            check_ids(path, tokens, vocab_size)
        out[start : start + n] = tokens
        start += n
    return torch.from_numpy(out)


class TokenLoader:
    """Deterministic stream of (x, y) batches over train shards, sliced by rank.

    Each call takes the next (tokens_per_rank + 1) * world_size tokens of a cyclic stream over
    the files; rank r keeps span r. So world_size=1 called twice yields what ranks 0 and 1 of
    world_size=2 get from one call: gradient accumulation equals data parallelism.
    """

    def __init__(self, files: PathLike | Sequence[PathLike], rank: int = 0, world_size: int = 1,
                 vocab_size: int | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"TokenLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.files = _as_files(files)
        self.rank, self.world_size = rank, world_size
        self.vocab_size = vocab_size  # when set, each file's ids are checked as it is opened
        self._lengths = [read_header(p) for p in self.files]  # headers only; bodies load lazily
        if sum(self._lengths) == 0:
            raise DataError(f"all {len(self.files)} shards are empty (first: {self.files[0]}); nothing to train on")
        self._file_index, self._position = 0, 0
        self._open_index: int | None = None
        self._open_tokens: np.ndarray | None = None
        self._staged: list[tuple[torch.Tensor, torch.cuda.Event]] | None = None  # CUDA batches only
        self._staged_turn = 0

    def _tokens(self, file_index: int) -> np.ndarray:
        if self._open_index != file_index:  # one file open at a time
            self._open_tokens = read_shard(self.files[file_index])
            if self.vocab_size is not None:
                check_ids(self.files[file_index], self._open_tokens, self.vocab_size)
            self._open_index = file_index
        assert self._open_tokens is not None
        return self._open_tokens

    def _pieces(self, count: int) -> Iterator[tuple[int, int, int]]:
        """Advance the stream by `count` tokens, yielding (file index, start, length) of each
        piece within one file; a piece counts as consumed once the caller asks for the next."""
        while count > 0:
            available = self._lengths[self._file_index] - self._position
            if available == 0:
                self._file_index = (self._file_index + 1) % len(self.files)
                self._position = 0
                continue
            k = min(count, available)
            yield self._file_index, self._position, k
            self._position += k
            count -= k

    def _skip(self, count: int) -> None:
        """Advance without reading (other ranks' spans): no file is opened."""
        for _ in self._pieces(count):
            pass

    def _fill(self, out: np.ndarray) -> None:
        """The next len(out) tokens of the stream, converted into `out` in place."""
        filled = 0
        for file_index, start, k in self._pieces(len(out)):
            out[filled : filled + k] = self._tokens(file_index)[start : start + k]
            filled += k

    def _staging(self, span: int) -> tuple[torch.Tensor, torch.cuda.Event]:
        """The next of two pinned host buffers of `span` int64 tokens, free to overwrite: the
        copy that last read it (two calls ago) has finished. Two, so that filling one overlaps
        the copy of the other; reallocated when the batch size changes."""
        if self._staged is None or self._staged[0][0].numel() != span:
            self._staged = [(torch.empty(span, dtype=torch.int64, pin_memory=True),
                             torch.cuda.Event()) for _ in range(2)]
            self._staged_turn = 0
        buffer, copied = self._staged[self._staged_turn]
        self._staged_turn ^= 1
        copied.synchronize()  # returns at once for an event never recorded
        return buffer, copied

    def next_batch(self, tokens_per_rank: int, seq_len: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (tokens_per_rank // seq_len, seq_len) int64, on
        `device` (default: the CPU).

        The ids go from the shards straight into one int64 buffer (no per-piece arrays, no
        concatenation, no second converted copy). For a CUDA `device` that buffer is one of
        two reused pinned ones and the host-to-device copy is asynchronous, so the host can
        queue the next micro-step while it runs; the returned tensors are fresh on the device
        (the caller may keep them), and a pinned buffer is refilled only after its copy has
        completed (an event per buffer).
        """
        if seq_len <= 0 or tokens_per_rank <= 0 or tokens_per_rank % seq_len:
            raise DataError(
                f"tokens_per_rank ({tokens_per_rank}) must be a positive multiple of seq_len ({seq_len}); "
                "adjust the batch size, grad accumulation or world size"
            )
        span = tokens_per_rank + 1
        device = torch.device("cpu" if device is None else device)
        self._skip(self.rank * span)  # other ranks' spans are skipped without reading them
        if device.type == "cuda":
            host, copied = self._staging(span)
            self._fill(host.numpy())
            local = torch.empty(span, dtype=torch.int64, device=device)
            local.copy_(host, non_blocking=True)
            copied.record(torch.cuda.current_stream(device))
        else:
            local = torch.empty(span, dtype=torch.int64)
            self._fill(local.numpy())
            local = local.to(device)
        self._skip((self.world_size - self.rank - 1) * span)
        return local[:-1].view(-1, seq_len), local[1:].view(-1, seq_len)

    def state_dict(self) -> dict[str, int]:
        """Plain ints that locate the next token; identical on every rank."""
        return {
            "file_index": self._file_index,
            "position": self._position,
            "num_files": len(self.files),
            "total_tokens": sum(self._lengths),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where the loader that produced `state` stopped."""
        found = (state["num_files"], state["total_tokens"])
        expected = (len(self.files), sum(self._lengths))
        if found != expected:
            raise DataError(
                f"loader state is for {found[0]} shards / {found[1]} tokens but these files are "
                f"{expected[0]} shards / {expected[1]} tokens; resume with the same training files"
            )
        file_index, position = int(state["file_index"]), int(state["position"])
        if not (0 <= file_index < len(self.files) and 0 <= position <= self._lengths[file_index]):
            raise DataError(f"loader state points outside the shards: file {file_index}, position {position}")
        self._file_index, self._position = file_index, position
