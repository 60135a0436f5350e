"""RandOpt: the population draw, K, majority voting, and the track end to end on a tiny random
Llama with SmolLM2's chat tokenizer (population.jsonl, kill and resume, base weights restored,
two torchrun processes launched by benchmarks/scaling.py against one)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from underpar import ui  # noqa: E402
from underpar import config as cfglib  # noqa: E402
from underpar.data.tasks import TASKS, Example, Task  # noqa: E402
from underpar.errors import ConfigError, UnderparError  # noqa: E402
from underpar.eval.ensemble import majority_vote, vote_all  # noqa: E402
from underpar.model import hf  # noqa: E402
from underpar.model import smollm2 as offline  # noqa: E402
from underpar.tracks import randopt  # noqa: E402
from underpar.tracks import randopt_search as search  # noqa: E402
from underpar.tracks.randopt_diagnostics import bits_per_byte, encode_documents, ensemble_logprobs  # noqa: E402
from clirun import run_main  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only add contention
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- population, K, ranking

def test_population_is_drawn_without_replacement_and_reproducibly():
    sigmas = [5e-4, 1e-3, 2e-3]
    pop = search.draw_population(5000, sigmas, seed=7)
    seeds = [s for s, _ in pop]
    assert len(set(seeds)) == 5000 and all(0 <= s < 2**31 for s in seeds)
    assert pop == search.draw_population(5000, sigmas, seed=7)
    assert search.draw_population(5000, sigmas, seed=8) != pop
    counts = {sigma: sum(1 for _, g in pop if g == sigma) for sigma in sigmas}
    assert set(counts) == set(sigmas) and min(counts.values()) > 1500  # each sigma ~1/3


def test_top_k_and_ranking():
    assert [search.top_k(r, 128) for r in (0.02, 0.05)] == [2, 6]
    assert search.top_k(0.02, 10) == 1 and search.top_k(1.0, 7) == 7
    assert search.top_k(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    rows = [{"reward": r} for r in (0.5, 0.75, 0.5, 1.0, 0.75)]
    assert search.rank(rows) == [3, 1, 4, 0, 2]  # ties keep draw order


def test_k1_indices_take_the_top_then_a_seeded_sample():
    ranked = list(range(20))
    assert search.k1_indices(-1, ranked, 3, 0) == ranked
    assert search.k1_indices(0, ranked, 3, 0) == []
    chosen = search.k1_indices(8, ranked, 3, 0)
    assert chosen[:3] == [0, 1, 2] and len(set(chosen)) == 8 and chosen == sorted(chosen)
    assert chosen == search.k1_indices(8, ranked, 3, 0) != search.k1_indices(8, ranked, 3, 1)


def test_dist_helpers_on_one_process():
    from underpar import dist

    env = dist.Env(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    rounds = []
    assert dist.sharded_map(env, [3, 1, 2], lambda x: x * 10, on_round=rounds.append) == [30, 10, 20]
    assert rounds == [[(0, 30)], [(1, 10)], [(2, 20)]]  # one round per item, as it completes
    assert dist.sharded_map(env, [], lambda x: x) == []
    assert dist.agree(env, True) is True and dist.agree(env, False) is False
    assert dist.broadcast_object(env, {"path": "runs/x"}) == {"path": "runs/x"}
    with dist.main_first(env):
        dist.barrier(env)


# ---------------------------------------------------------------- majority vote

def test_majority_vote_hand_table():
    # members in rank order; ties go to the key of the highest-ranked voter
    assert majority_vote(["3", "4", "4"], "numeric") == "4"
    assert majority_vote(["3", "4"], "numeric") == "3"
    assert majority_vote(["4", "3", "3", "4"], "numeric") == "4"
    assert majority_vote(["3", "4", "4", "3"], "numeric") == "3"
    # None does not vote, unless nobody answered
    assert majority_vote([None, None, "7"], "numeric") == "7"
    assert majority_vote([None, "5", "6"], "numeric") == "5"
    assert majority_vote([None, None], "numeric") is None
    # equivalent answers vote together; the winner is the top voter's own text
    assert majority_vote(["2", "1,000", "1000.0", "$1000"], "numeric") == "1,000"
    assert majority_vote(["1/3", "1/2", "0.5"], "math") == "1/2"
    assert majority_vote(["0.5", "\\frac{1}{2}", "1/3", "x"], "math") == "0.5"
    assert majority_vote(["x", "1/2", "0.5", "x"], "math") == "x"  # 2 vs 2: "x" is ranked higher
    table = [["1", "2", None], ["2", "2", None], ["1", "3", None]]  # members x questions
    assert vote_all(table, "numeric") == ["1", "2", None]


def test_paired_mcnemar_by_hand():
    from underpar.tracks.randopt_diagnostics import paired

    assert paired([True, False, False, True, False], [True, True, True, False, False]) == \
        {"gained": 2, "lost": 1, "mcnemar_p": 1.0}
    assert paired([False] * 10, [True] * 10) == {"gained": 10, "lost": 0, "mcnemar_p": 2 / 2**10}
    assert paired([True, False] * 6, [False, True] * 6)["mcnemar_p"] == 1.0  # 6 vs 6
    assert paired([True] * 3, [True] * 3) == {"gained": 0, "lost": 0, "mcnemar_p": 1.0}


def test_ensemble_probabilities_are_averaged_stably():
    logp = [[torch.tensor([-0.1, -2.0, -800.0], dtype=torch.float64)],
            [torch.tensor([-3.0, -0.5, -900.0], dtype=torch.float64)]]
    (mixed,) = ensemble_logprobs(logp)
    expected = torch.log((logp[0][0].exp() + logp[1][0].exp()) / 2)
    assert torch.allclose(mixed[:2], expected[:2])
    assert torch.isclose(mixed[2], torch.tensor(-800.0 - math.log(2), dtype=torch.float64))  # exp underflows
    assert ensemble_logprobs([logp[0]])[0].equal(logp[0][0])  # one member: itself
    # 3 tokens of -ln 2 nats each over 3 bytes: 1 bit per byte
    assert bits_per_byte([torch.full((3,), -math.log(2), dtype=torch.float64)], 3) == pytest.approx(1.0)


def test_documents_count_the_bytes_of_the_scored_tokens(loaded):
    _, tokenizer = loaded
    docs = ["Héllo wörld, this is a test document.", "x", "Another one."]
    ids, n_bytes = encode_documents(tokenizer, docs, max_tokens=6)
    assert [len(d) for d in ids] == [6, 3]  # cut to 6 tokens; "x" is one token: nothing to score
    assert n_bytes == sum(len(tokenizer.decode(d[1:]).encode("utf-8")) for d in ids)
    full, _ = encode_documents(tokenizer, docs[:1], max_tokens=10**6)
    assert len(tokenizer.decode(full[0]).encode()) == len(docs[0].encode()) > n_bytes


# ---------------------------------------------------------------- the track end to end

class LengthMod3(Task):
    """A custom task (README example): the "answer" is the completion's length mod 3, so a
    random model scores about 1/3 and different perturbations score differently."""

    name, answer_kind, splits = "length_mod3", "numeric", ("train", "test")

    def load(self, split, limit=None, seed=0, path=None):
        offset = 0 if split == "train" else 1000
        n = 8 if limit is None else limit
        return [Example(f"Item {offset + i}: say anything.", str((offset + i) % 3)) for i in range(n)]

    def extract(self, text):
        return str(len(text or "") % 3)


@pytest.fixture(scope="module")
def custom_task():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(TASKS._entries, "length_mod3", LengthMod3())  # registered for this module's tests only
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(offline.smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         initializer_range=0.05, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return hf.load_model(str(model_dir), device="cpu")


# top ratios 0.1 and 0.2 both give K=1 of 6: the K=1 ensemble is reported once
SMALL = ["population=6", "sigmas=[0.01, 0.03]", "top_ratios=[0.1, 0.2, 0.5]", "train_examples=8", "test_examples=5",
         "decode.max_new_tokens=8", "decode.batch_size=8", "device=cpu", "diagnostics.merge_pairs=2",
         "diagnostics.bpb_documents=0"]


def config(model_dir, root, *sets, task="length_mod3", tests='["length_mod3", "basic_arithmetic"]'):
    return cfglib.resolve("randopt", None, [f"model={model_dir}", f"task={task}", f"test_tasks={tests}",
                                            *SMALL, f"runs_root={root}", *sets])


def table(summary, without=()):
    """What a run concludes, without timings and paths (from a summary or its summary.json);
    `without`: diagnostics left out (merges and held-out bpb decode one candidate at a time
    after the search, so a run that only changes the search or its resume skips them)."""
    data = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else summary
    out = {k: data[k] for k in ("base", "population", "ensembles", "diagnostics")}
    out["diagnostics"] = {k: v for k, v in out["diagnostics"].items() if k not in without}
    return out


SEARCH_ONLY = ("merges", "bpb")  # the diagnostics that do not depend on how the search decoded


def population_rows(run_dir):
    lines = (run_dir / search.POPULATION_FILE).read_text().splitlines()
    return [{k: r[k] for k in ("index", "seed", "sigma", "reward", "digest")} for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def full_run(custom_task, model_dir, loaded, tmp_path_factory):
    from underpar.eval import generate as generate_module

    model, tokenizer = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(model_dir, tmp_path_factory.mktemp("full"), "diagnostics.bpb_documents=2")
    built, bars = [], []
    real_decoder = generate_module._StaticDecoder

    def counted(*args, **kwargs):
        built.append(args[1])  # the (rows, max_len, ...) key
        return real_decoder(*args, **kwargs)

    def recorded_progress(disable=False):
        bars.append(ui.progress(disable=True))  # a hidden display still keeps its tasks
        return bars[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.delattr(model, "_underpar_static_decoder", raising=False)
        mp.setattr(generate_module, "_StaticDecoder", counted)
        mp.setattr(search, "progress", recorded_progress)
        summary = randopt.run(cfg, model, tokenizer)
    return cfg, summary, before, built, [task for bar in bars for task in bar.tasks]


def test_run_end_to_end(full_run, loaded):
    cfg, summary, before, built, bars = full_run
    model, _ = loaded
    # one static decoder for the whole run: train (8 prompts) and test sets (5, padded to 8)
    # of different prompt lengths all fit the one the warm-up built
    assert len(built) == 1 and built[0][0] == 8 == summary.decoder_rows
    run_dir = Path(summary.run_dir)
    # one line per candidate, in the drawn population, scores that differ between candidates
    rows = population_rows(run_dir)
    population = search.draw_population(6, [0.01, 0.03], 0)
    assert sorted(r["index"] for r in rows) == list(range(6))
    assert [(r["seed"], r["sigma"]) for r in sorted(rows, key=lambda r: r["index"])] == population
    assert len({r["digest"] for r in rows}) == 6 and len({r["reward"] for r in rows}) > 1
    # selection and ensembles: one row per test set and K, each K once with the ratios that give it
    ranked = search.rank(sorted(rows, key=lambda r: r["index"]))
    assert [e.k for e in summary.ensembles] == [1, 3, 1, 3]
    assert [e.ratios for e in summary.ensembles] == [[0.1, 0.2], [0.5]] * 2
    assert "| length_mod3 | 1 (0.1, 0.2) |" in randopt.report(summary)
    assert summary.test_examples == {"length_mod3": 5, "basic_arithmetic": 5}
    # paired against the base: the accuracy difference is gained minus lost questions
    assert all(e.gained - e.lost == round(e.delta * e.accuracy["n"]) for e in summary.ensembles)
    assert all(0 < e.mcnemar_p <= 1 for e in summary.ensembles)
    assert [e.task for e in summary.ensembles] == ["length_mod3"] * 2 + ["basic_arithmetic"] * 2
    assert summary.population["top"][0]["index"] == ranked[0]
    # K=1 ensemble = the top seed alone = the K=1 diagnostic's train-selected seed
    k1 = summary.diagnostics.k1
    assert k1["seeds"] == 6 and k1["train_selected_index"] == ranked[0]
    assert summary.ensembles[0].accuracy["mean"] == k1["train_selected"]
    assert k1["oracle_best"] == max(p["test_accuracy"] for p in k1["points"])
    assert summary.ensembles[1].members_mean_accuracy == pytest.approx(
        sum(p["test_accuracy"] for p in k1["points"][:3]) / 3)
    merges = summary.diagnostics.merges
    assert len(merges["pairs"]) == 2 and all(set(p) >= {"average", "sum", "parents"} for p in merges["pairs"])
    assert all({p["a"], p["b"]} <= set(ranked[:3]) for p in merges["pairs"])
    bpb = summary.diagnostics.bpb
    assert bpb["documents"] == 2 and bpb["bytes"] > 0 and 0 < bpb["base"] < 40
    assert [(e["k"], e["ratios"]) for e in bpb["ensembles"]] == [(1, [0.1, 0.2]), (3, [0.5])]
    # every phase longer than a moment shows a bar that ends full, with a rate (ETA: rich's column)
    assert [(b.description, b.completed, b.total) for b in bars] == [
        ("base model", 3, 3), ("population", 6, 6), ("ensemble members", 3, 3),
        ("K=1 seeds on length_mod3", 3, 3), ("merges on length_mod3", 4, 4), ("held-out bpb", 4, 4)]
    assert [b.fields["info"].split(",")[0].split()[1] for b in bars] == [
        "sets/s", "seeds/s", "members/s", "seeds/s", "merges/s", "models/s"]
    assert bars[1].fields["info"].endswith(f"best {max(r['reward'] for r in rows):.3f}")
    log = (run_dir / "train.log").read_text()
    assert "warm-up: building the decoder (8 rows, 8 new tokens)" in log and "warm-up done in" in log
    assert summary.search.scored == 6 and summary.search.seeds_per_second > 0
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(summary)))
    assert (run_dir / "k1_transfer.png").is_file()
    assert f"{summary.ensembles[0].accuracy['mean']:.3f}" in randopt.report(summary)
    assert cfglib.load_json(run_dir / "config.json") == cfg
    # the model is the base again, bit for bit
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_population_engine_scores_like_one_candidate_at_a_time(full_run, model_dir, loaded, tmp_path):
    """decode.population=4: candidates decoded 4 at a time in one forward (6 = a chunk of 4 and a
    padded chunk of 2) give the same completions (digests), rewards, ensembles and K=1 seeds
    (merges and held-out bpb decode one candidate at a time whatever decode.population is)."""
    _, summary_full, before, _, _ = full_run
    model, tokenizer = loaded
    summary = randopt.run(config(model_dir, tmp_path, "diagnostics.merge_pairs=0", "decode.population=4"),
                          model, tokenizer)
    by_index = lambda rows: sorted(rows, key=lambda r: r["index"])  # noqa: E731
    assert by_index(population_rows(Path(summary.run_dir))) == by_index(population_rows(Path(summary_full.run_dir)))
    assert summary.diagnostics.merges is None and summary.diagnostics.bpb is None
    assert table(summary, SEARCH_ONLY) == table(summary_full, SEARCH_ONLY)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_es_method_runs_resumes_and_saves_a_model(custom_task, model_dir, loaded, tmp_path, monkeypatch):
    """--method es: ES iterations on the train reward, es.jsonl per iteration, the final weights
    tested and saved as a Hugging Face folder, the base back in the model; a run killed in its
    second iteration resumes to the same weights; decode.population=4 gives the same run."""
    from transformers import AutoModelForCausalLM

    from underpar.tracks import randopt_es

    model, tokenizer = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    es_sets = ["method=es", "es.iterations=2", "es.pairs=2", "es.sigma=0.03", "es.lr=3e-4"]
    whole = randopt.run(config(model_dir, tmp_path / "whole", *es_sets), model, tokenizer)
    assert isinstance(whole, randopt_es.ESSummary) and whole.evaluations == 8 and len(whole.iterations) == 2
    log = [json.loads(line) for line in (Path(whole.run_dir) / randopt_es.ES_FILE).read_text().splitlines()]
    assert [row["iteration"] for row in log] == [0, 1] and any(row["terms"] for row in log)
    assert set(whole.test) == {"length_mod3", "basic_arithmetic"}
    assert all(t["gained"] - t["lost"] == round(t["delta"] * t["accuracy"]["n"]) for t in whole.test.values())
    saved = AutoModelForCausalLM.from_pretrained(whole.model_dir).state_dict()
    assert any(not torch.equal(saved[k], before[k]) for k in before)  # the ES weights, not the base
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base again

    real, calls = randopt_es.score_candidate, []

    def killed_in_second_iteration(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(randopt_es, "score_candidate", killed_in_second_iteration)
    with pytest.raises(KeyboardInterrupt):
        randopt.run(config(model_dir, tmp_path / "killed", *es_sets), model, tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (run_dir,) = [p for p in (tmp_path / "killed").iterdir() if p.is_dir()]
    assert len((run_dir / randopt_es.ES_FILE).read_text().splitlines()) == 1
    calls.clear()
    monkeypatch.setattr(randopt_es, "score_candidate", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = randopt.run(None, model, tokenizer, resume=run_dir)
    assert len(calls) == 4  # iteration 2 only
    assert resumed.iterations == whole.iterations and resumed.test == whole.test
    again = AutoModelForCausalLM.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    batched = randopt.run(config(model_dir, tmp_path / "batched", *es_sets, "decode.population=4"), model, tokenizer)
    assert batched.iterations == whole.iterations and batched.test == whole.test


def test_kill_and_resume_scores_only_the_missing(full_run, model_dir, loaded, tmp_path, monkeypatch, capsys):
    cfg_full, summary_full, before, _, _ = full_run
    model, tokenizer = loaded
    real = randopt.score_candidate
    calls = []

    def killed_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(args[3])  # the seed
        return real(*args, **kwargs)

    monkeypatch.setattr(randopt, "score_candidate", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        randopt.run(config(model_dir, tmp_path, "diagnostics.merge_pairs=0"), model, tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored on failure
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # (a run store file may sit beside it)
    assert len(population_rows(run_dir)) == 3
    # Ctrl-C says what is kept and how to continue (issue 10), on the console and in train.log
    said = (f"interrupted: 3 of 6 candidates are scored and kept in {run_dir / search.POPULATION_FILE}; "
            f"continue with `underpar randopt --resume {run_dir}` (only the missing ones are scored)")
    assert said in capsys.readouterr().out.splitlines()
    assert (run_dir / "train.log").read_text().splitlines()[-1] == said
    with open(run_dir / search.POPULATION_FILE, "a") as f:
        f.write('{"index": 3, "seed": ')  # torn by the kill: dropped and rescored

    calls.clear()
    monkeypatch.setattr(randopt, "score_candidate", lambda *a, **k: (calls.append(a[3]), real(*a, **k))[1])
    resumed = randopt.run(None, model, tokenizer, resume=run_dir)
    population = search.draw_population(6, [0.01, 0.03], 0)
    assert calls == [s for s, _ in population[3:]]
    assert resumed.search.scored == 3 and resumed.search.resumed == 3
    assert population_rows(run_dir) == population_rows(Path(summary_full.run_dir))
    assert table(resumed, SEARCH_ONLY) == table(summary_full, SEARCH_ONLY)


def test_resume_refuses_a_different_search_and_a_finished_run(full_run, model_dir, tmp_path, monkeypatch):
    cfg, summary, _, _, _ = full_run
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    with pytest.raises(ConfigError, match="seed"):
        randopt.run(config(model_dir, tmp_path, "seed=1"), resume=summary.run_dir)
    with pytest.raises(UnderparError, match="the run finished"):
        randopt.run(None, resume=summary.run_dir)


def test_config_errors_name_the_problem(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="no 'train' split"):
        config(model_dir, tmp_path, task="asdiv")
    with pytest.raises(ConfigError, match="sigmas"):
        config(model_dir, tmp_path, "sigmas=[]")
    with pytest.raises(ConfigError, match="top_ratios"):
        config(model_dir, tmp_path, "top_ratios=[0.0]")
    with pytest.raises(ConfigError, match="unknown task|is not valid"):
        config(model_dir, tmp_path, tests='["nope"]')
    with pytest.raises(ConfigError, match="task=path"):
        config(model_dir, tmp_path, 'task_paths=["gsm8k"]')
    with pytest.raises(ConfigError, match="decode.population"):
        config(model_dir, tmp_path, "decode.population=0")




def test_cli_refuses_bad_input_before_any_work(full_run, model_dir, tmp_path, monkeypatch, capsys):
    """Issue 10: each randopt input a new user may get wrong ends in one `error:` line and exit
    code 2, before the model loads and before a run directory exists. `--population 0` was
    dropped (a default search started); options are checked exactly as their config fields."""
    finished = full_run[1].run_dir
    other = tmp_path / "pretrain-run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"track": "pretrain", "config": {}}))
    runs, missing = tmp_path / "runs", tmp_path / "missing.jsonl"
    model = ["--model", str(model_dir)]
    cases = [
        (["--population", "0"], "error: population = 0 is out of range; it must lie in [1, 2147483648]"),
        (["--population", "-3"], "error: population = -3 is out of range"),
        (["--population", "many"], "error: Invalid value for '--population'"),
        (["--task", ""], "error: task = '' is not valid; choose one of: "),
        (["--task", "nope"], "error: task = 'nope' is not valid"),
        (["--model", ""], "error: model = '' names no model"),
        (["--model", str(tmp_path / "no")], f"error: model '{tmp_path / 'no'}' is not a folder (no such directory"),
        (["--model", str(model_dir / "config.json")], f"error: model '{model_dir / 'config.json'}' is "),  # a file
        (["--preset", "tiny-cpu"], "error: preset 'tiny-cpu' is for 'pretrain', not 'randopt'"),
        ([*model, "--set", "sigmas=[]"], "error: sigmas = [] must be a non-empty list of positive numbers"),
        ([*model, "--set", "top_ratios=[0]"], "error: top_ratios = [0.0] must be a non-empty list"),
        ([*model, "--set", "include=[]"], "error: include = [] selects no parameter to perturb"),
        ([*model, "--set", 'task_paths=["gsm8k=x.jsonl"]'], "error: task_paths names 'gsm8k', which is neither"),
        ([*model, "--task", "gsm8k", "--set", f'task_paths=["gsm8k={missing}"]'],
         f"error: task data file {missing} does not exist"),
        (["--resume", str(tmp_path)], f"error: cannot resume {tmp_path}: it is not a run directory (no config.json)"),
        (["--resume", str(other)], f"error: cannot resume {other} with randopt: it is a pretrain run; "
                                   f"resume it with `underpar pretrain --resume {other}`"),
        (["--resume", finished], f"error: cannot resume {finished}: the run finished"),
        (["--resume", finished, "--preset", "randopt-smollm2"], "error: --preset and --resume together"),
        (["--resume", finished, "--population", "0"], "error: population = 0 is out of range"),
        ([*model, "--set", "device=cpu", "--set", "backend=triton"], "error: backend 'triton' needs "),
        ([*model, "--set", f"runs_root={model_dir / 'config.json'}"], "error: runs_root = "),
    ]
    if not torch.cuda.is_available():
        cases.append(([*model, "--set", "device=cuda"], "error: device = 'cuda', but this machine has no CUDA device"))
    real_load = hf.load_model
    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    for args, expected in cases:
        code, out, err = run_main(monkeypatch, capsys, "randopt", "--set", f"runs_root={runs}", *args)
        assert code == 2 and "Traceback" not in err and err.strip().splitlines()[-1].startswith(expected), (args, err)
        assert not runs.exists(), args
    # a glob that matches nothing is known once the model is there, still before the run directory
    monkeypatch.setattr(hf, "load_model", real_load)
    code, out, err = run_main(monkeypatch, capsys, "randopt", *model, "--task", "basic_arithmetic", "--set",
                              'test_tasks=["basic_arithmetic"]', "--set", 'include=["nothing.*"]', "--set", f"runs_root={runs}")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: perturbation include=['nothing.*']")
    assert out.splitlines() == ["loading task data: basic_arithmetic train x16, basic_arithmetic test x32",
                                f"loading model {model_dir} on cpu"]
    # a base model without a chat template (tasks are asked as chats)
    plain = tmp_path / "no-template"
    shutil.copytree(model_dir, plain, ignore=shutil.ignore_patterns("chat_template.jinja"))
    settings = json.loads((plain / "tokenizer_config.json").read_text())
    settings.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(settings))
    code, out, err = run_main(monkeypatch, capsys, "randopt", "--model", str(plain), "--task", "basic_arithmetic", "--set",
                              'test_tasks=["basic_arithmetic"]', "--set", f"runs_root={runs}")
    assert code == 2 and err.strip().splitlines()[-1].startswith(f"error: model '{plain}' has no chat template")
    assert not runs.exists()


def _scaling_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_processes_score_like_one(model_dir, loaded, tmp_path):
    """Two gloo ranks, launched as benchmarks/scaling.py launches them (torchrun, the CLI, NVLink
    multicast off), score the same population and reach the same conclusions as one in-process
    run (3 candidates: the second round is rank 0's alone); the benchmark's rows for the pair
    (rewards equal to one process, speedup, efficiency, the per-round bound from one process's
    candidate times) come out of those two summaries."""
    scaling = _scaling_benchmark()
    preset = scaling.PRESETS["randopt"]
    sets = [s for s in SMALL if not s.startswith(("diagnostics.merge", "population="))] + ["population=3",
        f"model={model_dir}", "task=basic_arithmetic", "diagnostics.merge_pairs=1",
        "test_tasks=[\"basic_arithmetic\"]", "test_examples=4"]
    model, tokenizer = loaded
    one = randopt.run(cfglib.resolve("randopt", preset, [*sets, f"runs_root={tmp_path / 'one'}"]), model, tokenizer)
    two = scaling.launch(2, "randopt", preset, sets, tmp_path / "two", tmp_path / "randopt-2.log")
    assert "error" not in two, two.get("log_tail")
    assert two["world_size"] == 2
    key = lambda r: r["index"]  # noqa: E731
    assert sorted(population_rows(Path(two["run_dir"])), key=key) == sorted(population_rows(Path(one.run_dir)), key=key)
    assert table(two) == json.loads(json.dumps(table(one)))
    # the benchmark's rows, from the two runs' summary.json
    base = scaling.randopt_row(1, {**json.loads((Path(one.run_dir) / "summary.json").read_text()), "wall_seconds": 1.0}, None)
    row = scaling.randopt_row(2, two, base)
    assert (row["gpus"], row["world_size"], row["scored"], row["rewards_equal_to_1"]) == (2, 2, 3, 3)
    assert row["seeds_per_second"] > 0 and row["efficiency"] == pytest.approx(row["speedup"] / 2)
    assert len(base["candidate_seconds"]) == 3 and all(0 < b <= 1 for b in base["round_bound"].values())
    lines = scaling.table("randopt", [base, row]).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 1 |") and lines[3].startswith("| 2 |") and lines[3].endswith("| 3 |")
