"""Hugging Face causal LMs for the finetune and randopt tracks: named architectures with random
weights, pretrained loading (hub id, local folder, or the offline SmolLM2-135M-Instruct of
`underpar.model.smollm2`), and the structural helpers the chaos/LISA code needs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from underpar.errors import ConfigError, DataError
from underpar.ui import console

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


# ---------------------------------------------------------------- quiet transformers

# Bars that only show transformers reading or writing a local file in a second or two.
# Download bars (huggingface_hub's) and the one-time GGUF conversion bar stay.
_SILENT_BARS = ("Loading weights", "Loading checkpoint shards", "Writing model shards")
_quiet = False


def quiet_transformers() -> None:
    """Silence what transformers prints on every call: its logger's warnings (deprecations,
    generation defaults, load reports: errors still show) and the bars in `_SILENT_BARS`.
    Every loader here calls it first, so every command that touches a Hugging Face model is
    quiet; what a user must know (missing weights, no chat template, an unreachable hub) is
    said by underpar itself."""
    global _quiet
    if _quiet:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if hasattr(hf_logging, "set_tqdm_hook"):
        def hook(factory, args, kwargs):
            if str(kwargs.get("desc") or "").startswith(_SILENT_BARS):
                kwargs = {**kwargs, "disable": True}
            return factory(*args, **kwargs)
        hf_logging.set_tqdm_hook(hook)
    else:  # older transformers: every transformers bar goes (downloads keep huggingface_hub's)
        hf_logging._tqdm_active = False
    _quiet = True


def say(message: str) -> None:
    """A line on the console (stderr), printed as it is."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def architecture_config(arch: str, **overrides) -> PreTrainedConfig:
    """The transformers config of a named architecture, with fields overridden."""
    from transformers import AutoConfig

    quiet_transformers()

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

    quiet_transformers()
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
    that is a local path (absolute, ./, ~, or an existing folder) must be a folder holding a
    config.json; any other name must look like a hub id. Anything else (an empty name, a
    missing path, a file, a folder without config.json) is a DataError, raised here in
    microseconds so callers can refuse it before any work (nothing is loaded or fetched)."""
    path = Path(name).expanduser()
    if name in ("smollm2-135m", "gemma3-270m"):  # the offline models (model/smollm2.py, model/gemma3.py)
        return name.split("-")[0]
    hint = "pass a folder written by save_pretrained, a hub id like Qwen/Qwen2.5-0.5B-Instruct, or smollm2-135m"
    if name.strip() and path.is_dir():
        if not (path / "config.json").is_file():
            raise DataError(f"model folder {path} has no config.json, so it holds no saved model; {hint}")
        if _is_run_directory(path):
            saved = f"its fine-tuned model is {path / 'model'}" if (path / "model" / "config.json").is_file() \
                else "it holds no saved model (train.save was off, or the run stopped before saving)"
            raise DataError(f"model {name!r} is an underpar run directory, not a model folder; {saved}")
        return "folder"
    if not name.strip() or path.exists() or name.startswith(("/", ".", "~")) or not _HUB_ID.match(name):
        what = ("an empty name" if not name.strip() else "a file, not a model folder" if path.exists()
                else f"not a folder (no such directory {path})")
        raise DataError(f"model {name!r} is {what}; {hint}")
    return "hub"


def _is_run_directory(path: Path) -> bool:
    """A run directory's config.json is underpar's ({"track": ..., "config": ...})."""
    try:
        return "track" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _hub_probe(name: str) -> None:
    """Ask the hub about `name` (one request, no retries); raises what huggingface_hub raises."""
    import huggingface_hub

    huggingface_hub.model_info(name, timeout=15)


def _hub_cached(name: str) -> bool:
    """Whether the local Hugging Face cache holds `name`'s config.json (a previous download)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def _hub_access(name: str) -> bool:
    """Check a hub id before the (slow, retrying) load; True = load from the local cache only.
    An unknown or gated id, or an unreachable hub without a cached copy, is a DataError now,
    not after minutes of retries."""
    from huggingface_hub import constants, errors

    cached = _hub_cached(name)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise DataError(f"model {name!r} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                        "HF_HUB_OFFLINE is set; unset it to download, or pass a local folder or smollm2-135m")
    try:
        _hub_probe(name)
    except errors.GatedRepoError:
        raise DataError(f"model {name!r} is gated on the Hugging Face hub: accept its terms on "
                        f"https://huggingface.co/{name} and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise DataError(f"there is no model {name!r} on the Hugging Face hub (or it is private: set HF_TOKEN); "
                        "check the name, or pass a local folder written by save_pretrained") from None
    except errors.HfHubHTTPError as e:
        raise DataError(f"the Hugging Face hub refused model {name!r} ({_first_line(e)}); try again later, "
                        "or pass a local folder written by save_pretrained") from None
    except Exception as e:  # noqa: BLE001 - DNS, connection, proxy, timeout: the hub cannot be reached
        if cached:
            say(f"warning: the Hugging Face hub cannot be reached ({_first_line(e)}); "
                 f"using the copy of {name} in the local cache")
            return True
        raise DataError(f"the Hugging Face hub cannot be reached from this machine ({_first_line(e)}) and model "
                        f"{name!r} is not in the local cache ({constants.HF_HUB_CACHE}); connect to the network, "
                        "or pass a local folder written by save_pretrained, or smollm2-135m (offline)") from None
    return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_model(
    name: str, device: str | torch.device = "auto", dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for `smollm2-135m` (offline), a local folder written by
    `save_pretrained`, or a Hugging Face hub id. dtype None = bf16 on CUDA, float32 on CPU.
    The tokenizer gets a pad token (eos) if it has none; its padding side is left as shipped,
    so batched generation must set `padding_side="left"` itself. Weights the checkpoint lacks
    (left at random init) are named in a warning."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from underpar.model import gemma3, smollm2  # they import this module

    quiet_transformers()
    device = _device(device)
    kind = check_model_name(name)
    from_hub = kind == "hub"
    cache_only = _hub_access(name) if from_hub else False
    offline = {"smollm2": smollm2.smollm2_dir, "gemma3": gemma3.gemma3_dir}
    source = str(offline[kind]()) if kind in offline else name if from_hub else str(Path(name).expanduser())
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=_dtype(dtype, device), output_loading_info=True, local_files_only=cache_only)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=cache_only)
    except Exception as e:  # noqa: BLE001 - a bad checkpoint fails in many ways; each is the user's to fix
        where = "the Hugging Face hub" if from_hub else f"the folder {source}"
        raise DataError(f"could not load model {name!r} from {where} ({_first_line(e)}); check that it is a "
                        "causal LM saved by save_pretrained (config, weights and tokenizer files)") from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        say(f"warning: {len(missing)} weights of {name} are not in its checkpoint and start random "
             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for config in (model.config, model.generation_config):
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_positions(model: PreTrainedModel, name: str, **lengths: int) -> None:
    """Each named length (e.g. max_new_tokens=256) must fit the model's positions
    (`max_position_embeddings`): past them a static KV cache is allocated for nothing and RoPE
    models produce noise."""
    limit = getattr(model.config, "max_position_embeddings", None)
    for key, length in lengths.items():
        if limit is not None and length > limit:
            raise ConfigError(f"{key} = {length} is more than model {name!r} has positions for "
                              f"({limit}); lower it to at most {limit}")


def require_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Tasks are prompted (and SFT data encoded) as chats: a tokenizer without a chat template
    cannot do either. Call it right after loading, before any work that needs one."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"model {name!r} has no chat template (its tokenizer's chat_template is empty), and tasks "
                        "are prompted as chat conversations; use an instruction-tuned model (e.g. a name ending "
                        "in -Instruct) or add a chat_template to its tokenizer_config.json")


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
