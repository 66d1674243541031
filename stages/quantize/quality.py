"""Measured quality of a quantized model: validation perplexity and a per-layer error plot.

The perplexity is `ernie.evaluation.val_loss`, the same definition the eval step reports.
"""

from __future__ import annotations

from pathlib import Path


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
