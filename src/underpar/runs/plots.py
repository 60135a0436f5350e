"""Plots of a run's metrics.jsonl (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(rows: list[dict[str, Any]], path: Path, title: str = "", x: str = "elapsed") -> Path:
    """Train loss (nats) and, where logged, val_bpb against training time (s) or step. Periodic
    val_bpb (often on a subset of the split) is a line; a row marked `final` (the whole split)
    is its own marker, not joined to it."""
    train = [(r[x], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val, final = val_series(rows, x)
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1, label="train loss (nats)")
    ax.set_xlabel("training time (s)" if x == "elapsed" else x)
    ax.set_ylabel("train loss (nats)", color="tab:blue")
    if val or final:
        ax2 = ax.twinx()
        if val:
            ax2.plot(*zip(*val), "o-", color="tab:red", label="val_bpb (periodic)")
        if final:
            ax2.plot(*zip(*final), "*", color="darkred", markersize=12, label="val_bpb (final, whole split)")
        ax2.set_ylabel("val_bpb", color="tab:red")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def val_series(rows: list[dict[str, Any]], x: str = "elapsed") -> tuple[list[tuple], list[tuple]]:
    """(periodic, final) val_bpb points: the final row scores the whole split, so it is
    never drawn as one more point of the periodic line."""
    scored = [r for r in rows if r.get("val_bpb") is not None]
    return ([(r[x], r["val_bpb"]) for r in scored if not r.get("final")],
            [(r[x], r["val_bpb"]) for r in scored if r.get("final")])


MODE_COLORS = {"dead": "#f0f0f0", "identity": "#bdbdbd", "attn": "#6baed6", "mlp": "#fd8d3c",
               "both": "#31a354", "sacred": "#54278f"}


def mode_heatmap(blocks: list[list[str]], path: Path) -> Path:
    """Which layer ran in which mode in each block (Deep Chaos): layers down, blocks across."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(MODE_COLORS)
    grid = [[names.index(mode) for mode in column] for column in blocks]
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(blocks) + 2), max(3, 0.2 * len(blocks[0]) + 1)))
    ax.imshow(list(map(list, zip(*grid))), aspect="auto", interpolation="nearest",
              cmap=ListedColormap(list(MODE_COLORS.values())), vmin=0, vmax=len(names) - 1)
    ax.set_xlabel("block")
    ax.set_ylabel("layer")
    ax.legend(handles=[Patch(color=c, label=m) for m, c in MODE_COLORS.items()], loc="upper left",
              bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heldout_curve(rows: list[dict[str, Any]], path: Path, labels: dict[str, str], title: str = "") -> Path:
    """Held-out loss (nats) against step, one line per key of `labels` found in the rows (e.g.
    the full model and, for Deep Chaos, the hoisted or masked network that trains, which is a
    different network and labelled so)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for (key, label), style in zip(labels.items(), ("o-", "s--", "x:", "d-.")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, lw=1, markersize=4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
