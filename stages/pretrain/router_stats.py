"""Router load balance: tokens dispatched per expert, per MoE layer and modality pool.

max/mean dispatch is 1.0 for a perfectly balanced layer and E / k when every token of the
layer goes to the same k experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ernie import ErnieConfig
from ernie.moe import RouterOutput, count_per_expert


class RouterLoad:
    """Dispatch counts [moe layer, pool, expert] since the last `report()` and over the run."""

    def __init__(self, model_config: ErnieConfig, device: torch.device) -> None:
        moe = model_config.moe
        self.layers = model_config.moe_layers if moe is not None else []
        self.pools = ["text"] + (["vision"] if model_config.vision is not None else [])
        experts = moe.num_experts if moe is not None else 0
        self.window = torch.zeros(len(self.layers), len(self.pools), experts, device=device)

    @property
    def names(self) -> list[str]:
        return [
            f"layer{layer}" + (f".{pool}" if len(self.pools) > 1 else "")
            for layer in self.layers
            for pool in self.pools
        ]

    def add(self, routing: list[list[RouterOutput]]) -> None:
        for i, layer_routing in enumerate(routing):
            for decision in layer_routing:
                experts = self.window.shape[-1]
                counts = count_per_expert(decision.topk_ids_TK.detach(), experts)
                self.window[i, self.pools.index(decision.pool)] += counts.to(self.window.dtype)

    def report(self) -> tuple[dict[str, float], torch.Tensor]:
        """(max/mean per layer and the worst layer, the window's global counts [L*P, E]); resets the window.

        Collective: every rank must call it at the same step.
        """
        counts = self.window.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        self.window.zero_()
        flat = counts.flatten(0, 1)
        metrics: dict[str, float] = {}
        for name, row in zip(self.names, flat, strict=True):
            if row.sum() > 0:
                metrics[f"router/{name}/max_over_mean"] = float(row.max() / row.mean())
        if metrics:
            metrics["router/max_over_mean"] = max(metrics.values())
        return metrics, flat.cpu()
