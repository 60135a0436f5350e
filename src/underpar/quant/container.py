"""The grouped artifact container (`quant.container = "grouped"`) for the mixed scheme's
object (quant/rowquant.py): bytes grouped by kind so each compresses on its own, every group
stored in the smallest of the configured packings x compressors, behind a versioned header
with a checksum.

  header   b"UPQZ" | version u8 | crc32 of the body u32
  body     manifest length u32 | manifest (zlib JSON: tensors' metadata, streams) | streams
Groups: the integer codes of tensors with the same name up to the layer index and the same
bits (e.g. every block's mlp.fc at int6) in one stream, packed as int8 or bits (pack.py);
LQER factor codes; all fp16 scales (byte-plane shuffled); kept floats by dtype (shuffled by
element size); non-float tensors by dtype. decode(encode(obj)) gives back every tensor bit
for bit, so the round trip's dequantized weights are exactly the exporter's.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from underpar.errors import ArtifactError
from underpar.quant import pack
from underpar.quant.base import COMPRESSORS
from underpar.quant.compress import available
from underpar.quant.rowquant import FORMAT

MAGIC = b"UPQZ"
VERSION = 1
_HEADER = struct.Struct("<4sBI")


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_from(data: bytes, dtype: str, shape: list[int]) -> Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(getattr(torch, dtype)).reshape(shape).clone()


def _pattern(name: str) -> str:
    """The name with layer indices replaced, so every layer's copy of a tensor shares a group."""
    return re.sub(r"\.\d+(?=\.)", ".N", name)


def _metadata(obj: Mapping[str, Any]) -> list[list]:
    """[name, metadata] per tensor, in order; everything but the tensors' bytes."""
    out = []
    for name, e in obj["tensors"].items():
        if e["kind"] == "int":
            m = {k: e[k] for k in ("kind", "bits", "shape", "dtype", "method")}
            m["rows"], m["cols"] = list(e["q"].shape)
            if "lqer" in e:
                m["lqer"] = {"bits": e["lqer"]["bits"], "rank": e["lqer"]["a"].shape[1]}
        else:
            m = {"kind": e["kind"], "stored": str(e["t"].dtype).removeprefix("torch."), "shape": list(e["t"].shape)}
            if e["kind"] == "float":
                m["dtype"] = e["dtype"]
        out.append([name, m])
    return out


def _plan(meta: list[list]) -> dict[str, list[tuple]]:
    """group -> parts (name, part, kind of bytes, numel, bits or dtype), in a fixed order."""
    groups: dict[str, list[tuple]] = {}
    for name, m in meta:
        if m["kind"] == "int":
            rows, cols = m["rows"], m["cols"]
            groups.setdefault(f"q{m['bits']}:{_pattern(name)}", []).append((name, "q", "codes", rows * cols, m["bits"]))
            groups.setdefault("scales", []).append((name, "scale", "float16", rows, None))
            if "lqer" in m:
                bits, r = m["lqer"]["bits"], m["lqer"]["rank"]
                group = groups.setdefault(f"lqer{bits}", [])
                group += [(name, "a", "codes", rows * r, bits), (name, "b", "codes", r * cols, bits)]
                groups["scales"] += [(name, "a_scale", "float16", rows, None), (name, "b_scale", "float16", r, None)]
        else:
            numel = 1
            for d in m["shape"]:
                numel *= d
            groups.setdefault(f"{m['kind']}:{m['stored']}", []).append((name, "t", m["stored"], numel, None))
    return groups


def _stride(parts: list[tuple]) -> int:
    kind = parts[0][2]
    return 1 if kind == "codes" else torch.empty(0, dtype=getattr(torch, kind)).element_size()


def _part_tensor(obj: Mapping[str, Any], name: str, part: str) -> Tensor:
    e = obj["tensors"][name]
    return e["lqer"][part] if part in ("a", "b", "a_scale", "b_scale") else e[part]


def _group_bytes(obj: Mapping[str, Any], parts: list[tuple], layout: str) -> bytes:
    if parts[0][2] == "codes":
        return b"".join(pack.pack(_part_tensor(obj, n, p), bits, layout) for n, p, _, _, bits in parts)
    return pack.shuffle(b"".join(_tensor_bytes(_part_tensor(obj, n, p)) for n, p, *_ in parts), _stride(parts))


def _layouts(parts: list[tuple], packings: list[str]) -> list[str]:
    """Candidate layouts of a group: the packings for codes (8-bit codes pack the same either
    way, so once), plain bytes for anything else."""
    if parts[0][2] != "codes":
        return ["bytes"]
    if all(p[4] == 8 for p in parts):
        return packings[:1]
    return list(packings)


def encode(obj: Mapping[str, Any], compressors: list[str], packings: list[str]) -> tuple[bytes, dict[str, Any]]:
    """(artifact bytes, report): every group in its smallest (packing, compressor); the report
    lists every candidate's size per group."""
    if obj.get("format") != FORMAT:
        raise ArtifactError(f"the grouped container stores {FORMAT} objects, not {obj.get('format')!r}; "
                            "set quant.scheme=mixed")
    usable = [c for c in compressors if available(c)]
    if not usable:
        raise ArtifactError(f"none of quant.compressors ({', '.join(compressors)}) is installed here")
    meta = _metadata(obj)
    plan = _plan(meta)
    # Every (group, packing, compressor) candidate is independent; the compressors release the
    # GIL, so threads run them in parallel (minutes become seconds on a many-core host).
    jobs = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for group, parts in plan.items():
            for layout in _layouts(parts, packings):
                data = _group_bytes(obj, parts, "int8" if layout == "bytes" else layout)
                for c in usable:
                    jobs[group, layout, c] = (len(data), pool.submit(COMPRESSORS[c].compress, data))
        results = {key: (raw_len, future.result()) for key, (raw_len, future) in jobs.items()}
    streams, blobs, report_groups = [], [], []
    tensor_bytes: dict[str, float] = {}
    for group, parts in plan.items():
        candidates = {(layout, c): results[group, layout, c] for layout in _layouts(parts, packings) for c in usable}
        (layout, c), (raw_len, blob) = min(candidates.items(), key=lambda kv: len(kv[1][1]))
        streams.append({"group": group, "layout": layout, "compressor": c, "length": len(blob), "raw": raw_len})
        blobs.append(blob)
        sizes = {f"{lay}+{comp}": len(b) for (lay, comp), (_, b) in candidates.items()}
        # A tensor's share of its group's compressed bytes, in proportion to its raw bytes there.
        for name, _, kind, numel, bits in parts:
            raw = pack.packed_size(numel, bits, layout) if kind == "codes" else numel * _stride(parts)
            tensor_bytes[name] = tensor_bytes.get(name, 0.0) + len(blob) * raw / max(raw_len, 1)
        report_groups.append({"group": group, "tensors": len({p[0] for p in parts}), "chosen": f"{layout}+{c}",
                              "bytes": len(blob), "sizes": sizes})
    manifest = zlib.compress(json.dumps({"format": FORMAT, "tensors": meta, "streams": streams},
                                        separators=(",", ":")).encode(), 9)
    body = struct.pack("<I", len(manifest)) + manifest + b"".join(blobs)
    data = _HEADER.pack(MAGIC, VERSION, zlib.crc32(body)) + body
    overhead = len(data) - sum(len(b) for b in blobs)
    per_compressor = {c: overhead + sum(min(v for k, v in g["sizes"].items() if k.endswith(f"+{c}"))
                                        for g in report_groups) for c in usable}
    report = {"container": "grouped", "bytes": len(data), "overhead_bytes": overhead, "groups": report_groups,
              "single_compressor_bytes": per_compressor, "skipped_compressors": sorted(set(compressors) - set(usable)),
              "tensor_compressed_bytes": {name: round(b) for name, b in tensor_bytes.items()}}
    return data, report


def is_grouped(blob: bytes) -> bool:
    return blob[:4] == MAGIC


def decode(blob: bytes) -> dict[str, Any]:
    """The object `encode` stored; a foreign, truncated or corrupt blob is an ArtifactError."""
    if len(blob) < _HEADER.size + 4 or blob[:4] != MAGIC:
        raise ArtifactError("not an underpar grouped artifact (no UPQZ header); it is foreign or truncated")
    _, version, crc = _HEADER.unpack_from(blob)
    if version != VERSION:
        raise ArtifactError(f"grouped artifact format version {version}; this underpar reads version {VERSION}")
    body = blob[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise ArtifactError("grouped artifact checksum mismatch: the file is truncated or corrupt; export it again")
    (manifest_len,) = struct.unpack_from("<I", body)
    try:
        manifest = json.loads(zlib.decompress(body[4:4 + manifest_len]))
        metas = dict(manifest["tensors"])
        plan = _plan(manifest["tensors"])
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"grouped artifact has an unreadable manifest ({e}); it is foreign or corrupt") from None
    tensors: dict[str, dict[str, Any]] = {}
    for name, m in manifest["tensors"]:
        keep = ("kind", "bits", "shape", "dtype", "method") if m["kind"] == "int" else ("kind", "dtype")
        tensors[name] = {k: m[k] for k in keep if k in m}
        if "lqer" in m:
            tensors[name]["lqer"] = {"bits": m["lqer"]["bits"]}
    offset = 4 + manifest_len
    for stream in manifest["streams"]:
        parts = plan[stream["group"]]
        data = COMPRESSORS[stream["compressor"]].decompress(body[offset:offset + stream["length"]])
        offset += stream["length"]
        if parts[0][2] != "codes":
            data = pack.unshuffle(data, _stride(parts))
        pos = 0
        for name, part, kind, numel, bits in parts:
            m = metas[name]
            if kind == "codes":
                layout = "int8" if stream["layout"] == "bytes" else stream["layout"]
                size = pack.packed_size(numel, bits, layout)
                value = pack.unpack(data[pos:pos + size], numel, bits, layout).reshape(_code_shape(m, part))
            else:
                size = numel * torch.empty(0, dtype=getattr(torch, kind)).element_size()
                value = _tensor_from(data[pos:pos + size], kind, m["shape"] if part == "t" else [numel])
            pos += size
            target = tensors[name]["lqer"] if part in ("a", "b", "a_scale", "b_scale") else tensors[name]
            target[part] = value
        if pos != len(data):
            raise ArtifactError(f"group {stream['group']} holds {len(data)} bytes, its tensors {pos}; the artifact is corrupt")
    return {"format": manifest["format"], "tensors": tensors}


def _code_shape(m: dict, part: str) -> list[int]:
    if part == "q":
        return [m["rows"], m["cols"]]
    r = m["lqer"]["rank"]
    return [m["rows"], r] if part == "a" else [r, m["cols"]]
