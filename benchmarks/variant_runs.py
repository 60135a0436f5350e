"""The loop the variant benchmarks share (technique_speed, structure_speed, dynamics_overhead):
each variant measured in turn, one that fails recorded with its traceback while the rest still
run, its ms/step set against the first (baseline) row's, the JSON rewritten after each."""

from __future__ import annotations

import argparse
import json
import traceback
from collections.abc import Callable
from pathlib import Path


def variant_parser(steps: int, steps_help: str) -> argparse.ArgumentParser:
    """The options the in-process variant benchmarks share (structure_speed, dynamics_overhead)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="golf-baseline")
    parser.add_argument("--steps", type=int, default=steps, help=steps_help)
    parser.add_argument("--tokens-per-step", type=int, default=131_072)
    parser.add_argument("--set", nargs="*", default=[], dest="sets", help="extra config overrides (CPU check)")
    parser.add_argument("--only", nargs="*", default=None, help="variant names (baseline always runs first)")
    parser.add_argument("--tag", default="")
    return parser


def common_sets(args: argparse.Namespace) -> list[str]:
    """The overrides every variant of a `variant_parser` run starts from."""
    return [f"data.out={args.data}", f"train.tokens_per_step={args.tokens_per_step}", "train.warmup_steps=3",
            f"train.device={args.device}", *args.sets]


def variant_names(only: list[str] | None, variants: dict[str, list[str]]) -> list[str]:
    """`only` (default: every variant) with the baseline first."""
    return ["baseline"] + [n for n in (only or variants) if n != "baseline"]


def run_variants(names: list[str], variants: dict[str, list[str]], measure: Callable[[list[str]], dict],
                 record: dict, path: Path) -> None:
    rows = record["rows"]
    for name in names:
        try:
            row = {"variant": name, "sets": variants[name], **measure(variants[name])}
        except Exception as e:  # a variant that fails is recorded; the rest still run
            row = {"variant": name, "sets": variants[name], "error": f"{type(e).__name__}: {e}"[:2000],
                   "traceback": traceback.format_exc()[-4000:]}
        if "median_ms_per_step" in row and rows and "median_ms_per_step" in rows[0]:
            row["vs_baseline"] = row["median_ms_per_step"] / rows[0]["median_ms_per_step"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
