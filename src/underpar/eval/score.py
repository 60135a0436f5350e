"""Scoring a trained GPT: plain, sliding-window and score-first TTT val_bpb, each with its
evaluation seconds (`final_scores`, which the pretrain track runs after the round trip), and
scoring a finished run's artifact on any prepared data folder made with the same tokenizer
(`score_run`, behind `underpar eval bpb --run`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from underpar import config as cfglib
from underpar import dist, ui
from underpar.data import corpora
from underpar.data.config import DataConfig
from underpar.data.dataset import PreparedData
from underpar.data.manifest import MANIFEST
from underpar.data.tokenizer import ByteLUTs, build_byte_luts
from underpar.errors import ArtifactError, DataError, UnderparError
from underpar.eval.bpb import BpbMeter, evaluate_bpb
from underpar.eval.config import EvalConfig, eval_config
from underpar.eval.sliding import evaluate_sliding, scored_range
from underpar.eval.ttt import evaluate_ttt

ARTIFACT = "model.int8.ptz"


@dataclasses.dataclass
class Score:
    """One evaluation's result; `seconds` is its wall time (evaluation, never training)."""

    val_bpb: float
    val_loss: float
    tokens: int
    bytes: int
    seq_len: int
    stride: int
    seconds: float
    chunks: int | None = None  # TTT only
    updates: int | None = None  # TTT only

    @classmethod
    def of(cls, meter: BpbMeter, seq_len: int, stride: int, started: float, **extra: int) -> Score:
        bpb, loss = meter.bpb, meter.loss  # .item() waits for the device, so the clock is honest
        return cls(bpb, loss, meter.tokens, meter.bytes, seq_len, stride, round(time.perf_counter() - started, 3), **extra)


def final_scores(
    model: nn.Module,
    val_tokens: Tensor,
    luts: ByteLUTs,
    cfg: EvalConfig,
    train_seq_len: int,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    rank: int = 0,
    world_size: int = 1,
    plain: bool = True,
    skip: Sequence[str] = (),
) -> dict[str, Score]:
    """The scores `cfg` asks for, by name: "plain" (windows of eval.seq_len, unless `plain` is
    False, e.g. when the caller scored it already), "sliding" (eval.stride > 0) and "ttt"
    (eval.ttt.enabled; sliding windows inside when eval.stride > 0), less the names in `skip`.
    `model` has `.logits(x)`
    and `model(x, y)` -> mean loss; TTT leaves its weights as they were."""
    cfglib.validate(cfg, "eval")
    seq_len, stride = cfg.window(train_seq_len), cfg.stride_for(train_seq_len)
    total = scored_range(val_tokens.numel(), seq_len)
    runs: list[tuple[str, Callable[[Callable[[int], None]], Score]]] = []
    if plain:
        runs.append(("plain", lambda tick: _timed(lambda: evaluate_bpb(
            model.logits, val_tokens, luts, seq_len, cfg.batch_seqs, rank, world_size, tick), seq_len, seq_len)))
    if stride:
        runs.append(("sliding", lambda tick: _timed(lambda: evaluate_sliding(
            model.logits, val_tokens, luts, seq_len, stride, cfg.batch_seqs, rank, world_size, tick), seq_len, stride)))
    if cfg.ttt.enabled:
        def ttt(tick: Callable[[int], None]) -> Score:
            started = time.perf_counter()
            result = evaluate_ttt(model, val_tokens, luts, cfg.ttt, seq_len, stride, cfg.batch_seqs, autocast,
                                  rank, world_size, tick)
            return Score.of(result.meter, seq_len, stride or seq_len, started, chunks=result.chunks, updates=result.updates)
        runs.append(("ttt", ttt))
    runs = [(name, score) for name, score in runs if name not in skip]
    scores = {}
    was_training = model.training
    model.eval()
    with ui.progress() as bar:
        for name, score in runs:
            task = bar.add_task(f"val_bpb ({name})", total=total // world_size, info="")
            with autocast():
                scores[name] = score(lambda n, task=task: bar.update(task, advance=n))
            bar.update(task, info=f"{scores[name].val_bpb:.4f}")
    model.train(was_training)
    return scores


def _timed(run: Callable[[], BpbMeter], seq_len: int, stride: int) -> Score:
    started = time.perf_counter()
    return Score.of(run(), seq_len, stride, started)


# ---------------------------------------------------------------------------------------
# a saved run on any prepared data


def run_config(run: str | Path | None, artifact: str | Path | None) -> tuple[Any, Path, Path]:
    """(the run's resolved config, its folder, the artifact to score). The config comes from
    --run, or from the folder that holds --artifact."""
    if run is None and artifact is None:
        raise UnderparError("give --run RUN_DIR (or --artifact FILE) to score a trained model")
    folder = Path(run) if run is not None else Path(artifact).parent
    if not (folder / "config.json").is_file():
        what = "--run" if run is not None else "the folder of --artifact"
        raise UnderparError(f"{what}: {folder} is not a run directory (no config.json); give a folder that "
                            "`underpar pretrain` made")
    cfg = cfglib.load_json(folder / "config.json")
    if cfglib.track_of(cfg) != "pretrain":
        raise UnderparError(f"{folder} is a {cfglib.track_of(cfg)} run; eval bpb scores pretrain runs")
    path = Path(artifact) if artifact is not None else folder / ARTIFACT
    if not path.is_file():
        raise ArtifactError(f"no artifact at {path}" + (" (did the run finish?)" if artifact is None else ""))
    return cfg, folder, path


def run_tokenizer(cfg: Any, folder: Path) -> dict[str, Any] | None:
    """The tokenizer a run was trained with ({sha256, vocab_size}): from its summary.json if
    recorded there, else from the manifest of its data folder; None when neither is there."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        if summary.get("tokenizer_sha256"):
            return {"sha256": summary["tokenizer_sha256"], "vocab_size": cfg.data.vocab_size}
    except (OSError, ValueError):
        pass
    try:
        return PreparedData.open(cfg.data).manifest["tokenizer"]
    except DataError:
        return None


def check_tokenizer(trained: dict[str, Any] | None, data: PreparedData, cfg: Any, warn: Callable[[str], None]) -> None:
    """Refuse data made with another tokenizer than the run's: token ids would mean other
    pieces and the bytes would be counted with the wrong table."""
    target = data.manifest["tokenizer"]
    if data.vocab_size > cfg.model.vocab_size:
        raise DataError(f"{data.dir} has a vocabulary of {data.vocab_size}, larger than the model's "
                        f"model.vocab_size = {cfg.model.vocab_size}: it was made with another tokenizer")
    if trained is None:
        if target["vocab_size"] != cfg.data.vocab_size:
            raise DataError(f"{data.dir} was prepared with a {target['vocab_size']}-token tokenizer; the run was "
                            f"trained with data.vocab_size = {cfg.data.vocab_size}")
        warn(f"the run's data folder {cfg.data.out_dir} is gone, so its tokenizer cannot be compared with "
             f"{data.dir}'s; both have {data.vocab_size} tokens")
        return
    if trained["sha256"] != target["sha256"]:
        raise DataError(
            f"{data.dir} was prepared with a different tokenizer (vocab {target['vocab_size']}, sha256 "
            f"{target['sha256'][:12]}) than the run (vocab {trained['vocab_size']}, sha256 {trained['sha256'][:12]}); "
            "prepare the text with the run's tokenizer, or score a run trained on this one"
        )


def score_run(run: str | None, artifact: str | None, data: str | None, eval_cfg: EvalConfig,
              sets: Sequence[str] = (), warn: Callable[[str], None] = print, skip: Sequence[str] = ()) -> dict[str, Any]:
    """Load a run's artifact into its model (the round trip the run was scored after) and
    score it on `data` (a prepared folder, default the run's own, or text: `scored_tokens`).
    `sets` change the run's config first (e.g. model.attention.rope_scaling for a longer
    eval.seq_len)."""
    cfg, folder, path = run_config(run, artifact)
    for assignment in sets:
        cfg = cfglib.override(cfg, assignment)
    cfglib.validate(cfg)
    cfglib.validate(eval_cfg, "eval")
    tokens, tokenizer, where = scored_tokens(cfg, folder, data, warn)
    env = dist.setup(cfg.train.device)
    try:
        model = load_trained(cfg, path, env.device)
        luts = build_byte_luts(tokenizer, cfg.model.vocab_size).to(env.device)
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if env.device.type == "cuda" else nullcontext
        scores = final_scores(model, tokens, luts, eval_cfg, cfg.train.seq_len, autocast,
                              env.rank, env.world_size, skip=skip)
    finally:
        dist.teardown()
    return {"run": str(folder), "artifact": str(path), "data": where,
            "scores": {name: dataclasses.asdict(s) for name, s in scores.items()}}


def text_source(path: Path) -> str | None:
    """"text" or "jsonl" when `path` is text to score (a .txt/.md/.jsonl file, or a folder of
    them that is not a prepared data folder); None for a prepared folder."""
    if path.is_file():
        return "jsonl" if path.suffix == ".jsonl" else "text" if path.suffix in (".txt", ".md") else None
    if path.is_dir() and not (path / MANIFEST).exists():
        if any(path.rglob("*.jsonl")):
            return "jsonl"
        if any(path.rglob("*.txt")) or any(path.rglob("*.md")):
            return "text"
    return None


def scored_tokens(cfg: Any, folder: Path, data: str | None, warn: Callable[[str], None]) -> tuple[Tensor, Any, str]:
    """(tokens, tokenizer, where) of what `--data` names: a prepared folder's validation split
    (made with the run's tokenizer: checked), or text (.txt/.md files: one document each;
    .jsonl: the "text" field) encoded with the run's tokenizer, each document after a BOS."""
    if data is not None and (source := text_source(Path(data))) is not None:
        try:
            tokenizer = PreparedData.open(cfg.data).tokenizer
        except DataError as e:
            raise DataError(f"--data {data} is text, to be encoded with the run's tokenizer, which lives in "
                            f"its data folder: {e}") from None
        documents = corpora.load_documents(source, str(data))
        ids = [t for doc in tokenizer.encode_documents(documents) for t in (tokenizer.bos_id, *doc)]
        return torch.tensor(ids, dtype=torch.int32), tokenizer, str(data)
    prepared = PreparedData.open(cfg.data if data is None else DataConfig(out=str(data)))
    check_tokenizer(run_tokenizer(cfg, folder), prepared, cfg, warn)
    return prepared.val_tokens, prepared.tokenizer, str(prepared.dir)


def score_run_options(run: str | None, artifact: str | None, data: str | None, seq_len: str | None,
                      stride: str | None, ttt: bool, sets: Sequence[str], warn: Callable[[str], None] = print) -> dict[str, Any]:
    """`eval bpb --run`: the options are EvalConfig fields, parsed and checked as --set eval.*
    is (before the run is read); other --set paths change the run's config."""
    evals = [f"{key}={value}" for key, value in (("seq_len", seq_len), ("stride", stride)) if value is not None]
    evals += ["ttt.enabled=true"] if ttt else []
    evals += [s.split(".", 1)[1] for s in sets if s.startswith("eval.")]
    return score_run(run, artifact, data, eval_config(evals), [s for s in sets if not s.startswith("eval.")], warn)


def load_trained(cfg: Any, path: Path, device: torch.device) -> nn.Module:
    """The run's model with the artifact's (dequantized) weights, in the training precision."""
    from underpar.model.gpt import build
    from underpar.model.precision import cast_for_bf16_training
    from underpar.quant import artifact

    model = build(cfg.model).to(device)
    # Training ends in its last stage (e.g. depth recurrence on): the weights were trained so.
    for switch in getattr(model, "stage_switches", list)():
        switch.set(switch.at <= 1.0)
    if device.type == "cuda":
        cast_for_bf16_training(model)
    state = artifact.load_model(path, cfg.quant)
    try:
        model.load_state_dict({k: v.to(device) for k, v in state.items()})
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ArtifactError(f"{path} does not fit the run's model config ({first}); score it with the config "
                            "it was trained with") from None
    return model.eval()
