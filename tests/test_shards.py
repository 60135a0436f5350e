"""Token shards: exact bytes, validation errors, and the rank-sliced training loader."""

import struct

import numpy as np
import pytest
import torch

from underpar.data.shards import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    TokenLoader,
    find_shards,
    load_tokens,
    read_header,
    read_shard,
    write_shard,
)
from underpar.errors import DataError


def _write_raw(path, header_ints, body: bytes) -> None:
    ints = list(header_ints) + [0] * (256 - len(header_ints))
    path.write_bytes(struct.pack("<256i", *ints) + body)


def _make_shards(folder, sizes, seed=0):
    """Shards holding consecutive ids 0, 1, 2, ... (mod 65536) so positions are easy to check."""
    paths, start = [], 0
    for i, n in enumerate(sizes):
        path = folder / f"fineweb_train_{i:06d}.bin"
        write_shard(path, (np.arange(start, start + n) % 65536))
        paths.append(path)
        start += n
    return paths


def test_golden_bytes(tmp_path):
    path = tmp_path / "golden.bin"
    write_shard(path, [1, 2, 65535])
    expected = struct.pack("<3i", 20240520, 1, 3) + b"\x00" * (1024 - 12) + struct.pack("<3H", 1, 2, 65535)
    assert path.read_bytes() == expected
    assert (MAGIC, VERSION, HEADER_BYTES) == (20240520, 1, 1024)


def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=10_001)
    path = tmp_path / "rt.bin"
    write_shard(path, tokens)
    assert read_header(path) == 10_001
    data = read_shard(path)
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data, tokens)
    assert path.stat().st_size == 1024 + 2 * 10_001
    # Torch tensors are accepted too.
    write_shard(path, torch.tensor([5, 6, 7]))
    np.testing.assert_array_equal(read_shard(path), [5, 6, 7])


def test_empty_shard(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, [])
    assert read_header(path) == 0
    assert read_shard(path).size == 0


@pytest.mark.parametrize(
    "header, body, fragment",
    [
        ([MAGIC, VERSION, 1000], b"\x00" * 1024, "truncated: 2048 bytes, header says 1000 tokens = 3024 bytes"),
        ([MAGIC, VERSION, 2], b"\x00" * 6, "extra bytes: 1030 bytes"),
        ([12345, VERSION, 2], b"\x00" * 4, "bad magic 12345"),
        ([MAGIC, 7, 2], b"\x00" * 4, "unsupported version 7"),
    ],
)
def test_corrupt_headers(tmp_path, header, body, fragment):
    path = tmp_path / "bad_shard.bin"
    _write_raw(path, header, body)
    with pytest.raises(DataError, match="bad_shard.bin") as info:
        read_header(path)
    assert fragment in str(info.value)
    with pytest.raises(DataError, match="bad_shard.bin"):
        read_shard(path)


def test_short_and_missing_files(tmp_path):
    short = tmp_path / "short.bin"
    short.write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="short.bin.*truncated: 100 bytes"):
        read_header(short)
    with pytest.raises(DataError, match="nope.bin.*not found"):
        read_header(tmp_path / "nope.bin")


@pytest.mark.parametrize("tokens", [[1, 65536, 3], [0, -1], [[1, 2]], [0.5, 1.0]])
def test_invalid_tokens_leave_no_file(tmp_path, tokens):
    path = tmp_path / "out.bin"
    with pytest.raises(DataError, match="out.bin"):
        write_shard(path, tokens)
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_message(tmp_path):
    with pytest.raises(DataError, match=r"token 65536 at index 1 is outside \[0, 65535\]"):
        write_shard(tmp_path / "x.bin", [1, 65536, 3])


def test_find_shards_and_load_tokens(tmp_path):
    paths = _make_shards(tmp_path, [5, 7, 3])
    pattern = str(tmp_path / "fineweb_train_*.bin")
    assert find_shards(pattern) == paths
    with pytest.raises(DataError, match="fineweb_val_"):
        find_shards(str(tmp_path / "fineweb_val_*.bin"))
    tokens = load_tokens(pattern)
    assert tokens.dtype == torch.int32
    assert torch.equal(tokens, torch.arange(15, dtype=torch.int32))
    assert torch.equal(load_tokens(paths[::-1])[:3], torch.tensor([12, 13, 14], dtype=torch.int32))


def test_loader_shapes_and_shift(tmp_path):
    _make_shards(tmp_path, [100, 100])
    loader = TokenLoader(str(tmp_path / "*.bin"))
    x, y = loader.next_batch(tokens_per_rank=32, seq_len=8)
    assert x.shape == y.shape == (4, 8)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x.flatten(), torch.arange(0, 32))
    assert torch.equal(y.flatten(), torch.arange(1, 33))
    x2, _ = loader.next_batch(32, 8)
    assert x2.flatten()[0] == 33  # each call consumes tokens_per_rank + 1 tokens


def test_loader_wraps_across_files(tmp_path):
    _make_shards(tmp_path, [10, 7, 5])  # stream: 0..21, then 0.. again
    loader = TokenLoader(sorted(tmp_path.glob("*.bin")))
    seen = [torch.cat([x.flatten(), y.flatten()[-1:]]) for x, y in (loader.next_batch(8, 4) for _ in range(4))]
    stream = torch.cat(seen)
    expected = torch.arange(36) % 22
    assert torch.equal(stream, expected)


def test_rank_slicing_equals_accumulation(tmp_path):
    _make_shards(tmp_path, [50, 31, 64])
    files = sorted(tmp_path.glob("*.bin"))
    single = TokenLoader(files)
    ranks = [TokenLoader(files, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # several global steps, crossing files and wrapping around
        for r in range(2):
            xs, ys = single.next_batch(16, 4)
            xr, yr = ranks[r].next_batch(16, 4)
            assert torch.equal(xs, xr) and torch.equal(ys, yr)
    assert single.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_loader_deterministic_and_resume(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(3):
        write_shard(tmp_path / f"s_{i}.bin", rng.integers(0, 1024, size=int(rng.integers(40, 90))))
    files = sorted(tmp_path.glob("*.bin"))
    run_a, run_b = TokenLoader(files, 1, 3), TokenLoader(files, 1, 3)
    batches = [run_a.next_batch(12, 6) for _ in range(9)]
    for x, y in batches:
        xb, yb = run_b.next_batch(12, 6)
        assert torch.equal(x, xb) and torch.equal(y, yb)

    interrupted = TokenLoader(files, 1, 3)
    for _ in range(5):
        interrupted.next_batch(12, 6)
    state = interrupted.state_dict()
    assert all(type(v) is int for v in state.values())
    resumed = TokenLoader(files, 1, 3)
    resumed.load_state_dict(dict(state))
    for x, y in batches[5:]:
        xr, yr = resumed.next_batch(12, 6)
        assert torch.equal(x, xr) and torch.equal(y, yr)

    with pytest.raises(DataError, match="same training files"):
        TokenLoader(files[:2]).load_state_dict(state)


def test_loader_errors(tmp_path):
    _make_shards(tmp_path, [20])
    loader = TokenLoader(str(tmp_path / "*.bin"))
    with pytest.raises(DataError, match="multiple of seq_len"):
        loader.next_batch(10, 4)
    with pytest.raises(DataError, match="rank"):
        TokenLoader(str(tmp_path / "*.bin"), rank=2, world_size=2)
    write_shard(tmp_path / "empty.bin", [])
    with pytest.raises(DataError, match="empty"):
        TokenLoader([tmp_path / "empty.bin"])


def test_ids_outside_the_vocabulary_name_the_file(tmp_path):
    """A damaged shard (bytes overwritten with 0xFF) is caught when loaded with a vocabulary."""
    paths = _make_shards(tmp_path, [50, 50])
    raw = bytearray(paths[1].read_bytes())
    raw[HEADER_BYTES + 20 : HEADER_BYTES + 24] = b"\xff" * 4  # tokens 10 and 11 become 65535
    paths[1].write_bytes(bytes(raw))
    assert len(load_tokens(paths)) == 100  # without a vocabulary nothing is checked
    message = rf"{paths[1]}: token id 65535 at position 10 is outside the vocabulary of 1024 ids"
    with pytest.raises(DataError, match=message):
        load_tokens(paths, vocab_size=1024)
    loader = TokenLoader(paths, vocab_size=1024)
    loader.next_batch(40, 8)  # the first file is fine
    with pytest.raises(DataError, match=message):
        loader.next_batch(40, 8)


def test_batches_are_independent_tensors(tmp_path):
    """Each call's tensors are the caller's: later calls do not write into earlier batches."""
    _make_shards(tmp_path, [30, 25])
    loader = TokenLoader(str(tmp_path / "*.bin"))
    kept = [loader.next_batch(12, 4) for _ in range(6)]  # crosses the file boundary and wraps
    stream = torch.cat([torch.cat([x.flatten(), y.flatten()[-1:]]) for x, y in kept])
    assert torch.equal(stream, torch.arange(6 * 13) % 55)
    x, y = TokenLoader(str(tmp_path / "*.bin")).next_batch(12, 4, device="cpu")
    assert torch.equal(x, kept[0][0]) and torch.equal(y, kept[0][1])


def test_other_ranks_spans_are_never_read(tmp_path):
    """Rank 0's spans lie in the first shard, rank 1's in a damaged second one: rank 0 never
    opens it (no check fails), rank 1 is stopped by the vocabulary check."""
    paths = _make_shards(tmp_path, [17, 17])
    raw = bytearray(paths[1].read_bytes())
    raw[HEADER_BYTES : HEADER_BYTES + 2] = b"\xff\xff"
    paths[1].write_bytes(bytes(raw))
    rank0 = TokenLoader(paths, rank=0, world_size=2, vocab_size=1024)
    for _ in range(3):
        x, _ = rank0.next_batch(16, 8)
        assert torch.equal(x.flatten(), torch.arange(16))
    with pytest.raises(DataError, match="token id 65535 at position 0"):
        TokenLoader(paths, rank=1, world_size=2, vocab_size=1024).next_batch(16, 8)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_batches_equal_cpu_batches_under_a_busy_stream(tmp_path):
    """Pinned double buffers and asynchronous copies: the same tokens as the CPU path, kept
    batches stay intact, across files, a batch-size change and a resume, while the stream is
    busy (so copies are still queued when the host refills a buffer)."""
    rng = np.random.default_rng(3)
    for i in range(3):
        write_shard(tmp_path / f"s_{i}.bin", rng.integers(0, 1024, size=int(rng.integers(3000, 9000))))
    files = sorted(tmp_path.glob("*.bin"))
    cpu, gpu = TokenLoader(files, 1, 2), TokenLoader(files, 1, 2)
    busy = torch.randn(2048, 2048, device="cuda")
    sizes = [(1024, 64)] * 6 + [(2048, 128)] * 5
    want = [cpu.next_batch(n, s) for n, s in sizes]
    got = []
    for n, s in sizes:
        for _ in range(4):
            busy = torch.tanh(busy @ busy / 2048)
        got.append(gpu.next_batch(n, s, device="cuda"))
    for (xw, yw), (xg, yg) in zip(want, got):
        assert xg.is_cuda and xg.dtype == torch.int64
        assert torch.equal(xg.cpu(), xw) and torch.equal(yg.cpu(), yw)
    assert gpu.state_dict() == cpu.state_dict()
    resumed = TokenLoader(files, 1, 2)
    resumed.load_state_dict(gpu.state_dict())
    x, y = resumed.next_batch(1024, 64, device="cuda")
    xc, yc = cpu.next_batch(1024, 64)
    assert torch.equal(x.cpu(), xc) and torch.equal(y.cpu(), yc)
