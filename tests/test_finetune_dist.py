"""Fine-tuning on two gloo processes (DDP and FSDP2) against one process at the same global
batch: the per-step losses and the saved model match, for full fine-tuning, LISA and chaos."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from underpar import config as cfglib
from underpar.errors import ConfigError, TrainingError
from underpar.model import hf
from underpar.tracks import finetune, finetune_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.architecture=tiny-llama", "data.max_length=32"]  # random tokens: fast steps
# name -> (settings, parallel); 4 steps of 2 micro-batches of 2 rows (full-ddp: 4, so 2 per rank: no_sync)
RUNS = {
    "full-ddp": ([*TINY, "method=full", "train.grad_accum_steps=4"], "ddp"),
    "lisa-ddp": ([*TINY, "method=lisa", "method.interval=2"], "ddp"),  # a new block (a new wrap) at step 2
    "chaos-ddp": ([*TINY, "method=chaos", "method.sticky_interval=2"], "ddp"),
    "lisa-fsdp": ([*TINY, "method=lisa", "method.interval=2"], "fsdp"),
    "full-fsdp": (["train.save=true", "train.steps=2"], "fsdp"),  # SFT rows of the task; the saved (gathered) model
}


def config(model_dir, root, sets, parallel="ddp"):
    return cfglib.resolve("finetune", None, [
        f"model.name={model_dir}", "data.task=basic_arithmetic", "data.train_examples=16", "data.max_length=96",
        "train.steps=4", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.device=cpu",
        "train.save=false", "optim.lr=3e-3", "optim.schedule.warmup_fraction=0", "eval.tasks=[]",
        "eval.heldout_examples=0", f"train.parallel={parallel}", f"train.runs_root={root}", *sets])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with SmolLM2's chat tokenizer, saved as a folder every process loads."""
    tokenizer = hf.load_model("smollm2-135m", device="cpu")[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _worker(rank, world, port, model_dir, root):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, (sets, parallel) in RUNS.items():
            finetune.run(config(model_dir, root / name, sets, parallel))
        # a LISA draw that differs between ranks is caught at the first block, on every rank
        with pytest.raises(TrainingError, match="ranks \\[1\\] would train a different network than rank 0"):
            finetune.run(config(model_dir, root / "differ", [*TINY, "method=lisa", f"method.seed={rank}"]))
        with pytest.raises(ConfigError, match="grad_accum_steps = 3 is not a multiple of the 2 processes"):
            finetune.run(config(model_dir, root / "odd", [*TINY, "train.grad_accum_steps=3"]))
    finally:
        torch_dist.destroy_process_group()


def losses(root):
    (run_dir,) = [p for p in root.iterdir() if (p / "metrics.jsonl").is_file()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r], run_dir


def test_two_processes_match_one(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imports (spawning two fresh interpreters costs tens of seconds here)
    mp.start_processes(_worker, args=(2, port, model_dir, tmp_path / "two"), nprocs=2, start_method="fork")
    for name, (sets, _) in RUNS.items():  # one process: no wrapper, whatever train.parallel says
        finetune.run(config(model_dir, tmp_path / "one" / name, sets))
        one, one_dir = losses(tmp_path / "one" / name)
        two, run_dir = losses(tmp_path / "two" / name)
        assert len(two) == len(one) > 1 and two == pytest.approx(one, rel=1e-5), name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == len(two) and summary["first_loss"] == two[0]
        assert f"x 2 ({name.split('-')[1]})" in (run_dir / "train.log").read_text()
    # the saved model is the whole one (FSDP: gathered), equal to the one-process model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    saved, reference = (AutoModelForCausalLM.from_pretrained(d / "model") for d in (run_dir, one_dir))
    torch.testing.assert_close(saved(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_chaos_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="method = chaos with train.parallel = fsdp: chaos hoists and slices"):
        config("x", tmp_path, ["method=chaos"], "fsdp")
    with pytest.raises(ConfigError, match="train.parallel = 'zero' is not valid; choose one of: ddp, fsdp"):
        config("x", tmp_path, [], "zero")


def test_num_layers_sets_the_depth_of_a_random_architecture(tmp_path):
    cfg = config("x", tmp_path, ["model.architecture=tiny-llama", "model.num_layers=3"])
    model, tokenizer = finetune_inputs.load(cfg.model, torch.device("cpu"), 0)
    assert len(model.model.layers) == 3 and tokenizer is None
    with pytest.raises(ConfigError, match="model.num_layers = 3 applies to model.architecture only"):
        config("x", tmp_path, ["model.num_layers=3"])
