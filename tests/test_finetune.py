"""The fine-tuning track end to end on a tiny random Llama with SmolLM2's chat tokenizer."""

import copy
import json
import re
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from underpar import config as cfglib
from underpar.errors import ConfigError
from underpar.model import hf
from underpar.optim import Cosine
from underpar.runs.rundir import RunDir
from underpar.tracks import finetune, finetune_heldout, finetune_inputs
from underpar.tracks.chaos import ChaosConfig
from underpar.tracks.finetune_methods import FullConfig
from clirun import run_main

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
        "eval.heldout_examples=6",
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
    rows = [r for r in run_dir.metrics() if "train_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    check_heldout_rows(run_dir.metrics(), summary, method)
    assert run_dir.file("heldout_loss.png").stat().st_size > 0
    assert summary.eval["basic_arithmetic"]["n"] == 4
    if method == "chaos":
        blocks = [r["block"] for r in rows if "block" in r]
        assert len(blocks) == 4 and all(len(b) == 8 for b in blocks)  # a mode per layer, each block
        assert all(b[0] == b[1] == b[-1] == b[-2] == "sacred" for b in blocks)
        assert run_dir.file("chaos_modes.png").stat().st_size > 0
    # the model is whole again: a plain HF checkpoint that loads and gives the same logits
    saved = AutoModelForCausalLM.from_pretrained(run_dir.file("model"))
    # the last held-out loss logged is the saved (full) model's, measured afresh
    heldout, _ = finetune_heldout.build(config(tmp_path, method), tokenizer, 0, torch.device("cpu"),
                                        tokenizer.pad_token_id)
    assert heldout.loss(saved.eval()) == pytest.approx(summary.heldout_loss, rel=1e-5)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.eval()
    assert len(saved.model.layers) == 8
    torch.testing.assert_close(saved(ids).logits, model(ids).logits)
    assert json.loads(run_dir.file("summary.json").read_text())["method"] == method


def check_heldout_rows(rows, summary, method):
    """Held-out rows: the base model at step 0, then the end of every block of 3 steps (and the
    end); chaos also logs its sub-network's loss there and at each block's start, under its own
    keys; the summary carries the first and last."""
    full, trained, start = (finetune_heldout.FULL, finetune_heldout.TRAINED, finetune_heldout.TRAINED_AT_START)
    ends = [r["step"] for r in rows if full in r]
    assert ends == ([0, 12] if method == "full" else [0, 3, 6, 9, 12])
    assert summary.heldout_loss_before == rows[0][full] and summary.heldout_loss == rows[-1][full]
    assert summary.heldout_loss < summary.heldout_loss_before
    if method == "chaos":
        assert [r["step"] for r in rows if trained in r] == [3, 6, 9, 12]
        assert [r["step"] for r in rows if start in r] == [1, 4, 7, 10]
        assert summary.heldout_loss_trained_net == rows[-1][trained] != rows[-1][full]
    else:
        assert not any(trained in r or start in r for r in rows) and summary.heldout_loss_trained_net is None


def test_sticky_interval_must_cover_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="sticky_interval = 2 must be >= train.grad_accum_steps = 4"):
        config(tmp_path, "chaos", "method.sticky_interval=2", "train.grad_accum_steps=4")


def test_method_settings_live_in_the_method_section(tmp_path):
    cfg = config(tmp_path, "chaos", "method.strategy=mask")
    assert cfg.method == ChaosConfig(sticky_interval=3, strategy="mask")
    assert cfglib.to_dict(cfg)["method"]["name"] == "chaos"
    assert cfglib.override(cfg, "method=chaos").method == cfg.method  # the same method keeps its settings
    assert cfglib.override(cfg, "method=full").method == FullConfig()
    with pytest.raises(ConfigError, match=r"'method.sticky_interval' is a setting of chaos, not of 'full'; "
                                          r"switch first: --set method=chaos"):
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


# ---------------------------------------------------------------- the CLI: inputs, progress, Ctrl-C



SMALL = ["data.train_examples=8", "data.max_length=128", "train.steps=4",
         "train.micro_batch_size=2", "train.grad_accum_steps=2", "optim.lr=3e-3", 'eval.tasks=["basic_arithmetic"]',
         "eval.examples=3", "eval.max_new_tokens=4", "eval.batch_size=2", "eval.heldout_examples=4"]


def sets(*assignments):
    return [a for s in assignments for a in ("--set", s)]


def task_unless_given(args):
    """--task basic_arithmetic (a shortcut: any --set data.task=... after it would win)."""
    return [] if "--task" in args else ["--task", "basic_arithmetic"]


@pytest.fixture(scope="module")
def model_folders(tokenizer, tmp_path_factory):
    """A tiny Llama with SmolLM2's chat tokenizer saved as a model folder, the same without a
    chat template, and an empty folder."""
    root = tmp_path_factory.mktemp("models")
    model = tiny_model(tokenizer)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    model.save_pretrained(root / "no-template")
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(root / "no-template")
    for name in ("chat_template.jinja", "chat_template.json"):
        (root / "no-template" / name).unlink(missing_ok=True)
    (root / "empty").mkdir()
    return root


def bad_finetune_inputs(models):
    """(arguments, the error line) for inputs refused before the model loads ..."""
    before_load = [
        (["--model", "/no/such/model"], "error: model '/no/such/model' is not a folder (no such directory /no/such/model)"),
        (["--model", "./not/here"], "error: model './not/here' is not a folder"),
        (["--model", str(models / "empty")], f"error: model folder {models / 'empty'} has no config.json"),
        (["--task", "nope"], "error: data.task = 'nope' is not valid; choose one of: gsm8k, math500, s1k, chat, asdiv"),
        (["--task", "asdiv"], "error: data.task = 'asdiv' has no 'train' split to train on; choose one of: gsm8k, s1k, chat"),
        (["--method", "nope"], "error: method = 'nope' is not valid; choose one of: full, chaos, lisa"),
        (["--preset", "nope"], "error: unknown preset 'nope'; presets: "),
        (["--preset", "tiny-cpu"], "error: preset 'tiny-cpu' is for 'pretrain', not 'finetune'"),
        (sets("train.steps=-1"), "error: train.steps = -1 is out of range; it must lie in [0, inf]"),
        (sets("train.steps=abc"), "error: train.steps: expected an integer, got 'abc'"),
        (sets("train.epochs=nan"), "error: train.epochs: expected a finite number, got nan"),
        (sets("train.steps=0", "train.epochs=0"), "error: train.steps and train.epochs are both 0"),
        (sets("data.path=/missing.jsonl"), "error: task data file /missing.jsonl does not exist"),
        (sets('eval.tasks=["chat"]'), "error: eval.tasks = 'chat' has no gold answers to score; choose an answer-scored task"),
        (sets('eval.tasks=["s1k"]'), "error: eval.tasks = 's1k' has no 'test' split (its splits: train)"),
        (sets('eval.tasks=["nope"]'), "error: eval.tasks = 'nope' is not valid; choose one of: gsm8k"),
        (sets('eval.tasks=["basic_arithmetic", "basic_arithmetic"]'), "names a task twice"),
        (sets("eval.examples=0"), "error: eval.examples = 0 is out of range; it must lie in [1, inf]"),
        (sets("model.architecture=qwen9"), "error: model.architecture = 'qwen9' is not valid; choose one of: qwen2.5-0.5b"),
        (sets("model.name="), "error: model.name = '' names no model"),
        (sets("method.sticky_interval=3"), "error: 'method.sticky_interval' is a setting of chaos, not of 'full'"),
        (sets("colour=red"), "error: unknown config key 'colour'"),
        (sets("name=../../escape"), "error: name = '../../escape' names the run directory (<date>-<name>); use letters"),
        (sets(f"train.runs_root={models / 'tiny' / 'config.json'}/runs"),
         f"error: train.runs_root = '{models / 'tiny' / 'config.json'}/runs': {models / 'tiny' / 'config.json'} is a file"),
    ]
    if not torch.cuda.is_available():
        before_load.append((sets("train.device=cuda"), "error: train.device = cuda, but this machine has no CUDA device"))
    # ... and those that show when it loads
    after_load = [
        (["--model", "org/model"], "error: the Hugging Face hub cannot be reached from this machine ("
                                   "OSError: [Errno -2] Name or service not known) and model 'org/model' is not in"),
        (["--model", str(models / "no-template")], f"error: model '{models / 'no-template'}' has no chat template"),
        (["--model", str(models / "tiny"), "--method", "lisa", *sets("method.n_layers=9")],
         "error: method.n_layers = 9 but the model has only 8 decoder layers"),
        (["--model", str(models / "tiny"), "--method", "chaos", *sets("method.sacred_layers=[0, 8]", "method.sticky_interval=2")],
         "error: method.sacred_layers: layer 8 does not exist in a model with 8 layers"),
        (["--model", str(models / "tiny"), *sets("eval.max_new_tokens=3000")],
         f"error: eval.max_new_tokens = 3000 is more than model '{models / 'tiny'}' has positions for (2048)"),
        (["--model", str(models / "tiny"), *sets("data.max_length=8")],
         "error: no training example of task basic_arithmetic fits data.max_length = 8 (all 8 prompts are longer)"),
    ]
    return before_load, after_load


def test_bad_inputs_fail_fast_and_leave_nothing(model_folders, tmp_path, monkeypatch, capsys):
    """Issue 10, found 8: every bad input is one error line, exit code 2, and no run directory;
    those the config or a file check can show are refused before the model loads."""
    from underpar.model import hf as hf_module

    def unreachable(name):
        raise OSError("[Errno -2] Name or service not known")
    monkeypatch.setattr(hf_module, "_hub_probe", unreachable)
    monkeypatch.setattr(hf_module, "_hub_cached", lambda name: False)
    runs = tmp_path / "runs"
    base = sets(*SMALL, f"train.runs_root={runs}")
    before_load, after_load = bad_finetune_inputs(model_folders)
    real_load = finetune_inputs.load
    monkeypatch.setattr(finetune_inputs, "load", lambda *a, **k: pytest.fail("the model loaded before the error"))
    for args, expected in before_load:
        code, out, err = run_main(monkeypatch, capsys, "finetune", *base, *args, *task_unless_given(args))
        assert_one_line_error(code, err, expected)
        assert not runs.exists(), f"{args} left {list(runs.iterdir())}"
    monkeypatch.setattr(finetune_inputs, "load", real_load)
    for args, expected in after_load:
        code, out, err = run_main(monkeypatch, capsys, "finetune", *base, *args, *task_unless_given(args))
        assert_one_line_error(code, err, expected)
        assert "loading" in out and not runs.exists(), args  # (a hub id is probed before any download)


def run_dir_in(root):
    """The one run directory under `root` (the run store keeps its own files beside it)."""
    (run_dir,) = [p for p in root.iterdir() if (p / "config.json").is_file()]
    return run_dir


def assert_one_line_error(code, err, expected):
    assert code == 2, err
    *before, last = err.strip().splitlines()
    assert "Traceback" not in err and not any(line.startswith("error") for line in before), err
    assert last.startswith("error: ") and expected in last, err


def test_cli_run_is_quiet_with_progress(model_folders, tmp_path, monkeypatch, capsys):
    """A finetune from a model folder: progress lines with a rate and the time to go (here on
    every step and micro-batch: LOG_EVERY_SECONDS = 0), a bar over the evaluation, the model
    saved before it, and none of transformers' loading/saving bars or warnings."""
    monkeypatch.setattr(finetune, "LOG_EVERY_SECONDS", 0.0)
    args = sets(*SMALL, f"train.runs_root={tmp_path}", "train.log_every_steps=100", "train.steps=2",
                "model.gradient_checkpointing=true")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_main(monkeypatch, capsys, "finetune", "--model", str(model_folders / "tiny"),
                                  "--task", "basic_arithmetic", *args)
    assert code == 0, err
    assert [str(w.message) for w in caught if issubclass(w.category, (UserWarning, FutureWarning))] == []
    lines = out.splitlines()
    assert lines[:2] == [f"loading {model_folders / 'tiny'} ...", lines[1]] and lines[1].endswith(" s")
    steps = [line for line in lines if line.startswith("step ") and "held-out" not in line]
    assert [s.split(" | ")[0] for s in steps] == ["step 1/2", "step 1/2", "step 2/2", "step 2/2"]
    heldout = [line for line in lines if "held-out loss: " in line]
    assert [re.sub(r"[\d.]+$", "X", line) for line in heldout] == [
        "before training: held-out loss: full model (restored; saved and evaluated) X",
        "step 2/2 | held-out loss: full model (restored; saved and evaluated) X"]
    assert steps[0].startswith("step 1/2 | micro-batch 1/2 | ") and steps[0].endswith(" s into the step")
    assert re.search(r"^step 1/2 \| loss [\d.]+ \| lr \S+ \| \d+ ms \| [\d.]+ (steps/s|s/step) \| 50%, ~\d+ s to go$", steps[1])
    assert re.search(r"\| done in \d+ s$", steps[-1])
    run_dir = run_dir_in(tmp_path)
    assert f"saved the fine-tuned model in {run_dir / 'model'}" in out
    assert out.index("saved the fine-tuned model") < out.index("basic_arithmetic: accuracy")
    assert "eval basic_arithmetic" in err and "3/3" in err  # the evaluation's progress bar
    for noise in ("Loading weights", "Writing model shards", "Warning", "warn"):
        assert noise not in out + err
    train_log = (run_dir / "train.log").read_text()
    assert train_log.startswith(f"loading {model_folders / 'tiny'} ...\n") and "step 2/2 | loss" in train_log


@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_ctrl_c_says_what_was_kept(model_folders, tmp_path, monkeypatch, capsys, where):
    """Ctrl-C while training: nothing saved, no resume; while evaluating: the model is saved
    (before the evaluation) and the line says how to score it."""
    if where == "training":
        real_lr_at = finetune.lr_at

        def lr_at(cfg, step, total):
            if step == 1:
                raise KeyboardInterrupt
            return real_lr_at(cfg, step, total)
        monkeypatch.setattr(finetune, "lr_at", lr_at)
    else:
        def evaluate_task(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(finetune, "evaluate_task", evaluate_task)
    args = sets(*SMALL, f"train.runs_root={tmp_path}", "train.steps=2", "train.grad_accum_steps=1")
    code, out, err = run_main(monkeypatch, capsys, "finetune", "--model", str(model_folders / "tiny"),
                              "--task", "basic_arithmetic", *args)
    assert code == 130 and err.strip().splitlines()[-1] == "interrupted", err
    run_dir = run_dir_in(tmp_path)
    last = out.strip().splitlines()[-1]
    if where == "training":
        assert last == (f"interrupted at step 1 of training: nothing was saved (finetune keeps no checkpoints and "
                        f"cannot resume; {run_dir} holds only its config and log); run the command again to start over")
        assert not (run_dir / "model").exists()
    else:
        assert last == (f"interrupted while evaluating after training: the fine-tuned model is saved in {run_dir / 'model'} "
                        f"(no summary.json); score it with `underpar eval task --model {run_dir / 'model'} --task basic_arithmetic`")
        assert (run_dir / "model" / "config.json").is_file()
        code, _, err = run_main(monkeypatch, capsys, "eval", "task", "--model", str(run_dir))  # not run_dir/model
        assert_one_line_error(code, err, f"error: model '{run_dir}' is an underpar run directory, not a model folder; "
                                         f"its fine-tuned model is {run_dir / 'model'}")
    assert not (run_dir / "summary.json").exists() and last in (run_dir / "train.log").read_text()


def test_a_diverging_run_says_why_in_its_log(tokenizer, tmp_path, monkeypatch, capsys):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    tokenizer.save_pretrained(tmp_path / "nan-model")
    runs = tmp_path / "runs"
    args = sets(*SMALL, f"train.runs_root={runs}", "train.steps=2", "train.grad_accum_steps=1")
    code, out, err = run_main(monkeypatch, capsys, "finetune", "--model", str(tmp_path / "nan-model"),
                              "--task", "basic_arithmetic", *args)
    assert_one_line_error(code, err, "error: training loss became nan at step 1; try a lower optim.lr")
    train_log = (run_dir_in(runs) / "train.log").read_text()
    assert train_log.endswith("stopped: training loss became nan at step 1; try a lower optim.lr\n")


def test_random_architecture_says_what_it_ignores_and_warns_when_large(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune_inputs, "CPU_PARAMETERS_WARNING", 1e5)  # tiny-llama: 238,400 parameters
    args = sets(f"train.runs_root={tmp_path}", "model.architecture=tiny-llama", "data.max_length=16", "train.steps=1",
                "train.micro_batch_size=1", "train.grad_accum_steps=1", "train.device=cpu")
    code, out, err = run_main(monkeypatch, capsys, "finetune", *args)
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "tiny-llama has random weights and no tokenizer: it trains on random tokens, and data.task and eval.tasks are not used",
        "warning: tiny-llama has 238,400 parameters; on a CPU that is ~0 GB of float32 weights, gradients and AdamW state "
        "and minutes per step (it is a GPU job)",
        "building tiny-llama with random weights ..."]


def test_heldout_comes_from_a_validation_split_only(tokenizer, tmp_path):
    """A local training file serves every split, so it gives no held-out loss (said why); a
    folder with validation.jsonl does; eval.heldout_examples=0 turns it off."""
    record = {"question": "What is 2 + 3?", "answer": "5"}
    (tmp_path / "one.jsonl").write_text(json.dumps(record) + "\n")
    folder = tmp_path / "data"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text(json.dumps(record) + "\n")

    def build(*sets):
        cfg = config(tmp_path, "full", "data.task=gsm_symbolic", *sets)
        return finetune_heldout.build(cfg, tokenizer, 0, torch.device("cpu"), tokenizer.pad_token_id)

    heldout, note = build(f"data.path={tmp_path / 'one.jsonl'}")
    assert heldout is None and note.startswith("no held-out loss: data.path") and "would not be held out" in note
    heldout, note = build(f"data.path={folder}")
    assert len(heldout.batches) == 1 and note.startswith("held-out loss on 1 validation examples of gsm_symbolic")
    assert build("eval.heldout_examples=0") == (None, "")
    heldout, note = build("data.task=gsm8k", "data.path=" + str(folder))
    assert heldout is None and "gsm8k has no validation split" in note
