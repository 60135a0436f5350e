"""Plots of a run's metrics.jsonl (PNG, matplotlib without a display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss (nats) and val_bpb against training time (s), on two axes."""
    train = [(r["elapsed"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    val = [(r["elapsed"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", lw=1, label="train loss (nats)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("train loss (nats)", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="tab:red", label="val_bpb")
        ax2.set_ylabel("val_bpb", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
