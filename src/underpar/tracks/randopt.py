"""The RandOpt track (gradient-free post-training): score N seeded random perturbations
W0 + sigma * R(seed) of a pretrained model by greedy reward on a train slice, keep the top K,
and answer held-out questions by majority vote of the K perturbed models.

load (task data, then the model; the run directory is created only once every input has
passed, so bad input leaves nothing behind) -> warm-up -> base accuracy -> population search
(one JSON line per candidate as it arrives, so a stopped search resumes; candidate i on rank
i % world_size under torchrun) -> top-K by train reward (each K once, with the top ratios that
give it) -> majority-vote ensembles per test set and K -> diagnostics (K=1 train-vs-test
transfer, pairwise merges, held-out bits per byte) -> summary.json + plot. Every phase shows a
progress bar or a line; Ctrl-C says what is kept and how to resume. The model holds the base
weights again when `run` returns, also when it fails.

Speed: weights are rebuilt in place from a resident base copy (one fused launch over the flat
parameter buffer, no restore pass), and every prompt set is generated as whole batches of one
fixed row count, so one static decoder, built and compiled once in an untimed warm-up, serves
every call. decode.population = P > 1 decodes P candidates in one forward (randopt_population.py)
for the search, the ensemble members and the K=1 seeds; base, merges and bpb stay one at a time.

Beside this file: randopt_search.py (the population, selection, prompt sets, scoring),
randopt_diagnostics.py (population statistics, K=1 transfer, merges, held-out bpb) and
randopt_summary.py (the typed summary and the report).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from underpar import config as cfglib
from underpar import dist
from underpar.config import bounded, choice, items, nested
from underpar.data.tasks import TASKS, get_task
from underpar.errors import ConfigError, UnderparError
from underpar.eval.ensemble import vote_all
from underpar.eval.stats import accuracy_ci, mean
from underpar.kernels.perturb import BACKENDS, check_backend
from underpar.kernels.perturb_space import PerturbSpace
from underpar.model import hf
from underpar.runs.rundir import CONFIG, RunDir, check_run_name, check_runs_root
from underpar.tracks import randopt_diagnostics as diagnose
from underpar.tracks.randopt_search import (
    POPULATION_FILE, Answerer, Candidates, PromptSet, RODecodeConfig, correct, draw_population, k1_indices, load_examples,
    map_with_progress, merge_pairs, rank, read_population, say_how_to_resume, score_candidate, tokenize_prompts, top_k,
)
from underpar.tracks.randopt_es import ES_FILE, ESConfig, ESSummary
from underpar.tracks.randopt_es import run_track as run_es_track
from underpar.tracks.randopt_population import PopulationScorer
from underpar.tracks.randopt_summary import Diagnostics, EnsembleResult, RandOptSummary, SearchStats, report

# Fields that define the population and its train rewards: a resumed run must keep them.
SEARCH_FIELDS = ("model", "dtype", "task", "train_examples", "task_paths", "data_seed", "population",
                 "sigmas", "seed", "include", "exclude", "backend", "decode", "method", "es")


@dataclasses.dataclass
class RODiagnosticsConfig:
    # K=1 transfer on the first test set: -1 = the whole population, 0 = off, n = the top
    # max-K members (answered already for the ensembles) plus a seeded uniform sample of the rest.
    k1_seeds: int = bounded(-1, -1)
    merge_pairs: int = bounded(2, 0)  # pairs of top max-K members merged by average and by sum
    bpb_documents: int = bounded(8, 0)  # built-in validation documents for held-out bpb; 0 = off
    bpb_max_tokens: int = bounded(1024, 2)  # each document is cut to this many tokens


@dataclasses.dataclass
class RandOptConfig:
    """Defaults are a small search that finishes on a CPU in minutes; the `randopt-smollm2`
    preset is the GPU-sized one (population 128, 64 train / 200 test problems, 256 tokens)."""

    name: str = "randopt"
    model: str = "smollm2-135m"  # smollm2-135m, a local save_pretrained folder, or a hub id
    dtype: str = choice("auto", ("auto", "bfloat16", "float32"))  # auto: bf16 on CUDA, fp32 on CPU
    device: str = choice("auto", ("auto", "cpu", "cuda"))
    task: str = choice("gsm_symbolic", TASKS)  # train task: its "train" split, the first train_examples
    train_examples: int = bounded(16, 1)
    # "test" splits, the first test_examples of each (a list field naming registered tasks)
    test_tasks: list[str] = dataclasses.field(default_factory=lambda: ["gsm_symbolic", "asdiv"],
                                              metadata={"choices": TASKS})
    test_examples: int = bounded(32, 1)
    task_paths: list[str] = items([])  # "task=path" local files (gsm8k, math500); else hub/generated
    data_seed: int = 0  # generated tasks: which problems (fixed across global seeds)
    population: int = bounded(8, 1, 2**31)
    sigmas: list[float] = items([5e-4, 1e-3, 2e-3])
    seed: int = bounded(0, 0)  # the global seed: draws the population
    top_ratios: list[float] = items([0.02, 0.05])  # K = max(1, int(ratio * population))
    include: list[str] = items(["*"])  # parameter-name globs to perturb
    exclude: list[str] = items([])
    backend: str = choice("auto", BACKENDS)  # perturbation kernel: auto = Triton on CUDA
    decode: RODecodeConfig = nested(RODecodeConfig)
    method: str = choice("randopt", ("randopt", "es"))  # es: iterative updates instead (randopt_es.py)
    es: ESConfig = nested(ESConfig)  # method = es only
    diagnostics: RODiagnosticsConfig = nested(RODiagnosticsConfig)
    runs_root: str = "runs"

    def check(self) -> None:
        check_run_name(self.name)
        if not self.sigmas or not all(math.isfinite(s) and s > 0 for s in self.sigmas):
            raise ConfigError(f"sigmas = {self.sigmas} must be a non-empty list of positive numbers")
        if not self.top_ratios or not all(0 < r <= 1 for r in self.top_ratios):
            raise ConfigError(f"top_ratios = {self.top_ratios} must be a non-empty list of numbers in (0, 1]")
        if not self.test_tasks or len(set(self.test_tasks)) != len(self.test_tasks):
            raise ConfigError(f"test_tasks = {self.test_tasks} must name at least one task, each once")
        for name, split in [(self.task, "train"), *((t, "test") for t in self.test_tasks)]:
            task = get_task(name)
            if task.answer_kind is None:
                scored = ", ".join(n for n, t in TASKS.items() if t.answer_kind is not None)
                raise ConfigError(f"task {name!r} has no gold answers; randopt needs an answer-scored task ({scored})")
            if split not in task.splits:
                raise ConfigError(f"task {name!r} has no {split!r} split (it has {list(task.splits)}); "
                                  f"choose another {'task' if split == 'train' else 'test task'}")
        if not self.include:
            raise ConfigError("include = [] selects no parameter to perturb; the default ['*'] selects all")
        if not self.model.strip():
            raise ConfigError("model = '' names no model; give smollm2-135m, a local folder or a hub id")
        used = {self.task, *self.test_tasks}
        for task in self._task_paths():
            if task not in used:
                raise ConfigError(f"task_paths names {task!r}, which is neither the train task nor a test task "
                                  f"({', '.join(sorted(used))}); its file would never be read")

    def task_path(self, name: str) -> str | None:
        return self._task_paths().get(name)

    def _task_paths(self) -> dict[str, str]:
        paths: dict[str, str] = {}
        for entry in self.task_paths:
            task, sep, path = entry.partition("=")
            if not sep or not task.strip() or not path.strip():
                raise ConfigError(f"task_paths entry {entry!r} must look like task=path/to/file.jsonl")
            if task.strip() in paths:
                raise ConfigError(f"task_paths names {task.strip()!r} twice; give one file per task")
            paths[task.strip()] = path.strip()
        return paths


def run(cfg: RandOptConfig | None = None, model: Any = None, tokenizer: Any = None,
        resume: str | Path | None = None) -> RandOptSummary | ESSummary:
    """RandOpt per `cfg`. A caller may pass a loaded (model, tokenizer), e.g. one model for
    several global seeds: the weights are the base again when this returns. `resume` = a run
    directory: its config.json (unless `cfg` is given; it must define the same search) and
    population.jsonl are reloaded and only the missing candidates are scored."""
    if resume is not None:
        saved = saved_config(resume)
        cfg = saved if cfg is None else cfg
        changed = [f for f in SEARCH_FIELDS if getattr(saved, f) != getattr(cfg, f)]
        if changed:
            raise ConfigError(f"resuming {resume} with different {', '.join(changed)}; these define the "
                              "population and its scores, so start a new run to change them")
    if cfg is None:
        raise ConfigError("randopt needs a config, or a run directory to resume")
    cfglib.validate(cfg)
    if model is not None and tokenizer is None:
        raise ConfigError("run(cfg, model, tokenizer): pass the model's tokenizer too")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda', but this machine has no CUDA device; use device=auto or cpu")
    env = dist.setup(cfg.device)
    try:
        return _run(cfg, env, model, tokenizer, resume)
    finally:
        dist.teardown()


def saved_config(run_dir: str | Path) -> RandOptConfig:
    """The config of a RandOpt run directory, to resume it; a folder that is no run directory, or
    another track's run, is refused with what to do instead."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UnderparError(f"cannot resume {run_dir}: it is not a run directory (no {CONFIG})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot resume {run_dir}: its {CONFIG} is not valid JSON ({e})") from None
    track = data.get("track") if isinstance(data, dict) else None
    if track != "randopt":
        other = f"a {track} run; resume it with `underpar {track} --resume {run_dir}`" if track in cfglib.TRACKS \
            else f"no underpar run ({CONFIG} has no track)"
        raise UnderparError(f"cannot resume {run_dir} with randopt: it is {other}")
    return cfglib.load_json(path)


def _run(cfg: RandOptConfig, env: dist.Env, model: Any, tokenizer: Any, resume: str | Path | None) -> RandOptSummary | ESSummary:
    timing: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timing[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    # ---- 1. checks, task data, model, prompt sets, then the run directory: bad input (a model
    # path, a task file, include globs) is refused before a directory exists; a finished run is
    # refused before anything loads
    run_dir = RunDir.resume(resume, env, needs=CONFIG) if resume is not None else None
    say = run_dir.log if run_dir is not None else _printer(env)
    check_backend(cfg.backend, env.device)
    if run_dir is None:
        check_runs_root(cfg.runs_root)
    if model is None:
        hf.check_model_name(cfg.model)
    with dist.main_first(env):  # rank 0 fills the caches (converted model, generated task data) first
        say(f"loading task data: {cfg.task} train x{cfg.train_examples}, "
            + ", ".join(f"{name} test x{cfg.test_examples}" for name in cfg.test_tasks))
        examples = [load_examples(cfg.task, "train", cfg.train_examples, cfg.data_seed, cfg.task_path(cfg.task))]
        examples += [load_examples(name, "test", cfg.test_examples, cfg.data_seed, cfg.task_path(name))
                     for name in cfg.test_tasks]
        if model is None:
            say(f"loading model {cfg.model} on {env.device}")
            model, tokenizer = hf.load_model(cfg.model, device=env.device, dtype=None if cfg.dtype == "auto" else cfg.dtype)
    hf.require_chat_template(tokenizer, cfg.model)
    train, *tests = [tokenize_prompts(tokenizer, name, ex) for name, ex in zip([cfg.task, *cfg.test_tasks], examples)]
    space = PerturbSpace(model, cfg.include, cfg.exclude)
    rows_per_batch = min(cfg.decode.batch_size, max(len(s.ids) for s in [train, *tests]))
    answerer = Answerer(model, tokenizer, cfg.decode.engine_config(), rows_per_batch)
    P = cfg.decode.population
    batched = PopulationScorer(model, tokenizer, space, cfg.decode.engine_config(), rows_per_batch, P, cfg.backend,
                               [train, *tests], attention=cfg.decode.population_attention,
                               prefill_attention=cfg.decode.population_prefill_attention,
                               fuse=cfg.decode.population_fuse, compact=cfg.decode.population_compact) if P > 1 else None
    N = cfg.population
    candidates = Candidates(space, draw_population(N, cfg.sigmas, cfg.seed), cfg.backend)
    run_dir = run_dir or RunDir.start(cfg.runs_root, cfg.name, env)
    run_dir.save_config(cfg)
    test_sizes = ", ".join(f"{s.name} x{len(s.examples)}" for s in tests)
    run_dir.log(f"randopt {cfg.model}: {space.numel:,} parameters in {len(space.names)} tensors perturbed | "
                f"train {train.name} x{len(train.examples)} | test {test_sizes} | population {N}, sigmas "
                f"{cfg.sigmas} | {env.world_size} process(es) on {env.device}, {rows_per_batch} rows per batch")
    lap("load")
    pop_file = run_dir.file(POPULATION_FILE)
    try:
        # ---- 2. warm-up (builds the one decoder), base accuracy ----------------------------
        compiled = cfg.decode.compile and cfg.decode.engine == "static" and env.device.type == "cuda"
        run_dir.log(f"warm-up: building the decoder ({rows_per_batch} rows, {cfg.decode.max_new_tokens} new tokens"
                    + (", compiled to a CUDA graph: a minute or two)" if compiled else ")"))
        answerer.warm_up([train, *tests])
        if batched is not None:
            batched.warm_up([train, *tests])
        lap("warmup")
        run_dir.log(f"warm-up done in {timing['warmup']:.1f} s")
        base_answers = map_with_progress(env, "base model", "sets", [train, *tests], answerer.answers)
        base = {"train": accuracy_ci(correct(train, base_answers[0])),
                "test": {s.name: accuracy_ci(correct(s, a)) for s, a in zip(tests, base_answers[1:])}}
        run_dir.log(f"base: train {base['train']['mean']:.3f} | "
                    + " | ".join(f"{n} {a['mean']:.3f}" for n, a in base["test"].items()))
        lap("base")
        if cfg.method == "es":
            return run_es_track(cfg, env, run_dir, model, tokenizer, space, answerer, batched, train, tests, base,
                                base_answers, timing)

        # ---- 3. population search: one JSON line per candidate as it arrives -----------------
        rows = read_population(pop_file, candidates.drawn, env.is_main) if resume is not None else {}
        missing = [i for i in range(N) if i not in rows]
        if rows:
            run_dir.log(f"resume: {len(rows)} candidates scored already, {len(missing)} to go")

        def score(i: int) -> dict[str, Any]:
            seed, sigma = candidates.drawn[i]
            return {"index": i, "seed": seed, "sigma": sigma,
                    **score_candidate(answerer, space, train, seed, sigma, cfg.backend)}

        def score_chunk(chunk: list[int]) -> list[dict[str, Any]]:
            drawn = [candidates.drawn[i] for i in chunk]
            return [{"index": i, "seed": seed, "sigma": sigma, **row}
                    for i, (seed, sigma), row in zip(chunk, drawn, batched.score(drawn, train))]

        def arrived(pairs: list[tuple[int, dict]]) -> str:
            for _, row in pairs:
                rows[row["index"]] = row
            if run_dir.writer:
                with open(pop_file, "a") as f:
                    f.write("".join(json.dumps(row) + "\n" for _, row in pairs))
            return f"best {max(r['reward'] for r in rows.values()):.3f}"

        search_start = time.perf_counter()
        map_with_progress(env, "population", "seeds", missing, score if batched is None else score_chunk,
                          done=len(rows), on_round=arrived, chunk=P)
        search_seconds = time.perf_counter() - search_start
        rows = [rows[i] for i in range(N)]
        lap("search")

        # ---- 4. selection: K per top ratio, each K once (ratios that give the same K share it) --
        ranked = rank(rows)
        ks: dict[int, list[float]] = {}
        for ratio in cfg.top_ratios:
            ks.setdefault(top_k(ratio, N), []).append(ratio)
        members = ranked[:max(ks)]
        run_dir.log(f"top {len(members)} by train reward: " + ", ".join(f"{rows[i]['reward']:.3f}" for i in members))

        def answers_of(i: int, sets: list[PromptSet]) -> list[list[str | None]]:
            candidates.apply(i)
            return [answerer.answers(s) for s in sets]

        def answers_many(label: str, unit: str, indices: list[int], sets: list[PromptSet]) -> list[list[list[str | None]]]:
            if batched is None:
                return map_with_progress(env, label, unit, indices, lambda i: answers_of(i, sets))
            return map_with_progress(env, label, unit, indices, chunk=P,
                                     fn=lambda chunk: batched.answers([candidates.drawn[i] for i in chunk], sets))

        # ---- 5. ensembles: each member answers each test set once; majority vote per K -------
        answered = answers_many("ensemble members", "members", members, tests)
        member_answers = dict(zip(members, answered))
        ensembles = []
        for t, s in enumerate(tests):
            keys = {m: [s.task.answers.vote_key(a) for a in member_answers[m][t]] for m in members}
            for k, ratios in ks.items():
                voters = members[:k]
                voted = vote_all([member_answers[m][t] for m in voters], s.task.answer_kind, [keys[m] for m in voters])
                acc, base_acc = accuracy_ci(correct(s, voted)), base["test"][s.name]
                vs_base = diagnose.paired(correct(s, base_answers[1 + t]), correct(s, voted))
                singles = [mean(correct(s, member_answers[m][t])) for m in voters]
                ensembles.append(EnsembleResult(task=s.name, ratios=ratios, k=k, accuracy=acc, base=base_acc,
                                                delta=acc["mean"] - base_acc["mean"], members_mean_accuracy=mean(singles),
                                                best_member_accuracy=max(singles), **vs_base))
                run_dir.log(f"{s.name} K={k}: ensemble {acc['mean']:.3f} [{acc['lo']:.3f}, {acc['hi']:.3f}] "
                            f"vs base {base_acc['mean']:.3f}")
        lap("ensembles")

        # ---- 6a. K=1 diagnostic: single seeds' train reward vs accuracy on the first test set --
        first, first_base = tests[0], base["test"][tests[0].name]["mean"]
        singles_k1 = k1_indices(cfg.diagnostics.k1_seeds, ranked, len(members), cfg.seed)
        extra = [i for i in singles_k1 if i not in member_answers]
        first_answers = {m: member_answers[m][0] for m in members}
        first_answers.update(zip(extra, (a[0] for a in answers_many(f"K=1 seeds on {first.name}", "seeds", extra, [first]))))
        single = {i: mean(correct(first, a)) for i, a in first_answers.items()}  # accuracy of each seed alone
        k1 = diagnose.transfer_stats(rows, singles_k1, single, first_base, first.name) if singles_k1 else None
        lap("k1")

        # ---- 6b. merges of two members: average and sum of their perturbations ---------------
        pairs = merge_pairs(members, cfg.diagnostics.merge_pairs, cfg.seed)
        jobs = [(a, b, op) for a, b in pairs for op in diagnose.MERGE_OPS]

        def merged_accuracy(job: tuple[int, int, str]) -> float:
            candidates.apply_merge(*job)
            return mean(correct(first, answerer.answers(first)))

        merged = dict(zip(jobs, map_with_progress(env, f"merges on {first.name}", "merges", jobs, merged_accuracy)))
        merges = diagnose.merge_stats(pairs, merged, rows, single, first_base, first.name) if pairs else None
        lap("merges")

        # ---- 6c. held-out bits per byte: base vs the probability-averaged top-K ensemble -----
        bpb = None
        if cfg.diagnostics.bpb_documents:
            bpb = diagnose.heldout_bpb(env, model, tokenizer, candidates, members, ks,
                                       cfg.diagnostics.bpb_documents, cfg.diagnostics.bpb_max_tokens)
            run_dir.log(f"held-out bpb: base {bpb['base']:.5f} | "
                        + " | ".join(f"K={e['k']} {e['bpb']:.5f}" for e in bpb["ensembles"]))
        lap("bpb")
    except KeyboardInterrupt:
        es_run = cfg.method == "es"
        say_how_to_resume(run_dir, run_dir.file(ES_FILE) if es_run else pop_file, cfg.es.iterations if es_run else N,
                          "iterations are done" if es_run else "candidates are scored")
        raise
    finally:
        space.restore()

    # ---- 7. summary and plot ---------------------------------------------------------------
    import transformers

    scored_tokens = sum(rows[i]["tokens"] for i in missing)
    summary = RandOptSummary(
        name=cfg.name, run_dir=str(run_dir.path), model=cfg.model, task=cfg.task, world_size=env.world_size,
        train_examples=len(train.examples), test_examples={s.name: len(s.examples) for s in tests},
        perturbed_parameters=space.numel, perturbed_tensors=len(space.names), decoder_rows=answerer.rows,
        base=base, population=diagnose.population_stats(rows, ranked, base["train"]["mean"]),
        search=SearchStats(scored=len(missing), resumed=N - len(missing), seconds=round(search_seconds, 3),
                           seeds_per_second=len(missing) / search_seconds if missing else None,
                           decoded_tokens_per_second=scored_tokens / search_seconds if missing else None),
        ensembles=ensembles, diagnostics=Diagnostics(k1=k1, merges=merges, bpb=bpb), timing=timing,
        transformers=transformers.__version__)
    run_dir.save_summary(summary)
    if run_dir.writer and k1 is not None:
        diagnose.plot_transfer(k1, base["train"]["mean"], run_dir.file("k1_transfer.png"))
    run_dir.log(report(summary))
    return summary


def _printer(env: dist.Env):
    """Rank 0's console lines before the run directory exists (RunDir.log afterwards)."""
    return lambda message: print(message, flush=True) if env.is_main else None
