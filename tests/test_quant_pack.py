"""Packing, byte shuffling, compressors, the mixed per-row intN scheme and the grouped
container: exact round trips, best-of choice, clear errors on bad input (CPU, small tensors)."""

from __future__ import annotations

import random
import struct
import zlib

import pytest
import torch

from underpar.config import from_dict, validate
from underpar.errors import ArtifactError, ConfigError
from underpar.model.precision import CONTROL_PATTERNS
from underpar.quant import artifact, container, pack
from underpar.quant.base import COMPRESSORS
from underpar.quant.clip import CLIPS, MSESearch, Percentile, SDClip, round_to_nearest, row_scales
from underpar.quant.config import QuantConfig
from underpar.quant.rowquant import dequantize_mixed, qmax_of, quantize_mixed

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["zlib", "brotli"]  # the slow ones (lzma extreme, zstd-22) are covered once below


def adversarial_codes(bits: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    lo, hi = pack.code_range(bits)
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(lo, hi + 1, (n,), generator=g, dtype=torch.int8),
        torch.full((n,), lo, dtype=torch.int8),  # all equal, the extreme low code
        torch.full((n,), hi, dtype=torch.int8),
        torch.zeros(n, dtype=torch.int8),
        torch.tensor([lo, hi] * (n // 2) + [0] * (n % 2), dtype=torch.int8),  # alternating extremes
    ]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 7, 8, 1001])
def test_pack_round_trip_every_width_and_length(bits, n):
    for codes in adversarial_codes(bits, n, seed=bits * 100 + n):
        for layout in pack.LAYOUTS:
            data = pack.pack(codes, bits, layout)
            assert len(data) == pack.packed_size(n, bits, layout)
            assert torch.equal(pack.unpack(data, n, bits, layout), codes), (bits, n, layout)


def test_packed_sizes_are_the_promised_ones():
    codes = torch.zeros(1000, dtype=torch.int8)
    assert len(pack.pack(codes, 6)) == 750  # 4 codes in 3 bytes
    assert len(pack.pack(codes, 4)) == 500  # 2 per byte
    assert len(pack.pack(codes, 5)) == 625  # 8 codes in 5 bytes
    assert len(pack.pack(codes, 6, "int8")) == 1000
    # int6 layout: code c is stored as c + 32 in 6 bits, least significant code first
    assert pack.pack(torch.tensor([-32, 31, 0, 1], dtype=torch.int8), 6) == bytes([0xC0, 0x0F, 0x86])


def test_pack_refuses_codes_out_of_range_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"outside the int6 range \[-32, 31\]"):
        pack.pack(torch.tensor([32], dtype=torch.int8), 6)
    with pytest.raises(ValueError, match="torch.int8"):
        pack.pack(torch.tensor([1]), 6)
    with pytest.raises(ArtifactError, match="expected 3 for 4 codes"):
        pack.unpack(b"\x00\x00", 4, 6)


def test_byte_plane_shuffle_round_trip_and_order():
    data = bytes(range(12))
    assert pack.shuffle(data, 2) == bytes([0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11])
    noise = random.Random(0).randbytes(4096)
    for stride in (1, 2, 4):
        assert pack.unshuffle(pack.shuffle(noise, stride), stride) == noise
    # fp16 scales of similar size share their high bytes: shuffled, they compress better
    scales = (torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 0.01 + 0.01).half()
    raw = scales.numpy().tobytes()
    assert len(zlib.compress(pack.shuffle(raw, 2), 9)) < len(zlib.compress(raw, 9))


@pytest.mark.parametrize("name", ["lzma", "zstd"])
def test_slow_compressors_are_registered_and_exact(name):
    data = random.Random(1).randbytes(2000) + b"golf" * 1000
    assert COMPRESSORS[name].decompress(COMPRESSORS[name].compress(data)) == data


# ---- clips and the mixed scheme


def test_clips_give_one_value_per_row():
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    w[3, 5] = 40.0  # an outlier row
    sd = SDClip()(w, 31, embedding=False)
    torch.testing.assert_close(sd, 12.85 * w.std(dim=1))
    torch.testing.assert_close(SDClip()(w, 31, embedding=True), 20.0 * w.std(dim=1))
    torch.testing.assert_close(Percentile(100.0)(w, 31, False), w.abs().amax(dim=1))
    mse = MSESearch()(w, 31, False)
    qerr = {}
    for label, clip in (("sd", sd), ("max", w.abs().amax(dim=1)), ("mse", mse)):
        s = row_scales(clip, 31)
        qerr[label] = (round_to_nearest(w, s, 31).float() * s.float()[:, None] - w).square().sum(dim=1)
    # the search is never worse than the row max (a candidate); on Gaussian rows a tighter clip
    # than 12.85 sigma wins; on the outlier row the max does, and the search finds it
    assert (qerr["mse"] <= qerr["max"] + 1e-6).all()
    gaussian = torch.arange(8) != 3
    assert (qerr["mse"][gaussian] < qerr["sd"][gaussian]).all()
    assert qerr["mse"][3] == qerr["max"][3] < qerr["sd"][3]
    assert set(CLIPS) >= {"sdclip", "percentile", "mse"}


def gpt_like_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "tok_emb.weight": torch.randn(256, 64, generator=g) * 0.02,
        "blocks.0.mlp.fc.weight": torch.randn(128, 64, generator=g) * 0.05,
        "blocks.1.mlp.fc.weight": torch.randn(128, 64, generator=g) * 0.05,
        "blocks.0.attn.c_q.weight": (torch.randn(64, 64, generator=g) * 0.05).bfloat16(),
        "blocks.0.attn_scale": torch.rand(64, generator=g),  # control: fp32
        "blocks.0.attn_norm.weight": torch.rand(64, generator=g),  # small: fp16
        "conv.weight": torch.randn(32, 4, 4, generator=g),  # 3-D, quantized by first-dim rows
        "step": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
    }


def mixed_cfg(**kw) -> QuantConfig:
    cfg = QuantConfig(scheme="mixed", container="grouped", keep_float_max_numel=100, compressors=FAST, **kw)
    validate(cfg)
    return cfg


def test_mixed_scheme_bits_scales_and_kept_tensors():
    sd = gpt_like_state()
    obj, stats = quantize_mixed(sd, CONTROL_PATTERNS, mixed_cfg(embed_bits=7))
    t = obj["tensors"]
    assert t["tok_emb.weight"]["bits"] == 7 and t["blocks.0.mlp.fc.weight"]["bits"] == 6
    w = sd["blocks.0.mlp.fc.weight"]
    scale = (12.85 * w.std(dim=1) / 31).half()
    assert torch.equal(t["blocks.0.mlp.fc.weight"]["scale"], scale)
    assert torch.equal(t["blocks.0.mlp.fc.weight"]["q"], torch.clamp(torch.round(w / scale.float()[:, None]), -31, 31).to(torch.int8))
    assert t["tok_emb.weight"]["q"].abs().max() <= 63
    assert t["blocks.0.attn_scale"]["t"].dtype == torch.float32 and t["blocks.0.attn_norm.weight"]["t"].dtype == torch.float16
    assert t["conv.weight"]["q"].shape == (32, 16)
    assert stats["num_quantized"] == 5 and stats["num_kept_float"] == 2 and stats["num_nonfloat"] == 2
    out = dequantize_mixed(obj)
    for name, x in sd.items():
        assert out[name].shape == x.shape and out[name].dtype == x.dtype, name
    assert torch.equal(out["blocks.0.attn_scale"], sd["blocks.0.attn_scale"])
    assert torch.equal(out["mask"], sd["mask"]) and torch.equal(out["step"], sd["step"])
    err = (out["blocks.0.mlp.fc.weight"] - w).abs()
    assert (err <= scale.float()[:, None] / 2 + 1e-7).all()  # nothing clipped at 12.85 sigma: half a step


def test_nan_weights_are_refused_with_the_name():
    sd = gpt_like_state()
    sd["blocks.1.mlp.fc.weight"][3, 3] = float("nan")
    with pytest.raises(ArtifactError, match=r"blocks.1.mlp.fc.weight holds NaN"):
        quantize_mixed(sd, CONTROL_PATTERNS, mixed_cfg())


# ---- the grouped container


def test_grouped_round_trip_is_bit_exact_and_picks_the_smallest(tmp_path):
    sd = gpt_like_state()
    cfg = mixed_cfg(lqer_rank=2, lqer_top_k=2)
    obj, _ = quantize_mixed(sd, CONTROL_PATTERNS, cfg)
    expected = dequantize_mixed(obj)
    path = tmp_path / "model.ptz"
    exported = artifact.export(sd, cfg, path, CONTROL_PATTERNS)
    assert exported.model_bytes == path.stat().st_size == exported.report["bytes"]
    loaded = artifact.load_model(path, cfg)
    assert set(loaded) == set(sd)
    for name in sd:
        assert loaded[name].dtype == expected[name].dtype and torch.equal(loaded[name], expected[name]), name
    decoded = container.decode(path.read_bytes())
    for name, e in obj["tensors"].items():
        d = decoded["tensors"][name]
        assert set(d) == set(e), name
        for key, value in e.items():
            same = torch.equal(value, d[key]) if isinstance(value, torch.Tensor) else key == "lqer" or value == d[key]
            assert same, (name, key)
    groups = {g["group"]: g for g in exported.report["groups"]}
    assert "q6:blocks.N.mlp.fc.weight" in groups and groups["q6:blocks.N.mlp.fc.weight"]["tensors"] == 2
    for g in groups.values():
        assert g["bytes"] == min(g["sizes"].values()) and g["sizes"][g["chosen"]] == g["bytes"]
    assert set(groups["q6:blocks.N.mlp.fc.weight"]["sizes"]) == {f"{p}+{c}" for p in ("int8", "bits") for c in FAST}
    single = exported.report["single_compressor_bytes"]
    assert set(single) == set(FAST) and exported.model_bytes <= min(single.values())
    schemes = {row["name"]: row["scheme"] for row in exported.report["tensors"]}
    assert schemes["tok_emb.weight"].startswith("int8 rtn") and schemes["blocks.0.attn_scale"] == "float32"
    assert sum("+lqer" in s for s in schemes.values()) == 2
    shares = sum(row["compressed_bytes"] for row in exported.report["tensors"])
    assert abs(shares - (exported.model_bytes - exported.report["overhead_bytes"])) <= len(sd)  # rounding only
    assert exported.report["bytes_per_parameter"] == exported.model_bytes / sum(t.numel() for t in sd.values())


def test_corrupt_truncated_and_foreign_grouped_artifacts(tmp_path):
    cfg = mixed_cfg()
    path = tmp_path / "model.ptz"
    artifact.export(gpt_like_state(), cfg, path, CONTROL_PATTERNS)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    for bad, message in ((bytes(flipped), "checksum mismatch"), (good[:-10], "checksum mismatch"),
                         (good[:6], "no UPQZ header"),
                         (good[:4] + bytes([9]) + good[5:], "format version 9")):
        path.write_bytes(bad)
        with pytest.raises(ArtifactError, match=message):
            artifact.load_model(path, cfg)
    body = struct.pack("<I", 3) + b"xyz"
    path.write_bytes(b"UPQZ" + struct.pack("<BI", 1, zlib.crc32(body)) + body)
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        artifact.load_model(path, cfg)


def test_config_choices_and_cross_checks():
    validate(from_dict(QuantConfig, {"scheme": "mixed", "container": "grouped", "compressors": ["brotli", "zstd"],
                                     "clip": {"name": "percentile", "percentile": 99.9}}))
    with pytest.raises(ConfigError, match=r"compressors = 'lz4' is not valid; choose one of: zlib, lzma, brotli, zstd"):
        validate(from_dict(QuantConfig, {"compressors": ["zlib", "lz4"]}))
    with pytest.raises(ConfigError, match=r"packings = 'nibbles' is not valid; choose one of: int8, bits"):
        validate(from_dict(QuantConfig, {"packings": ["nibbles"]}))
    with pytest.raises(ConfigError, match=r"quant.container = 'grouped' needs quant.scheme = 'mixed'"):
        validate(from_dict(QuantConfig, {"container": "grouped"}))
    with pytest.raises(ConfigError, match=r"quant.gptq = True needs quant.scheme = 'mixed'"):
        validate(from_dict(QuantConfig, {"gptq": True}))
    with pytest.raises(ConfigError, match=r"matrix_bits = 9 is out of range"):
        validate(from_dict(QuantConfig, {"scheme": "mixed", "matrix_bits": 9}))
    with pytest.raises(ConfigError, match=r"quant.compressors and quant.packings each need at least one entry"):
        validate(from_dict(QuantConfig, {"scheme": "mixed", "container": "grouped", "packings": []}))
    with pytest.raises(ConfigError, match=r"clip = 'absmax' is not valid; choose one of: sdclip, percentile, mse"):
        from_dict(QuantConfig, {"clip": "absmax"})
    assert qmax_of(6) == 31 and qmax_of(8) == 127 and qmax_of(4) == 7
