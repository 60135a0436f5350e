"""The fine-tuning track end to end on a tiny random Llama with SmolLM2's chat tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from underpar import config as cfglib
from underpar.errors import ConfigError
from underpar.model import hf
from underpar.optim import Cosine
from underpar.runs.rundir import RunDir
from underpar.tracks import finetune
from underpar.tracks.chaos import ChaosConfig
from underpar.tracks.finetune_methods import FullConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only add contention


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_model("smollm2-135m", device="cpu")[1]


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


BLOCKS_OF_3 = {"full": [], "chaos": ["method.sticky_interval=3"], "lisa": ["method.interval=3"]}


def config(tmp_path, method, *sets):
    return cfglib.resolve("finetune", None, [
        "data.task=basic_arithmetic", "data.train_examples=8", "data.max_length=128",
        "train.steps=12", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.device=cpu",
        "optim.lr=3e-3", "optim.schedule.warmup_fraction=0", f"method={method}", *BLOCKS_OF_3.get(method, []),
        "eval.tasks=[\"basic_arithmetic\"]", "eval.examples=4", "eval.max_new_tokens=8", "eval.engine=loop",
        f"train.runs_root={tmp_path}", *sets])


@pytest.mark.parametrize("method", ["full", "chaos", "lisa"])
def test_training_lowers_the_loss(tokenizer, tmp_path, method):
    model = tiny_model(tokenizer)
    summary = finetune.run(config(tmp_path, method), model, tokenizer)
    assert isinstance(summary, finetune.FinetuneSummary) and summary.method == method
    assert summary.steps == 12
    assert summary.final_loss < summary.first_loss - 1.0, summary
    run_dir = RunDir(summary.run_dir)
    assert cfglib.load_json(run_dir.file("config.json")).method == config(tmp_path, method).method
    rows = run_dir.metrics()
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert summary.eval["basic_arithmetic"]["n"] == 4
    if method == "chaos":
        blocks = [r["block"] for r in rows if "block" in r]
        assert len(blocks) == 4 and all(len(b) == 8 for b in blocks)  # a mode per layer, each block
        assert all(b[0] == b[1] == b[-1] == b[-2] == "sacred" for b in blocks)
        assert run_dir.file("chaos_modes.png").stat().st_size > 0
    # the model is whole again: a plain HF checkpoint that loads and gives the same logits
    saved = AutoModelForCausalLM.from_pretrained(run_dir.file("model"))
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    assert len(saved.model.layers) == 8
    torch.testing.assert_close(saved(ids).logits, model(ids).logits)
    assert json.loads(run_dir.file("summary.json").read_text())["method"] == method


def test_sticky_interval_must_cover_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="sticky_interval = 2 must be >= train.grad_accum_steps = 4"):
        config(tmp_path, "chaos", "method.sticky_interval=2", "train.grad_accum_steps=4")


def test_method_settings_live_in_the_method_section(tmp_path):
    cfg = config(tmp_path, "chaos", "method.strategy=mask")
    assert cfg.method == ChaosConfig(sticky_interval=3, strategy="mask")
    assert cfglib.to_dict(cfg)["method"]["name"] == "chaos"
    assert cfglib.override(cfg, "method=chaos").method == cfg.method  # the same method keeps its settings
    assert cfglib.override(cfg, "method=full").method == FullConfig()
    with pytest.raises(ConfigError, match="unknown config key 'method.sticky_interval'"):
        config(tmp_path, "full", "method.sticky_interval=3")
    with pytest.raises(ConfigError, match="method = 'dropout' is not valid; choose one of: full, chaos, lisa"):
        config(tmp_path, "dropout")
    with pytest.raises(ConfigError, match="method.strategy = 'prune' is not valid; choose one of: hoist, mask"):
        config(tmp_path, "chaos", "method.strategy=prune")
    preset = cfglib.resolve("finetune", "chaos-smollm2")
    assert preset.method == ChaosConfig(sticky_interval=10)


def test_lr_schedule_warmup_then_cosine():
    """The schedule is read at the middle of each step: step 0 of a warmup is not 0, the
    last step of a cosine to 0 is not 0."""
    cfg = finetune.FTOptimConfig(lr=1.0, schedule=Cosine(warmup_fraction=0.1, min_lr_ratio=0.0))
    lrs = [finetune.lr_at(cfg, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[9] == pytest.approx(0.95)
    assert lrs[10] == pytest.approx(1.0, abs=1e-4) and 0 < lrs[-1] < 1e-4
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    flat = finetune.FTOptimConfig(lr=2.0, schedule=Cosine(warmup_fraction=0.0, min_lr_ratio=1.0))
    assert {finetune.lr_at(flat, s, 7) for s in range(7)} == {2.0}
