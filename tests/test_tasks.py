"""Tasks (schemas from local files, generated splits, ASDiv), SFT encoding with a chat
template, batching, packing, and packed-attention equivalence on a tiny Llama."""

import json
import sys
import types

import pytest
import torch

from underpar.data.sft import (
    IGNORE_INDEX, collate, encode_sft, encode_sft_examples, pack, packed_attention_mask, response_span,
)
from underpar.data.tasks import TASKS, Example, Generated, get_task
from underpar.errors import ConfigError, DataError, UnderparError
from underpar.data.answers import extract_gsm8k_strict, normalize_number
from clirun import run_main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


GSM_RECORDS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1,000 pens and 234 pencils. How many items did it sell?",
     "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"},
]


# ---------------------------------------------------------------- tasks from files

def test_registry_and_unknown_task():
    assert set(TASKS) == {"gsm8k", "math500", "s1k", "chat", "gsm_symbolic", "basic_arithmetic",
                          "chain_sum", "asdiv", "chain_sum_easy", "basic_arithmetic_easy"}
    assert get_task("gsm8k").answer_kind == "numeric" and get_task("math500").answer_kind == "math"
    assert get_task("chat").answer_kind is None
    with pytest.raises(ConfigError, match="unknown task 'gsm9k'; valid: gsm8k, math500"):
        get_task("gsm9k")


def test_gsm8k_local_files(tmp_path):
    task = get_task("gsm8k")
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM_RECORDS)
    examples = task.load("test", path=path)
    assert [e.answer for e in examples] == ["72", "1234"]
    assert examples[0].response.endswith("#### 72") and "<<" not in examples[0].response
    assert task.load("test", limit=1, path=path) == examples[:1]
    # a folder of <split>.jsonl files, and a .json list
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", GSM_RECORDS[:1])
    assert task.load("train", path=str(tmp_path / "folder")) == examples[:1]
    (tmp_path / "gsm.json").write_text(json.dumps(GSM_RECORDS))
    assert task.load("test", path=str(tmp_path / "gsm.json")) == examples
    prompt = task.prompt_messages(examples[0])
    assert prompt[0]["role"] == "user" and "#### <number>" in prompt[0]["content"]
    with pytest.raises(ConfigError, match="no split 'validation'"):
        task.load("validation", path=path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match="####"):
        task.load("test", path=bad)
    with pytest.raises(DataError, match="does not exist"):
        task.load("test", path=str(tmp_path / "missing.jsonl"))


def test_gsm8k_scoring():
    task = get_task("gsm8k")
    example = Example("q", "72")
    assert task.reward("48 + 24 = 72\n#### 72", example) == 1.0
    assert task.reward("#### 72.00", example) == 1.0
    assert task.reward("So she sold $72 clips. The answer is 72.", example) == 1.0  # flexible
    assert task.reward("#### 71\nActually 72", example) == 0.0  # strict wins
    assert task.reward("I don't know", example) == 0.0 and task.reward(None, example) == 0.0
    assert task.extract_all("#### 71\nActually 72") == {"strict": "71", "flexible": "72"}


def test_hub_loading_goes_through_datasets(monkeypatch):
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return GSM_RECORDS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples = get_task("gsm8k").load("train", limit=1)
    assert calls == [("openai/gsm8k", "main", "train")] and examples[0].answer == "72"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError, match="HuggingFaceH4/MATH-500.*path="):
        get_task("math500").load("test")


def test_math500_local_file(tmp_path):
    task = get_task("math500")
    record = {"problem": "What is $\\frac{2}{4}$ in lowest terms?",
              "solution": "Divide by 2: $\\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
              "answer": "\\frac{1}{2}", "subject": "Prealgebra", "level": 1,
              "unique_id": "test/prealgebra/1.json"}
    (example,) = task.load("test", path=write_jsonl(tmp_path / "m.jsonl", [record]))
    assert example.question.startswith("What is") and example.answer == "\\frac{1}{2}"
    assert example.meta == {"subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}
    assert "\\boxed{}" in task.prompt_messages(example)[0]["content"]
    assert task.reward("so the result is \\boxed{0.5}", example) == 1.0
    assert task.reward("Final Answer: The final answer is $1/2$. I hope it is correct.", example) == 1.0
    assert task.reward("\\boxed{\\frac{1}{3}}", example) == 0.0
    assert task.reward(example.response, example) == 1.0


def test_s1k_local_file(tmp_path):
    task = get_task("s1k")
    record = {"question": "Find x if 2x = 6.", "solution": "x = \\boxed{3}", "cot_type": "math",
              "source_type": "qfq/openaimath/Algebra", "metadata": "{}", "cot": None,
              "thinking_trajectories": ["2x = 6, so x = 3.\nCheck: 2*3 = 6."],
              "attempt": "Dividing by 2 gives $x = \\boxed{3}$."}
    v11 = {"question": "q2", "solution": "7", "deepseek_thinking_trajectory": "think",
           "deepseek_attempt": "Answer: 7"}
    examples = task.load("train", path=write_jsonl(tmp_path / "s1k.jsonl", [record, v11]))
    assert examples[0].answer == "3" and examples[1].answer == "7"
    assert examples[0].response == ("<|im_start|>think\n2x = 6, so x = 3.\nCheck: 2*3 = 6.\n"
                                    "<|im_start|>answer\nAnswer: Dividing by 2 gives $x = \\boxed{3}$.")
    assert examples[1].response.endswith("<|im_start|>answer\nAnswer: 7")
    assert task.prompt_messages(examples[0]) == [{"role": "user", "content": "Find x if 2x = 6."}]
    assert task.reward(examples[0].response, examples[0]) == 1.0
    with pytest.raises(ConfigError):
        task.load("test", path=str(tmp_path / "s1k.jsonl"))


def test_chat_local_file(tmp_path):
    task = get_task("chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    (example,) = task.load("train", path=write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]))
    assert example.question == "Hi" and example.messages == messages
    assert task.prompt_messages(example) == messages[:2] and task.sft_response(example) == "Hello!"
    with pytest.raises(UnderparError, match="no gold answers"):
        task.reward("Hello!", example)
    with pytest.raises(DataError, match="ending with an assistant"):
        task.load("train", path=write_jsonl(tmp_path / "b.jsonl", [{"messages": messages[:2]}]))
    with pytest.raises(DataError, match="path="):
        task.load("train")


# ---------------------------------------------------------------- generated and ASDiv

@pytest.mark.parametrize("name", [name for name, task in TASKS.items() if isinstance(task, Generated)])
def test_generated_splits_are_disjoint_and_deterministic(name):
    task = get_task(name)
    train = task.load("train", limit=300)
    test = task.load("test", limit=100)
    assert len(train) == 300 and len(test) == 100
    train_q, test_q = {e.question for e in train}, {e.question for e in test}
    assert len(train_q) == 300 and len(test_q) == 100 and not train_q & test_q
    assert all(Generated.split_of(q) == "test" for q in test_q)
    assert task.load("test", limit=100) == test                      # deterministic
    assert task.load("test", limit=100, seed=1) != test               # seeded
    for example in train[:50] + test:
        assert example.answer and normalize_number(example.answer) == example.answer
        assert task.reward(example.response, example) == 1.0           # the SFT target is right
        assert extract_gsm8k_strict(example.response) is not None
    if name == "gsm_symbolic":  # reasoning-gym's worked solution (metadata.answer_cot)
        assert all(len(e.response.splitlines()) > 2 for e in test)


def test_asdiv_numeric_problems():
    from underpar.data.corpora import asdiv_records
    assert len(asdiv_records()) == 2305
    examples = get_task("asdiv").load("test")
    assert len(examples) == 2095
    first = examples[0]
    assert first.question == ("Seven red apples and two green apples are in the basket. "
                              "How many apples are in the basket?")
    assert first.answer == "9" and first.meta["raw_answer"] == "9 apples"
    assert all(normalize_number(e.answer) == e.answer for e in examples)
    assert len(get_task("asdiv").load("test", limit=10)) == 10
    with pytest.raises(ConfigError, match="evaluation only"):
        get_task("asdiv").load("train")


# ---------------------------------------------------------------- SFT encoding

def make_tokenizer(template=CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    corpus = [r["question"] + " " + r["answer"] for r in GSM_RECORDS] + [
        "Solve the problem step by step. End your reply with the final answer.", "user assistant"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def gsm_example(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("gsm") / "g.jsonl", GSM_RECORDS)
    return get_task("gsm8k").load("train", path=path)[0]


def test_encode_sft_masks_exactly_the_prompt(tokenizer, gsm_example):
    task = get_task("gsm8k")
    encoded = encode_sft(tokenizer, gsm_example, task, max_length=1024)
    ids, labels = encoded["input_ids"], encoded["labels"]
    prompt_text = tokenizer.apply_chat_template(task.prompt_messages(gsm_example), tokenize=False,
                                                add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert len(ids) == len(labels)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt] != IGNORE_INDEX
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == gsm_example.response + "<|im_end|>"
    assert labels[-1] == IGNORE_INDEX and tokenizer.decode(ids[-1:]) == "\n"  # after end-of-turn
    assert ids[n_prompt:n_prompt + len(trained)] == trained
    assert response_span(tokenizer, task.prompt_messages(gsm_example), gsm_example.response)[3]


def test_encode_sft_truncation_and_drops(tokenizer, gsm_example):
    task = get_task("gsm8k")
    full = encode_sft(tokenizer, gsm_example, task, max_length=1024)
    n_prompt = full["labels"].index(next(t for t in full["labels"] if t != IGNORE_INDEX))
    cut = encode_sft(tokenizer, gsm_example, task, max_length=n_prompt + 5)
    assert len(cut["input_ids"]) == n_prompt + 5 and cut["input_ids"] == full["input_ids"][:n_prompt + 5]
    assert sum(t != IGNORE_INDEX for t in cut["labels"]) == 5
    assert encode_sft(tokenizer, gsm_example, task, max_length=n_prompt) is None
    kept, dropped = encode_sft_examples(tokenizer, [gsm_example, gsm_example], task, max_length=n_prompt)
    assert kept == [] and dropped == 2
    kept, dropped = encode_sft_examples(tokenizer, [gsm_example], task, max_length=1024)
    assert kept == [full] and dropped == 0


def test_encode_sft_response_with_special_tokens(tokenizer):
    task = get_task("s1k")
    example = Example("Find x if 2x = 6.", "3", "<|im_start|>think\nx = 3\n<|im_start|>answer\nAnswer: 3")
    encoded = encode_sft(tokenizer, example, task, max_length=512)
    trained = [t for t in encoded["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == example.response + "<|im_end|>"


def test_encode_sft_template_without_prefix_property():
    # A template whose generation prompt opens a think block that finished turns do not have:
    # the prompt ids are not a prefix, training starts where the two renderings part.
    template = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")
    tokenizer = make_tokenizer(template)
    task = get_task("chat")
    example = Example("Hi", "", "Hello there", messages=[{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello there"}])
    _, start, end, exact = response_span(tokenizer, task.prompt_messages(example), example.response)
    assert not exact
    trained = [t for t in encode_sft(tokenizer, example, task, 128)["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Hello there<|im_end|>"


# ---------------------------------------------------------------- batching and packing

def toy_encoded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        prompt = n // 3  # the first third is "prompt"
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_collate_pads_right():
    batch = collate(toy_encoded([5, 9, 3]), pad_id=0, pad_to_multiple=8)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 16)
    assert batch["attention_mask"].sum(1).tolist() == [5, 9, 3]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["input_ids"].dtype == torch.long and "position_ids" not in batch
    assert collate(toy_encoded([5, 9]), pad_id=0)["input_ids"].shape == (2, 9)


def test_pack_rows_positions_and_labels():
    encoded = toy_encoded([5, 9, 7, 12, 4])
    rows = pack(encoded, seq_len=24, pad_id=0)
    assert len(rows) == 2 and all(len(r[k]) == 24 for r in rows for k in r)  # 5+9+7 | 12+4
    assert rows[0]["position_ids"] == list(range(5)) + list(range(9)) + list(range(7)) + list(range(3))
    assert rows[0]["input_ids"][:21] == sum((e["input_ids"] for e in encoded[:3]), [])
    assert rows[0]["attention_mask"] == [1] * 21 + [0] * 3
    assert rows[1]["position_ids"] == list(range(12)) + list(range(4)) + list(range(8))
    starts = [0, 5, 14]
    assert all(rows[0]["labels"][s] == IGNORE_INDEX for s in starts)
    assert rows[0]["labels"][21:] == [IGNORE_INDEX] * 3
    trained = sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows)
    assert trained == sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in encoded)
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].shape == (2, 24)
    with pytest.raises(DataError, match="seq_len"):
        pack(toy_encoded([30]), seq_len=24)


def test_packed_attention_mask_shape_and_blocks():
    mask = packed_attention_mask(torch.tensor([0, 1, 2, 0, 1]))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                             [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)
    additive = packed_attention_mask(torch.tensor([[0, 1, 2, 0, 1]]), dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16 and (additive[0, 0][expected] == 0).all()
    assert (additive[0, 0][~expected] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_forward_matches_separate_examples(impl):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=impl)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    encoded = toy_encoded([5, 9, 7])
    batch = collate(pack(encoded, seq_len=24), pad_id=0)
    ids, positions, labels = batch["input_ids"], batch["position_ids"], batch["labels"]

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in encoded]

        def max_error(**kwargs):
            logits = model(input_ids=ids, position_ids=positions, **kwargs).logits[0]
            offsets = [0, 5, 14]
            return max((logits[o:o + len(a)] - a).abs().max().item() for o, a in zip(offsets, alone))

        float_mask = packed_attention_mask(positions, dtype=torch.float32)
        assert max_error(attention_mask=float_mask) < 1e-5
        assert max_error(attention_mask=None, use_cache=False) < 1e-5   # transformers' detection
        # Pitfalls, kept as documentation: a 2D mask, or leaving the cache on, mixes examples.
        assert max_error(attention_mask=batch["attention_mask"], use_cache=False) > 1e-2
        assert max_error(attention_mask=None) > 1e-2
        bool_error = max_error(attention_mask=packed_attention_mask(positions))
        assert (bool_error < 1e-5) if impl == "sdpa" else (bool_error > 1e-2)  # eager adds masks

        # The packed loss is the token-weighted mean of the separate losses (labels shift).
        packed = model(input_ids=ids, position_ids=positions, attention_mask=float_mask, labels=labels).loss
        total, count = 0.0, 0
        for e in encoded:
            n = sum(t != IGNORE_INDEX for t in e["labels"][1:])
            loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
            total, count = total + loss.item() * n, count + n
        assert packed.item() == pytest.approx(total / count, rel=1e-5)


# ---------------------------------------------------------------- `underpar eval task`

@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_folder(tiny_lm, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder




@pytest.mark.parametrize("engine", ["static", "loop"])
def test_answers_with_a_progress_bar_are_the_same(tiny_lm, tokenizer, engine):
    """With a label, `answer` generates batch by batch (so a bar moves) and gets the completions
    and counts of one `generate` call: the same batches (the static engine's last one filled up)."""
    from underpar.eval.accuracy import answer
    from underpar.eval.generate import DecodeConfig, GenerationStats
    task = get_task("basic_arithmetic")
    examples = task.load("test", limit=5)
    decode = DecodeConfig(max_new_tokens=6, batch_size=2, engine=engine)
    plain_stats, shown_stats = GenerationStats(), GenerationStats()
    plain = answer(tiny_lm, tokenizer, task, examples, decode, plain_stats)
    shown = answer(tiny_lm, tokenizer, task, examples, decode, shown_stats, label="scoring")
    assert shown == plain and any(shown)
    for field in ("prompts", "batches", "prompt_tokens", "generated_tokens", "decode_steps"):
        assert getattr(shown_stats, field) == getattr(plain_stats, field), field


def eval_task_cases(root):
    return [
        (["--limit", "-1"], "error: limit = -1 is out of range; it must lie in [1, inf]"),
        (["--limit", "0"], "error: limit = 0 is out of range; it must lie in [1, inf]"),
        (["--limit", "ten"], "error: limit: expected an integer, got 'ten'"),
        (["--max-new-tokens", "0"], "error: max_new_tokens = 0 is out of range; it must lie in [1, inf]"),
        (["--batch-size", "-2"], "error: batch_size = -2 is out of range; it must lie in [1, inf]"),
        (["--task", "nope"], "error: task = 'nope' is not valid; choose one of: gsm8k, math500, s1k, chat, asdiv"),
        (["--task", "chat"], "error: task = 'chat' has no gold answers to score; choose an answer-scored task "
                             "(gsm8k, math500, asdiv, gsm_symbolic, basic_arithmetic, chain_sum, chain_sum_easy, "
                             "basic_arithmetic_easy)"),
        (["--task", "asdiv", "--split", "train"], "error: task = 'asdiv' has no 'train' split (its splits: test)"),
        (["--split", "dev"], "error: task = 'gsm_symbolic' has no 'dev' split (its splits: train, validation, test)"),
        (["--task", "gsm8k", "--path", str(root / "missing.jsonl")], f"error: task data file {root / 'missing.jsonl'} does not exist"),
        (["--task", "gsm8k", "--path", str(root / "empty.jsonl")], f"error: {root / 'empty.jsonl'} has no test examples to score"),
        (["--model", "/no/such/model"], "error: model '/no/such/model' is not a folder (no such directory /no/such/model)"),
        (["--model", str(root)], f"error: model folder {root} has no config.json"),
        (["--model", ""], "error: model = '' names no model"),
    ]


def test_eval_task_bad_options(tmp_path, monkeypatch, capsys):
    """Issue 10, found 6: every option is checked like a config field, before the model loads:
    one error line, exit code 2 (--limit -1 scored all but the last example, --limit 0 gave
    "accuracy": null)."""
    from underpar.model import hf
    (tmp_path / "empty.jsonl").write_text("")
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model loaded before the error"))
    for args, expected in eval_task_cases(tmp_path):
        code, out, err = run_main(monkeypatch, capsys, "eval", "task", *args)
        assert code == 2 and out == "", (args, err)
        assert err.strip().splitlines() == [err.strip()] and err.startswith(expected), (args, err)


def test_eval_task_says_what_it_does(tiny_folder, monkeypatch, capsys):
    """A line while the model loads and a bar over the examples (on stderr; stdout is the JSON),
    none of transformers' loading bars."""
    code, out, err = run_main(monkeypatch, capsys, "eval", "task", "--model", str(tiny_folder), "--task",
                              "basic_arithmetic", "--limit", "5", "--batch-size", "2", "--max-new-tokens", "4")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "basic_arithmetic" and result["n"] == 5 and result["accuracy"]["n"] == 5
    lines = err.splitlines()
    assert lines[0] == f"loading model {tiny_folder} ..."
    assert lines[1].startswith(f"loaded {tiny_folder} (") and lines[1].endswith("scoring 5 examples of basic_arithmetic (test)")
    assert "basic_arithmetic test" in lines[2] and "5/5" in lines[2] and len(lines) == 3, err
    assert "Loading weights" not in err
    code, out, err = run_main(monkeypatch, capsys, "eval", "task", "--model", str(tiny_folder), "--max-new-tokens", "600")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: max_new_tokens = 600 is more than model '{tiny_folder}' has positions for (512); lower it to at most 512")
