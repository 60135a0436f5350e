"""SentencePiece BPE tokenizer with the Parameter Golf settings, and the byte look-up tables
that turn token ids into exact UTF-8 byte counts for bits-per-byte."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from underpar.errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPACE_MARK = "\u2581"  # "▁": SentencePiece's stand-in for a space
# SentencePiece's own default; the reference export script leaves it unset, so documents
# longer than this many bytes are skipped when training (not when encoding).
DEFAULT_MAX_SENTENCE_LENGTH = 4192

# The trainer settings of openai/parameter-golf's data/download_hf_docs_and_tokenize.py.
GOLF_TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": PAD_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "unk_id": UNK_ID,
    # Soft limit, as in the reference; we then insist on the exact size ourselves so that a
    # small corpus fails loudly instead of silently producing a smaller vocabulary.
    "hard_vocab_limit": False,
}


class _DocumentStats:
    """Counts what the trainer is fed, for the progress line and error messages."""

    def __init__(self, max_sentence_length: int, split_long: bool) -> None:
        self.max_sentence_length = max_sentence_length
        self.split_long = split_long
        self.documents = 0
        self.too_long = 0  # documents over the limit: skipped by the trainer, or split
        self.sentences = 0

    def clean(self, documents: Iterable[str]) -> Iterator[str]:
        for text in documents:
            # As the reference: NULs would end the C string early; blank documents teach nothing.
            text = text.replace("\x00", " ").strip()
            if not text:
                continue
            self.documents += 1
            if len(text.encode("utf-8")) > self.max_sentence_length:
                self.too_long += 1
                if self.split_long:
                    for sentence in split_sentences(text, self.max_sentence_length):
                        self.sentences += 1
                        yield sentence
                    continue
            else:
                self.sentences += 1
            yield text  # an over-long one unsplit: the trainer skips it, as in the reference

    def summary(self) -> str:
        if not self.too_long:
            return f"{self.sentences:,} documents"
        limit = f"{self.max_sentence_length:,} bytes"
        if self.split_long:
            return (f"{self.sentences:,} sentences from {self.documents:,} documents ({self.too_long:,} "
                    f"longer than {limit} split at line breaks and spaces)")
        return (f"{self.sentences:,} documents ({self.too_long:,} of {self.documents:,} longer than {limit} "
                "are skipped by the trainer, as in the reference)")


def split_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Chunks of `text` of at most `max_bytes` UTF-8 bytes: whole lines packed together, a
    longer line cut at spaces (or, without one, at a character boundary). Blank chunks dropped."""
    chunk: list[str] = []
    size = 0
    for line in text.splitlines():
        for piece in _cut_line(line.strip(), max_bytes):
            n = len(piece.encode("utf-8"))
            if chunk and size + 1 + n > max_bytes:
                yield "\n".join(chunk)
                chunk, size = [], 0
            size += n + (1 if chunk else 0)
            chunk.append(piece)
    if chunk:
        yield "\n".join(chunk)


def _cut_line(line: str, max_bytes: int) -> Iterator[str]:
    data = line.encode("utf-8")
    while len(data) > max_bytes:
        cut = data.rfind(b" ", 1, max_bytes + 1)
        if cut <= 0:
            cut = max_bytes
            while data[cut] & 0xC0 == 0x80:  # never inside a multi-byte character
                cut -= 1
        yield data[:cut].decode("utf-8")
        data = data[cut:].lstrip(b" ")
    if data:
        yield data.decode("utf-8")


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    model_path: Path,
    *,
    max_sentence_length: int = DEFAULT_MAX_SENTENCE_LENGTH,
    split_long_documents: bool = False,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> Path:
    """Train a SentencePiece BPE model on `documents`; write `model_path` (+ `.vocab`).

    The trainer skips sentences longer than `max_sentence_length` bytes; the reference feeds it
    whole documents and lets it skip the long ones (the default here). `split_long_documents`
    feeds such documents as chunks under the limit instead, so every document trains it.
    `log` receives a line before training (what it trains on) and one after (its time).
    Files appear only when training succeeded with exactly `vocab_size` pieces.
    """
    model_path = Path(model_path)
    if vocab_size < 4 + 256:
        raise DataError(
            f"vocab size {vocab_size} is too small: byte fallback needs 4 special + 256 byte "
            "pieces; use --vocab 260 or more (the challenge uses 1024)"
        )
    stats = _DocumentStats(max_sentence_length, split_long_documents)
    sentences = list(stats.clean(documents))  # counted up front for the progress line
    if not sentences:
        raise DataError("no documents to train the tokenizer on (all empty); check the corpus path")
    if log is not None:
        log(f"training a {vocab_size}-piece BPE tokenizer on {stats.summary()}")
    started = time.perf_counter()

    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{model_path.name}.", dir=model_path.parent))
    try:
        prefix = tmp_dir / "tokenizer"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                max_sentence_length=max_sentence_length,
                minloglevel=0 if verbose else 2,
                **GOLF_TRAINER_SETTINGS,
            )
        except RuntimeError as exc:
            raise _training_error(exc, vocab_size, stats) from exc
        trained = spm.SentencePieceProcessor(model_file=str(prefix.with_suffix(".model")))
        if trained.vocab_size() != vocab_size:
            raise DataError(
                f"the corpus supports only {trained.vocab_size()} tokenizer pieces, not "
                f"{vocab_size}; lower --vocab to at most {trained.vocab_size()} or add more text"
            )
        tmp_vocab = prefix.with_suffix(".vocab")
        if tmp_vocab.exists():
            os.replace(tmp_vocab, model_path.with_suffix(".vocab"))
        # The .model goes last: its presence means the whole run succeeded.
        os.replace(prefix.with_suffix(".model"), model_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    if log is not None:
        log(f"trained the tokenizer in {time.perf_counter() - started:.1f} s")
    return model_path


def _training_error(exc: RuntimeError, vocab_size: int, stats: _DocumentStats) -> DataError:
    message = str(exc)
    if "Vocabulary size too high" in message:
        suggestion = "a smaller value"
        if "<=" in message:
            suggestion = message.rsplit("<=", 1)[-1].strip(" .")
        return DataError(
            f"the corpus cannot support a vocabulary of {vocab_size}; lower --vocab to at most "
            f"{suggestion} or add more text"
        )
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if needed:
        return DataError(
            f"vocab size {vocab_size} cannot hold the corpus's characters plus the 260 special and "
            f"byte pieces ({needed.group(1)} needed); raise --vocab above {needed.group(1)}"
        )
    if "sentences_.empty()" in message:
        return DataError(
            f"no usable training text: {stats.too_long} of {stats.documents} documents are longer "
            f"than max_sentence_length={stats.max_sentence_length} bytes and the trainer skips them; "
            "add shorter documents or train with split_long_documents=True"
        )
    return DataError(f"tokenizer training failed: {message}")


class Tokenizer:
    """A loaded SentencePiece model; `sp` is the raw processor."""

    def __init__(self, sp: spm.SentencePieceProcessor, path: Path | None = None) -> None:
        self.sp = sp
        self.path = path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model not found: {path}; train one or fix the path")
        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as exc:
            raise DataError(
                f"tokenizer model {path} is corrupt or not a SentencePiece model ({exc}); "
                "retrain it or point to the right file"
            ) from exc
        return cls(sp, path)

    @property
    def vocab_size(self) -> int:
        return int(self.sp.vocab_size())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_documents(
        self, texts: Iterable[str], num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many documents at once (SentencePiece's batched, multi-threaded encode)."""
        texts = list(texts)
        if not texts:
            return []
        threads = num_threads or os.cpu_count() or 1
        return self.sp.encode(texts, out_type=int, num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))


@dataclass(frozen=True)
class ByteLUTs:
    """Per-token-id tables for exact byte counting (see `underpar.eval.bpb.target_bytes`)."""

    bytes_per_token: torch.Tensor  # int16: UTF-8 bytes of the piece, leading "▁" excluded
    has_leading_space: torch.Tensor  # bool: piece starts with "▁"
    is_boundary: torch.Tensor  # bool: control/unknown/unused (or padding) id

    @property
    def vocab_size(self) -> int:
        return int(self.bytes_per_token.numel())

    def to(self, device: torch.device | str) -> ByteLUTs:
        tables = (self.bytes_per_token, self.has_leading_space, self.is_boundary)
        return ByteLUTs(*(t.to(device) for t in tables))


def build_byte_luts(
    tokenizer_or_sp: Tokenizer | spm.SentencePieceProcessor,
    vocab_size: int | None = None,
    device: torch.device | str = "cpu",
) -> ByteLUTs:
    """Byte tables of length `vocab_size` (default: the model's); ids beyond the model's
    vocabulary (a padded embedding table) are boundaries with 0 bytes."""
    sp = tokenizer_or_sp.sp if isinstance(tokenizer_or_sp, Tokenizer) else tokenizer_or_sp
    sp_vocab_size = int(sp.vocab_size())
    table_size = sp_vocab_size if vocab_size is None else int(vocab_size)
    if table_size < sp_vocab_size:
        raise DataError(
            f"model vocab size {table_size} is smaller than the tokenizer's {sp_vocab_size}; "
            f"set the model vocab size to at least {sp_vocab_size}"
        )
    bytes_per_token = [0] * table_size
    has_leading_space = [False] * table_size
    is_boundary = [True] * table_size
    for token_id in range(sp_vocab_size):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.is_byte(token_id):  # "<0xE4>" stands for exactly one byte
            bytes_per_token[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith(SPACE_MARK):
            # The space is counted by target_bytes, and only after a non-boundary token.
            has_leading_space[token_id] = True
            piece = piece[1:]
        bytes_per_token[token_id] = len(piece.encode("utf-8"))
    return ByteLUTs(
        bytes_per_token=torch.tensor(bytes_per_token, dtype=torch.int16, device=device),
        has_leading_space=torch.tensor(has_leading_space, dtype=torch.bool, device=device),
        is_boundary=torch.tensor(is_boundary, dtype=torch.bool, device=device),
    )
