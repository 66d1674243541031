"""The pretrain stage's figures: loss curves and the router-load heatmap."""

from __future__ import annotations


def loss_curve(history: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], label="train loss (total)", linewidth=1)
    ax.plot(history["step"], history["lm"], label="train LM loss", linewidth=1)
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", label="val LM loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def router_heatmap(history: dict, layer_names: list[str]):
    """Share of routed slots per expert (columns) for each MoE layer (rows), over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(history["router"], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * share.shape[1] + 2), max(2.5, 0.5 * share.shape[0] + 1.5)))
    image = ax.imshow(share, aspect="auto", cmap="viridis")
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(share.shape[0]), labels=layer_names)
    ax.set_xlabel("expert")
    ax.set_title(f"router load (uniform = {1 / share.shape[1]:.3f})")
    fig.colorbar(image, ax=ax, label="share of routed slots")
    fig.tight_layout()
    return fig
