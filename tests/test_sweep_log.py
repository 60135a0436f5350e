"""sweeps/golf-log-131.toml, the 131-run experiment log as one sweep: every entry resolves, is
named as in the log and stacks as the log did (H1 is the golf-log-h1 preset, the reruns are
the configs they rerun); every distinct switch in it trains 2 steps on a micro model (one
entry per switch, chosen to cover them all); two entries run the whole track through the
sweep and are reported; and the report renders the log's form from a store holding the
log's own numbers (one table per phase with its stacked baseline, the progression of stacked
wins, the best config, what never ran)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from underpar import config as cfglib
from underpar import dist
from underpar.data.config import DataConfig
from underpar.data.dataset import PreparedData
from underpar.data.prepare import prepare
from underpar.errors import ConfigError
from underpar.optim import muon_momentum_at
from underpar.runs import report as reportlib
from underpar.runs import sweep as sweeplib
from underpar.runs.rundir import RunDir
from underpar.tracks import pretrain as track

from test_prepare import write_corpus
from test_sweep import ToySummary

pytestmark = pytest.mark.usefixtures("one_thread")

FILE = Path(__file__).resolve().parents[1] / "sweeps" / "golf-log-131.toml"

# The log's ids per phase, in the log's order (W6, A9 and E2-E25 are left out: see the file's head).
IDS = {
    "01-regularization": "baseline 1 2 3 4 5 6", "02-nature-v1": "N1 N2 N3 N4 N5 N6", "03-architecture": " ".join(f"U{i}" for i in range(1, 11)),
    "04-nature-schedules": "NF1 NF2 NF3 NF4 NF5 NF6", "05-tidal-combos": "NF7 NF8 NF9 NF10",
    "06-tidal-architecture": "NF11 NF12 NF13 NF14", "07-long-schedule": "NF15 NF16", "08-stack-winners": "W0a W0b W0c W0d W0e",
    "09-gradient-tricks": "W1 W2 W3 W4 W5 W7 W8 W9 W10", "10-hparam-grid": "E13 E1", "11a-activations": "A1 A2 A3 A4 A5 A6",
    "11b-block-structure": "A7 A8", "11c-combos": "A10 A11 A12 A13 A14", "11d-scale": "A15 A16 A17 A18",
    "12-parallel": "B4 B5 B1 B3 B2", "13-parallel-retune": " ".join(f"C{i}" for i in range(1, 15)), "14a-stacking": "D1 D2 D3",
    "14b-asymmetric": "D6 D5 D4 D7", "14c-asym-softcap": "D9 D8 D10", "15-split-1-8": " ".join(f"E{i}" for i in range(1, 11)),
    "16-fine-tuning": " ".join(f"F{i}" for i in range(1, 11)), "17-novel": "G1 G3", "18-aggressive": "H1 H2 H3 H4 H5 H6",
}

# The log's own table: BPB and steps of each entry (Phase 3 has none: U1-U4 broke, U5-U10 were never reached).
LOG = """
01-regularization baseline 1.6117 240 1 1.6282 240 2 1.6117 240 3 1.6145 240 4 1.6157 240 5 1.7383 240 6 1.6171 240
02-nature-v1 N1 1.6109 240 N2 1.5906 240 N3 1.6100 240 N4 1.6100 240 N5 4.1069 240 N6 4.1069 240
04-nature-schedules NF1 1.5961 240 NF2 1.6487 240 NF3 1.6141 240 NF4 1.6129 240 NF5 1.7239 240 NF6 1.6132 240
05-tidal-combos NF7 1.5915 240 NF8 1.5867 240 NF9 1.5902 240 NF10 1.5901 240
06-tidal-architecture NF11 1.6620 197 NF12 1.6013 234 NF13 1.5877 240 NF14 1.5765 240
07-long-schedule NF15 1.6504 240 NF16 1.6271 240
08-stack-winners W0a 1.5811 240 W0b 1.5774 240 W0c 1.5793 240 W0d 1.5845 240 W0e 1.5744 240
09-gradient-tricks W1 1.8587 240 W2 1.7981 240 W3 1.8581 240 W4 1.6223 240 W5 1.6472 240 W7 1.5954 240 W8 1.6009 240
  W9 1.6124 240 W10 1.6371 240
10-hparam-grid E13 1.5770 240 E1 1.6338 240
11a-activations A1 1.5820 240 A2 1.6132 239 A3 1.5798 226 A4 1.6053 226 A5 1.5779 240 A6 1.5743 240
11b-block-structure A7 1.5600 260 A8 1.5868 259
11c-combos A10 1.5661 259 A11 1.5648 245 A12 1.5802 240 A13 1.5848 226 A14 1.5586 259
11d-scale A15 1.6098 216 A16 1.6090 206 A17 1.5761 248 A18 1.5740 253
12-parallel B4 1.5527 259 B5 1.5535 260 B1 1.5561 260 B3 1.5885 234 B2 1.5979 233
13-parallel-retune C1 1.5588 275 C2 1.5533 274 C3 1.6055 266 C4 1.5519 259 C5 1.5602 259 C6 1.5519 259 C7 1.5553 259
  C8 1.5544 259 C9 1.5552 259 C10 1.5501 259 C11 1.5541 259 C12 1.5686 259 C13 1.5551 259 C14 1.5542 259
14a-stacking D1 1.5501 259 D2 1.5493 259 D3 1.5541 259
14b-asymmetric D6 1.5377 266 D5 1.5412 263 D4 1.5439 262 D7 1.5568 257
14c-asym-softcap D9 1.5440 263 D8 1.5461 261 D10 1.5515 259
15-split-1-8 E1 1.5387 265 E2 1.5398 265 E3 1.5378 265 E4 1.5392 265 E5 1.5391 265 E6 1.5413 267 E7 1.5400 265
  E8 1.5354 265 E9 1.5374 265 E10 1.5395 265
16-fine-tuning F1 1.5376 265 F2 1.5363 265 F3 1.5359 266 F4 1.5356 266 F5 1.5377 266 F6 1.5341 266 F7 1.5329 276
  F8 1.5355 265 F9 1.5401 265 F10 1.5365 265
17-novel G1 1.5211 266 G3 1.5603 265
18-aggressive H1 1.5207 276 H2 1.5481 244 H3 1.5474 244 H4 1.6569 276 H5 1.6974 244 H6 1.5214 276
"""


def log_table() -> dict[tuple[str, str], tuple[float, int]]:
    table, phase = {}, None
    for line in LOG.strip().splitlines():
        words = line.split()
        if not line.startswith(" "):
            phase, words = words[0], words[1:]
        for i in range(0, len(words), 3):
            table[(phase, words[i])] = (float(words[i + 1]), int(words[i + 2]))
    return table


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    """The sweep, loaded once (each test that runs jobs gives it a fresh runs root)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWEEP_RUNS", str(tmp_path_factory.mktemp("log-runs")))
        return sweeplib.load(FILE)


def plain(cfg) -> dict:
    """A job's config without what only names the run."""
    data = cfglib.to_dict(cfg)
    data.pop("name")
    return data


def test_every_entry_resolves_named_and_stacked_as_in_the_log(plan):
    assert {p.name: " ".join(v[0] for v in p.variants) for p in plan.phases} == IDS
    assert len(plan.jobs) == sum(len(ids.split()) for ids in IDS.values()) == 129  # one seed: the preset's
    jobs = {(j.phase, j.variant): j for j in plan.jobs}
    # the base: golf-baseline with the log's cosine (floor 0.1)
    base, golf = plain(jobs["01-regularization", "baseline"].config), plain(cfglib.resolve("pretrain", "golf-baseline"))
    assert base["optim"].pop("schedule") == {"name": "cosine", "warmup_fraction": 0.03, "min_lr_ratio": 0.1}
    golf["optim"].pop("schedule")
    assert base["model"] == golf["model"] and base["optim"] == golf["optim"]
    # the end of the stack is the log's best config, as the golf-log-h1 preset writes it
    h1, preset = plain(jobs["18-aggressive", "H1"].config), plain(cfglib.resolve("pretrain", "golf-log-h1"))
    assert h1["model"] == preset["model"] and h1["optim"] == preset["optim"]
    # reruns are the configs they rerun; every other entry differs from the run it is compared with
    reruns = {("14c-asym-softcap", "D10"): ("13-parallel-retune", "C10"), ("16-fine-tuning", "F10"): ("15-split-1-8", "E8"),
              ("18-aggressive", "H6"): ("18-aggressive", "H1"), ("15-split-1-8", "E10"): ("14b-asymmetric", "D5")}
    for again, first in reruns.items():
        assert plain(jobs[again].config) == plain(jobs[first].config), again
    for phase in plan.phases:
        baseline = plain(jobs[phase.baseline_key].config)
        for variant, _, _ in phase.variants:
            if (phase.name, variant) not in reruns and (phase.name, variant) != phase.baseline_key:
                assert plain(jobs[phase.name, variant].config) != baseline, (phase.name, variant)
    # stacked phases point at the run they build on
    assert {p.name: p.baseline_key for p in plan.phases}["13-parallel-retune"] == ("12-parallel", "B4")


def test_a_baseline_in_an_earlier_phase_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_RUNS", str(tmp_path / "runs"))  # load() stops at the bad phase, before resolving any job
    text = FILE.read_text()
    for wrong, message in (('baseline = "12-parallel/B4"', "'12-parallel/B9' is not a variant of an earlier phase"),
                           ('baseline = "02-nature-v1/N2"', "'18-aggressive/N2' is not a variant of an earlier phase")):
        path = tmp_path / "bad.toml"
        path.write_text(text.replace(wrong, wrong.replace("B4", "B9").replace("02-nature-v1", "18-aggressive"), 1))
        with pytest.raises(ConfigError, match=re.escape(message)):
            sweeplib.load(path)


# ---- every switch trains


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("log-data")
    corpus = write_corpus(root / "corpus", documents=60)
    prepare(cfglib.from_dict(DataConfig, dict(source="text", path=str(corpus), vocab_size=400, val_docs=20, out=str(root / "prepared"))))
    return root


def micro(job: sweeplib.Job, data_dir: Path, runs: Path, steps: int = 2) -> object:
    """The job's config on a micro model: its layers, heads and overrides kept, its width a
    quarter (head dims stay even), 400 tokens of vocabulary, 2 x 256-token steps on the CPU;
    periodic weight dynamics fire every step."""
    cfg = job.config
    sets = [*job.sets, f"model.model_dim={cfg.model.model_dim // 4}", "model.vocab_size=400", "data.source=text",
            "data.vocab_size=400", "data.val_docs=20", f"data.path={data_dir / 'corpus'}", f"data.out={data_dir / 'prepared'}",
            "train.seq_len=32", "train.tokens_per_step=256", "train.micro_batch_tokens=256", "train.max_wallclock_seconds=0",
            f"train.max_steps={steps}", "train.warmup_steps=0", "train.compile=false", "train.device=cpu",
            "train.val_every_steps=0", "train.val_max_tokens=512", "train.val_batch_tokens=512", f"train.runs_root={runs}",
            f"name={cfg.name}"]
    if hasattr(cfg.optim.weight_dynamics, "every_steps"):
        sets.append("optim.weight_dynamics.every_steps=1")
    return cfglib.resolve("pretrain", "golf-baseline", ["optim.schedule=cosine", "optim.schedule.min_lr_ratio=0.1", *sets])


def switches(job: sweeplib.Job) -> set[str]:
    """What a job switches: a field for a number, field=value for a named choice."""
    out = set()
    for text in job.sets:
        key, value = text.split("=", 1)
        out.add(key if re.fullmatch(r"[-+.\deE]+", value) else text)
    return out - {"train.max_steps"}


def covering(jobs: list[sweeplib.Job]) -> list[sweeplib.Job]:
    """Few jobs that together switch everything any job switches (greedy set cover)."""
    left, chosen = set().union(*(switches(j) for j in jobs)), []
    while left:
        best = max(jobs, key=lambda j: len(switches(j) & left))
        chosen.append(best)
        left -= switches(best)
    return chosen


def field(data: dict, key: str):
    """A config field by its dotted name (a variant section without the period micro() sets)."""
    for part in key.split("."):
        data = data[part]
    return {k: v for k, v in data.items() if k != "every_steps"} if key == "optim.weight_dynamics" else data


def test_every_switch_of_the_log_trains_two_steps(plan, micro_data, tmp_path):
    chosen = covering(plan.jobs)
    assert len(chosen) <= 32 and {"model.structure.grow=progressive", "model.structure.prune_heads_to", "optim.gradient_trick=thermal_vent", "model.mlp.activation=swiglu",
                                  "optim.schedule=whale_dive", "model.loss.embed_mixup",
                                  "optim.weight_dynamics=metamorphosis", "model.dropout"} <= set().union(*map(switches, chosen))
    for job in chosen:
        cfg = micro(job, micro_data, tmp_path)
        got, want = cfglib.to_dict(cfg), cfglib.to_dict(job.config)
        for text in job.sets:  # the micro config keeps every override but the width and the period
            key = text.split("=", 1)[0]
            if key not in ("model.model_dim", "train.max_steps", "optim.weight_dynamics.every_steps"):
                assert field(got, key) == field(want, key), (job.key, key)
        trainer = track.Trainer(cfg, dist.setup("cpu"), PreparedData.open(cfg.data))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        losses = []
        for s, p in ((0, 0.0), (1, 0.5)):  # the second step in the training stage at 50% (grown, pruned)
            list(trainer.stages.enter(p))
            losses.append(trainer.step(cfg.optim.schedule(p), muon_momentum_at(cfg.optim, s), p))
        assert all(math.isfinite(x) and 0 < x < 10 for x in losses), (job.key, losses)
        assert any(not v.equal(before[k]) for k, v in trainer.model.state_dict().items()), job.key


def test_two_entries_run_the_whole_track_and_are_reported(plan, micro_data, tmp_path):
    picked = [j for j in plan.jobs if j.key in ("01-regularization/baseline/seed=1337", "18-aggressive/H1/seed=1337")]
    jobs = [dataclasses.replace(j, config=micro(j, micro_data, tmp_path / "runs")) for j in picked]
    phases = {p.name: p for p in plan.phases}
    small = dataclasses.replace(plan, jobs=jobs, runs_root=str(tmp_path / "runs"), phases=[phases["01-regularization"],
                                                         dataclasses.replace(phases["18-aggressive"], baseline="H1", baseline_phase="")])
    assert sweeplib.run_sweep(small, say=lambda _: None)["ran"] == 2
    text = reportlib.write(small, tmp_path / "log").read_text()
    for result in sweeplib.results(small).values():
        assert result["status"] == "done" and result["run"]["metrics"]["steps"] == 2
        assert f"| {result['run']['metrics']['val_bpb']:.4f} | 2 |" in text
    assert "- Best result: " in text and "## Phase: 18-aggressive" in text


# ---- the log's form, from a store holding the log's numbers


def replay(runs_root: Path, cfg) -> ToySummary:
    """A stand-in track: the log's own BPB and steps for the entry; Phase 3 has none there."""
    _, phase, variant, _ = cfg.name.split(".")
    if (phase, variant) not in log_table():
        raise RuntimeError("not reached in the log")
    bpb, steps = log_table()[phase, variant]
    run_dir = RunDir.start(runs_root, cfg.name, dist.setup("cpu"))
    run_dir.save_config(cfg)
    run_dir.metric(step=steps, elapsed=600.0, val_bpb=bpb, final=True)
    summary = ToySummary(name=cfg.name, run_dir=str(run_dir.path), device="cpu", val_bpb=bpb, steps=steps)
    run_dir.save_summary(summary)
    return summary


def test_the_report_renders_the_logs_form(plan, tmp_path):
    plan = dataclasses.replace(plan, runs_root=str(tmp_path / "runs"))
    tally = sweeplib.run_sweep(plan, execute=lambda _, cfg: replay(tmp_path / "runs", cfg), say=lambda _: None)
    assert tally["ran"] == 119 and tally["failed"] == 10
    text = reportlib.render(plan, reportlib.collect(plan))
    assert "- Baseline: 01-regularization/baseline = 1.6117" in text
    assert "- Best result: 18-aggressive/H1 = 1.5207 (-0.0910 vs baseline)" in text
    assert "| 2 | N2 | Tidal LR: Golden ratio warmup (38.2% warmup, 61.8% cosine decay) | 1.5906 | 240 | -0.0211 | better (best) |" in text
    assert "| 5 | N5 | Golden Ratio min_lr: Set min LR fraction to 0.382 (golden ratio) | 4.1069 | 240 | +2.4952 | worse |" in text
    assert "| 7 | U7 | 12L Asymmetric: 12 layers, 448D, 1 encoder layer | - | - | - | 1 failed |" in text
    # a stacked phase names the run it builds on and is judged against it (the log's "Delta vs B4"), within the noise
    assert "Status against 12-parallel/B4 = 1.5527 (-0.0590 vs baseline)." in text
    assert "| 10 | C10 | Matrix LR 0.08: More aggressive matrix | 1.5501 | 259 | -0.0616 | better (best) |" in text
    assert "| 4 | C4 | SC15: Tighter softcap | 1.5519 | 259 | -0.0598 | within noise |" in text
    assert "| 3 | D10 | C10 Rerun: Confirm | 1.5515 | 259 | -0.0602 | baseline |" in text
    progression = re.search(r"## Progression.*?```\n(.*?)```", text, re.S)[1].splitlines()
    wins = [line.split(":")[0].lstrip("+ ").strip() for line in progression[1:]]
    assert wins == ["02-nature-v1/N2", "05-tidal-combos/NF8", "06-tidal-architecture/NF14", "08-stack-winners/W0e",
                    "11a-activations/A6", "11b-block-structure/A7", "11c-combos/A14", "12-parallel/B4", "13-parallel-retune/C10",
                    "14a-stacking/D2", "14b-asymmetric/D6", "15-split-1-8/E8", "16-fine-tuning/F7", "17-novel/G1", "18-aggressive/H1"]
    assert progression[-1].split()[-2:] == ["1.5207", "(-0.0910)"]
    assert "--set model.residual.encoder_layers=0\n" in text.split("## Best config")[1]
    assert "| 03-architecture/U10/seed=1337 | failed | - | RuntimeError: not reached in the log |" in text
