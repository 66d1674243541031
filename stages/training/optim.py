"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The learning rate is a pure function of the step counter, so a resumed run reproduces it
exactly from the saved step alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def lr_at(
    step: int,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """Learning rate for optimizer step `step` (1-based), after a linear warmup:

    cosine: cosine decay from peak to peak * min_lr_ratio over the remaining steps;
    wsd (warmup-stable-decay): peak until the last `decay_fraction` of the steps, then linear to
    peak * min_lr_ratio, so a run can be extended or branched from its stable phase.
    """
    if warmup_steps > 0 and step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "wsd":
        decay_steps = max(round(total_steps * decay_fraction), 1)
        decay_start = max(total_steps - decay_steps, warmup_steps)
        progress = min(max(step - decay_start, 0) / max(total_steps - decay_start, 1), 1.0)
        return peak * (1.0 - (1.0 - min_lr_ratio) * progress)
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; 2-D+ weights are decayed, norms, biases and router weights are not.

    FSDP2 shards (DTensors) and plain tensors (expert-parallel slices beside them) go in separate
    groups: the foreach kernels take one kind at a time.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decayed = param.dim() >= 2 and not name.endswith("gate.weight")
        groups.setdefault((decayed, isinstance(param, DTensor)), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))  # decayed first, as before
    param_groups = [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0} for (decayed, _), params in ordered
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, foreach=True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
