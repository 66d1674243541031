"""Measured quality of a quantized model: validation perplexity and a per-layer error plot.

The perplexity loop mirrors stages/eval (stages never import each other): document-aware
next-token cross-entropy over the val rows' supervised tokens (labels -100 ignored).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ernie.losses import shifted_targets


@torch.no_grad()
def val_loss(model, rows: dict[str, np.ndarray], batch_size: int = 8) -> tuple[float, int]:
    """(mean next-token loss, supervised tokens) of `model` on packed rows {field: [N, S]}."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows["input_ids"]), batch_size):
        batch = {k: torch.from_numpy(v[start : start + batch_size]).long() for k, v in rows.items()}
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"]
        ).logits
        targets, weight = shifted_targets(batch["labels"], None, batch["document_ids"])
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        total += float((ce * weight.flatten()).sum())
        count += int(weight.sum())
    if count == 0:
        raise ValueError("the validation rows have no supervised tokens (all labels are -100)")
    return total / count, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def plot_layer_errors(names: list[str], errors: list[float], title: str):
    """A bar chart of the relative weight reconstruction error of each quantized module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names)), 4.0))
    ax.bar(range(len(errors)), errors, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([_short(n) for n in names], rotation=90, fontsize=7)
    ax.set_ylabel("relative error ||W - Q(W)|| / ||W||")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _short(name: str) -> str:
    """model.layers.3.mlp.text.experts -> 3.mlp.text.experts"""
    return name.removeprefix("model.layers.")
