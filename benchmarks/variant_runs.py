"""The loop the variant benchmarks share (technique_speed, structure_speed, dynamics_overhead):
each variant measured in turn, one that fails recorded with its traceback while the rest still
run, its ms/step set against the first (baseline) row's, the JSON rewritten after each."""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path


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
