"""Calibration statistics for GPTQ: each target's input Hessian, per routed expert for MoE layers.

A routed expert only sees the tokens its router sends it, so its Hessians come from those tokens
alone: gate_up's from the expert's inputs, down's from its SwiGLU activations on them. With top-k
routing over many experts some experts see few tokens; `expert_hessian` then falls back to the
pool's Hessian over every routed token ("pooled"), and the counts say which experts did.

The statistics come through forward pre-hooks (`recording`), so any module that runs `forward` can be
calibrated: the quantize stage records one decoder layer at a time as it streams the calibration rows
through the model (stages/quantize/stream.py), `collect` a whole model in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ernie.moe import GroupedExperts

from .gptq import HessianAccumulator


@dataclass
class ExpertStats:
    """Per expert of one pool: Hessians of gate_up's inputs and of down's inputs, and the tokens seen."""

    gate_up: list[HessianAccumulator]
    down: list[HessianAccumulator]

    @property
    def tokens(self) -> list[int]:
        return [acc.tokens for acc in self.gate_up]


@dataclass
class Calibration:
    linear: dict[str, HessianAccumulator] = field(default_factory=dict)
    experts: dict[str, ExpertStats] = field(default_factory=dict)

    def expert_hessian(self, name: str, which: str, expert: int, min_tokens: int) -> tuple[torch.Tensor, str]:
        """(Hessian, "own" | "pooled") of `which` ("gate_up" | "down") of `expert` in pool `name`: its own
        when it saw at least `min_tokens` tokens, else the pool's over all its routed tokens."""
        stats = getattr(self.experts[name], which)
        if stats[expert].tokens >= max(min_tokens, 1):
            return stats[expert].hessian(), "own"
        tokens = sum(acc.tokens for acc in stats)
        if tokens == 0:
            raise ValueError(f"no calibration token reached any expert of {name}")
        pooled = sum(acc.sum for acc in stats)
        return (2.0 / tokens * pooled).float(), "pooled"


@torch.no_grad()
def collect(model: nn.Module, targets: dict[str, nn.Module], batches: Iterable[dict]) -> Calibration:
    """Run `batches` (model keyword arguments) through `model`, accumulating every target's statistics."""
    was_training = model.training
    model.eval()
    try:
        with recording(targets) as calibration:
            for batch in batches:
                model(**batch)
    finally:
        model.train(was_training)
    return calibration


@contextmanager
def recording(targets: dict[str, nn.Module]) -> Iterator[Calibration]:
    """Every target's statistics, accumulated from its inputs while the `with` block runs (hooks removed on exit)."""
    calibration = Calibration()
    hooks = []
    strangers = [name for name, m in targets.items() if not isinstance(m, (GroupedExperts, nn.Linear))]
    if strangers:
        kind = type(targets[strangers[0]]).__name__
        raise TypeError(f"{strangers[0]} is a {kind}, not a Linear or an expert pool")
    for name, module in targets.items():
        if isinstance(module, GroupedExperts):
            E, two_i, H = module.gate_up_proj.shape
            stats = ExpertStats(
                [HessianAccumulator(H) for _ in range(E)], [HessianAccumulator(two_i // 2) for _ in range(E)]
            )
            calibration.experts[name] = stats
            hooks.append(module.register_forward_pre_hook(_expert_hook(module, stats), with_kwargs=True))
        else:
            acc = calibration.linear[name] = HessianAccumulator(module.in_features)
            hooks.append(module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
    try:
        yield calibration
    finally:
        for hook in hooks:
            hook.remove()


def _expert_hook(module: GroupedExperts, stats: ExpertStats):
    def hook(_module, args, kwargs):
        x_TH, topk_ids_TK = args[0], args[1] if len(args) > 1 else kwargs["topk_ids_TK"]
        for e in range(len(stats.gate_up)):
            routed = (topk_ids_TK == e).any(dim=-1)
            if not routed.any():
                continue
            x = x_TH[routed].float()
            stats.gate_up[e].add(x)
            gate, up = F.linear(x, module.gate_up_proj[e].float()).split(module.intermediate, dim=-1)
            stats.down[e].add(F.silu(gate) * up)

    return hook
