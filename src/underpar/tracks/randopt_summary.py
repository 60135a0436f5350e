"""What a RandOpt run concludes (the typed summary behind summary.json) and its short text report."""

from __future__ import annotations

import dataclasses
from typing import Any

from underpar.runs.rundir import Summary


@dataclasses.dataclass
class SearchStats:
    scored: int  # candidates scored by this run
    resumed: int  # candidates read back from a stopped search's population.jsonl
    seconds: float
    seeds_per_second: float | None
    decoded_tokens_per_second: float | None


@dataclasses.dataclass
class EnsembleResult:
    """The top-K majority vote on one test set."""

    task: str
    ratios: list[float]  # the top ratios that give this K (K = max(1, int(ratio * population)))
    k: int
    accuracy: dict[str, float]  # mean, lo, hi (95% Wilson), n
    base: dict[str, float]
    delta: float  # ensemble minus base accuracy
    members_mean_accuracy: float
    best_member_accuracy: float
    # paired against the base on the same questions: right only with the ensemble / only with
    # the base, and the exact two-sided McNemar p-value of that split
    gained: int = 0
    lost: int = 0
    mcnemar_p: float = 1.0


@dataclasses.dataclass
class Diagnostics:
    k1: dict[str, Any] | None  # randopt_diagnostics.transfer_stats
    merges: dict[str, Any] | None  # randopt_diagnostics.merge_stats
    bpb: dict[str, Any] | None  # randopt_diagnostics.heldout_bpb


@dataclasses.dataclass(kw_only=True)
class RandOptSummary(Summary):
    model: str
    task: str
    world_size: int
    train_examples: int
    test_examples: dict[str, int]
    perturbed_parameters: int
    perturbed_tensors: int
    decoder_rows: int
    base: dict[str, Any]  # {"train": accuracy, "test": {task: accuracy}}
    population: dict[str, Any]  # randopt_diagnostics.population_stats
    search: SearchStats
    ensembles: list[EnsembleResult]
    diagnostics: Diagnostics
    timing: dict[str, float]  # seconds per phase
    transformers: str


def report(summary: RandOptSummary) -> str:
    """A short text report: base vs ensemble per test set and K, search speed, diagnostics."""
    lines = ["| test set | K (top ratios) | base | ensemble [95% CI] | delta (pp) | members mean |",
             "|---|---|---|---|---|---|"]
    for e in summary.ensembles:
        acc = e.accuracy
        ratios = ", ".join(f"{r:g}" for r in e.ratios)
        lines.append(f"| {e.task} | {e.k} ({ratios}) | {e.base['mean']:.3f} | {acc['mean']:.3f} [{acc['lo']:.3f}, "
                     f"{acc['hi']:.3f}] | {100 * e.delta:+.1f} | {e.members_mean_accuracy:.3f} |")
    search = summary.search
    if search.seeds_per_second is not None:
        lines.append(f"search: {search.scored} candidates in {search.seconds:.1f} s = "
                     f"{search.seeds_per_second:.3f} seeds/s")
    k1 = summary.diagnostics.k1
    if k1 is not None:
        rho = "n/a" if k1["spearman"] is None else f"{k1['spearman']:.3f}"
        lines.append(f"K=1 on {k1['task']} ({k1['seeds']} seeds): Spearman {rho}, oracle best {k1['oracle_best']:.3f}, "
                     f"train-selected {k1['train_selected']:.3f}, mean {k1['mean']:.3f}, base {k1['base']:.3f}")
    merges = summary.diagnostics.merges
    if merges is not None:
        lines.append(f"merges on {merges['task']} ({len(merges['pairs'])} pairs, parents mean {merges['parents_mean']:.3f}): "
                     + ", ".join(f"{op} {v['mean']:.3f} (beats both parents {v['beats_both_parents']:.0%})"
                                 for op, v in merges["operators"].items()))
    bpb = summary.diagnostics.bpb
    if bpb is not None:
        lines.append(f"held-out bpb ({bpb['documents']} documents): base {bpb['base']:.5f}, "
                     + ", ".join(f"K={e['k']} {e['bpb']:.5f}" for e in bpb["ensembles"]))
    lines.append(f"run directory {summary.run_dir}")
    return "\n".join(lines)
