"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention projections, dense MLPs and MoE experts.

    names = add_lora(model, rank=8, alpha=16, targets=("attention", "experts"))
    ... train: only the adapters require gradients ...
    merge_lora(model)        # W <- W + (alpha / rank) B A; the model is a plain ERNIE model again

Each adapted weight W [.., out, in] becomes a parametrization W + (alpha / rank) * B @ A with
A [.., rank, in] and B [.., out, rank] (a leading expert dimension for the stacked experts, so
every expert gets its own adapter). B starts at zero, so the adapted model starts equal to the
base model; the base weights are frozen. Merging bakes the product into the weights and removes
the adapters, so export code sees the base model's names and shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import LORA_TARGETS as TARGETS
from .layers import SwiGLU
from .moe import GroupedExperts


class LoRADelta(nn.Module):
    """The parametrization W -> W + scale * B @ A of one weight (batched over experts when 3-D)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        *experts, out_features, in_features = weight.shape
        bound = 1 / math.sqrt(in_features)  # nn.Linear's default scale for A, as in the LoRA paper's code
        a = torch.empty(*experts, rank, in_features).uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(*experts, out_features, rank, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.B @ self.A).to(weight.dtype)


def add_lora(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = ("attention", "experts"), seed: int = 0
) -> list[str]:
    """Adapt the `targets` weights of `model` in place and freeze everything else; returns the adapted names."""
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be at least 1")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {list(targets)}: each must be one of {TARGETS}")
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapted = []
    for module_name, module, weight_names in list(_targets(model, targets)):  # before the tree changes
        for weight_name in weight_names:
            delta = LoRADelta(getattr(module, weight_name).detach(), rank, alpha, generator)
            parametrize.register_parametrization(module, weight_name, delta, unsafe=True)
            getattr(module.parametrizations, weight_name).original.requires_grad_(False)
            adapted.append(f"{module_name}.{weight_name}")
    if not adapted:
        raise ValueError(f"the model has no weights for LoRA targets {list(targets)}")
    return adapted


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRADelta) for p in (m.A, m.B)]


def merge_lora(model: nn.Module) -> int:
    """Bake every adapter into its weight and remove it; returns how many were merged (0: none)."""
    merged = 0
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            if any(isinstance(p, LoRADelta) for p in module.parametrizations[name]):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                getattr(module, name).requires_grad_(True)
                merged += 1
    return merged


def _targets(model: nn.Module, targets: Sequence[str]):
    """(module name, module, weight attribute names) to adapt."""
    for name, module in model.named_modules():
        if "attention" in targets and name.endswith("self_attn") and hasattr(module, "q_proj"):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield f"{name}.{proj}", getattr(module, proj), ("weight",)
        elif "mlp" in targets and isinstance(module, SwiGLU):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                yield f"{name}.{proj}", getattr(module, proj), ("weight",)
        elif "experts" in targets and isinstance(module, GroupedExperts):
            yield name, module, ("gate_up_proj", "down_proj")
