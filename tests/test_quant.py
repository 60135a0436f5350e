"""Baseline int8 export, the artifact file, and byte accounting (CPU, plain state dicts)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

import underpar
from underpar.config import from_dict, validate
from underpar.errors import ArtifactError, ConfigError
from underpar.model.precision import CONTROL_PATTERNS
from underpar.quant import artifact, codewrap
from underpar.quant.artifact import account, code_bytes, code_files, compressed_code, export_model, load_model
from underpar.quant.base import COMPRESSORS
from underpar.quant.config import QuantConfig
from underpar.quant.int8 import (
    CLIP_PERCENTILE,
    MIN_ROW_SCALE,
    dequantize_state_dict,
    quantize_state_dict,
)


def small_gpt_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "blocks.0.mlp.fc.weight": torch.randn(512, 1024, generator=g) * 0.5,  # quantized per row
        "blocks.0.attn.c_k.weight": torch.randn(128, 512, generator=g) * 0.05,  # 65,536: kept fp16
        "blocks.0.attn_norm.weight": torch.rand(512, generator=g) + 0.5,  # 1-D: kept fp16
        "blocks.0.attn_scale": torch.rand(512, generator=g) * 1.1,  # control: kept fp32
        "blocks.0.resid_mix": torch.randn(2, 512, generator=g).to(torch.bfloat16),  # control, bf16
        "tok_emb.weight_bf16": torch.randn(64, 32, generator=g).to(torch.bfloat16),  # small bf16
        "step": torch.tensor([7, 11], dtype=torch.int64),
    }


def test_round_trip_restores_shapes_dtypes_and_values():
    sd = small_gpt_state()
    obj, stats = quantize_state_dict(sd, CONTROL_PATTERNS)
    out = dequantize_state_dict(obj)

    assert set(out) == set(sd)
    for name, t in sd.items():
        assert out[name].shape == t.shape, name
        assert out[name].dtype == t.dtype, name
    assert stats["num_tensors"] == len(sd) and stats["num_quantized"] == 1
    assert stats["param_count"] == sum(t.numel() for t in sd.values())

    # Large 2-D: int8 values, fp16 per-row scales; every value within half a step of its
    # clipped original (clipped outliers land on the clip value, within the same half step).
    name = "blocks.0.mlp.fc.weight"
    w = sd[name]
    assert obj["quantized"][name].dtype == torch.int8
    scale = obj["scales"][name]
    assert scale.dtype == torch.float16 and scale.shape == (512,)
    clip = torch.quantile(w.abs(), CLIP_PERCENTILE / 100.0, dim=1)
    expected_scale = (clip / 127).clamp_min(MIN_ROW_SCALE).to(torch.float16)
    assert torch.equal(scale, expected_scale)
    clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
    bound = scale.float()[:, None] / 2 * (1 + 1e-6) + 1e-7
    assert ((clipped - out[name]).abs() <= bound).all()
    assert (w.abs() > clip[:, None]).any(), "the test matrix should have clipped outliers"

    # Small floats equal their fp16 rounding; the int tensor passes through unchanged.
    for name in ("blocks.0.attn.c_k.weight", "blocks.0.attn_norm.weight"):
        assert obj["passthrough"][name].dtype == torch.float16
        assert torch.equal(out[name], sd[name].half().float())
    assert torch.equal(out["tok_emb.weight_bf16"], sd["tok_emb.weight_bf16"].half().bfloat16())
    assert torch.equal(out["step"], sd["step"])

    # Control tensors are stored in fp32, so they come back exactly.
    assert obj["passthrough"]["blocks.0.attn_scale"].dtype == torch.float32
    assert torch.equal(out["blocks.0.attn_scale"], sd["blocks.0.attn_scale"])
    assert torch.equal(out["blocks.0.resid_mix"], sd["blocks.0.resid_mix"])


def test_clip_uses_the_percentile_not_the_max():
    # With 1.3M values the 99.99984th percentile (position 0.9999984 * (n - 1)) falls between
    # the third- and second-largest values, so one huge outlier does not set the scale.
    n = 1_300_000
    row = torch.randn(1, n, generator=torch.Generator().manual_seed(1)) * 2
    row[0, 12345] = 1000.0
    obj, _ = quantize_state_dict({"w": row}, ())
    clip = torch.quantile(row.abs(), CLIP_PERCENTILE / 100.0, dim=1)
    assert clip.item() < row.abs().topk(2).values[0, 1].item() < 1000.0
    assert torch.equal(obj["scales"]["w"], (clip / 127).to(torch.float16))
    assert obj["scales"]["w"].float().item() * 127 < 20  # not 1000 / 127
    out = dequantize_state_dict(obj)["w"]
    assert out[0, 12345].item() == pytest.approx(clip.item(), rel=2e-3)
    assert obj["quantized"]["w"][0, 12345].item() == 127


def test_export_and_load_round_trip(tmp_path):
    sd = small_gpt_state()
    cfg = QuantConfig()
    path = tmp_path / "model.int8.ptz"
    written = export_model(sd, cfg, path, CONTROL_PATTERNS)
    assert written == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.int8.ptz"]  # no temp files left
    loaded = load_model(path, cfg)
    expected = dequantize_state_dict(quantize_state_dict(sd, CONTROL_PATTERNS)[0])
    assert set(loaded) == set(expected)
    for name in expected:
        assert torch.equal(loaded[name], expected[name]), name


def test_byte_accounting_sums_exactly(tmp_path):
    path = tmp_path / "model.ptz"
    model_bytes = export_model(small_gpt_state(), QuantConfig(), path, CONTROL_PATTERNS)
    acct = account(model_bytes)
    assert acct.model == model_bytes == os.path.getsize(path)
    assert acct.code + acct.model == acct.total
    assert acct.limit == 16_000_000
    assert acct.code_raw == sum(os.path.getsize(f) for f in acct.files) == code_bytes(acct.files)
    # the counted code is the files as one compressed self-extracting script
    assert (acct.code_wrapper, acct.code) == compressed_code(acct.files) and acct.code < acct.code_raw / 2
    assert acct.as_dict()["headroom"] == acct.limit - acct.total

    files = code_files()
    assert list(acct.files) == files == sorted(files) == code_files()  # deterministic
    root = Path(underpar.__file__).parent
    assert all(f.is_file() and f.is_relative_to(root) for f in files)
    assert root / "config.py" in files
    assert root / "quant" / "int8.py" in files and root / "quant" / "artifact.py" in files
    # Every module of the GPT is counted, a new one included; the Hugging Face modules that
    # only fine-tuning uses are not.
    finetune_only = {root / "model" / name for name in ("hf.py", "smollm2.py", "surgery.py")}
    assert set((root / "model").glob("*.py")) - finetune_only <= set(files)
    assert not finetune_only & set(files)
    assert {root / "registry.py", root / "errors.py", root / "runs" / "clock.py"} <= set(files)
    assert not any(f.name in ("cli.py", "rundir.py") or "tracks" in f.parts and f.name not in ("pretrain.py", "pretrain_trainer.py") for f in files)


def test_over_limit_is_an_error_with_the_numbers():
    raw = code_bytes(code_files())
    _, code = compressed_code(code_files())
    with pytest.raises(ArtifactError) as info:
        account(1_000_000, limit=1_000_000)
    msg = str(info.value)
    for number in (code + 1_000_000, code, raw, 1_000_000, code):  # total, code, raw code, model/limit, excess
        assert f"{number:,}" in msg
    assert "quant.scheme" in msg
    assert account(1_000_000 - code, limit=1_000_000).total == 1_000_000  # exactly at the limit


def test_failed_compression_leaves_no_file(tmp_path, monkeypatch):
    def broken(data: bytes) -> bytes:
        raise RuntimeError("compressor failed")

    monkeypatch.setattr(COMPRESSORS["zlib"], "compress", staticmethod(broken))
    path = tmp_path / "model.ptz"
    with pytest.raises(RuntimeError, match="compressor failed"):
        export_model(small_gpt_state(), QuantConfig(), path, ())
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_artifact_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.ptz"
    path.write_bytes(b"previous artifact")

    def no_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.os, "replace", no_replace)
    with pytest.raises(OSError, match="disk full"):
        export_model(small_gpt_state(), QuantConfig(), path, ())
    assert path.read_bytes() == b"previous artifact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ptz"]


def test_missing_or_foreign_artifact_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_model(tmp_path / "nope.ptz", QuantConfig())
    bad = tmp_path / "bad.ptz"
    bad.write_bytes(b"not zlib data")
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_model(bad, QuantConfig())
    good = tmp_path / "good.ptz"
    export_model(small_gpt_state(), QuantConfig(), good, ())
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # a truncated artifact
    with pytest.raises(ArtifactError, match=r"bad.ptz \([\d,]+ bytes\) is truncated or corrupt"):
        load_model(bad, QuantConfig())
    bad.write_bytes(zlib.compress(b"decompresses, but no torch.save payload"))
    with pytest.raises(ArtifactError, match="corrupt: it decompresses but holds no saved model"):
        load_model(bad, QuantConfig())


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [("scheme", "int5", "int8"), ("compressor", "lzma9", "zlib")],
)
def test_unknown_choice_lists_valid_ones(key, value, valid):
    cfg = from_dict(QuantConfig, {key: value})
    with pytest.raises(ConfigError, match=rf"{key} = '{value}' is not valid; choose one of: .*{valid}"):
        validate(cfg)


def test_default_config_is_the_baseline():
    cfg = from_dict(QuantConfig, {})
    validate(cfg)
    assert (cfg.scheme, cfg.clip_percentile, cfg.keep_float_max_numel, cfg.compressor) == (
        "int8", 99.99984, 65_536, "zlib",
    )


@pytest.mark.parametrize("method", codewrap.METHODS)
def test_code_wrapper_reproduces_the_source_exactly(method, tmp_path):
    root = Path(underpar.__file__).parent
    files = code_files()[:3]
    source = codewrap.bundle(files, root)
    assert source.count("# ==== ") == 3 and files[0].read_text() in source
    script = codewrap.wrap(source, method)
    assert codewrap.unwrap(script) == source
    # executed, a wrapper runs its payload: a tiny program prints through it
    program = tmp_path / "wrapped.py"
    program.write_bytes(codewrap.wrap("import sys\nprint('under' + 'par', 'é', sys.argv[1:])\n", method))
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(program), "x"], capture_output=True, check=True, text=True)
    assert out.stdout == "underpar é ['x']\n"
    with pytest.raises(ArtifactError, match="unknown code wrapper"):
        codewrap.wrap(source, "gzip")
