"""GPTQ: weight-only quantization that compensates each rounding error with the weights not yet quantized.

Frantar et al. 2022 (arXiv:2210.17323). For a linear layer with inputs X, the layer's output
error ||X W^T - X Q^T||^2 is a quadratic form in the weight error with Hessian H = 2 X^T X / n
(`HessianAccumulator`). Columns (input dims) are quantized one at a time on the group's grid;
the error of column j, divided by [H^-1]_jj, is spread over the columns after it along row j of
the upper Cholesky factor of H^-1, which is the least-squares optimal update (Optimal Brain
Surgeon) given the columns already fixed. Updates are applied lazily in blocks of `block_size`
columns, as in the paper.

Options:
- `damp`: a fraction of the mean diagonal added to H's diagonal (H is often singular: dead or
  linearly dependent inputs); an input never seen (zero diagonal) gets weight 0 and no updates.
- `act_order`: quantize columns by decreasing H diagonal (the most active inputs first, while
  the most columns remain to absorb their error).
- groups: each contiguous group of `group_size` inputs has its own scale and zero point, as in
  `ernie.quant`'s format. In input order the grid of a group is set from the (updated) weights
  when its first column comes up; with act_order the grids are set from the weights before any
  update ("static groups"), so groups stay contiguous in input order whatever the processing
  order, and the codes need no permutation index at load time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .rtn import WeightQuantizer, group_grid, rtn_quantize, to_codes

if TYPE_CHECKING:
    from .calibration import Calibration


class HessianAccumulator:
    """H = 2 / n * sum over calibration tokens of x x^T, for one linear layer's inputs (in fp64 sums)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Inputs [..., in_features] (any leading dims: every row is one token)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("no calibration tokens reached this layer")
        return (2.0 / self.tokens * self.sum).float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] and H [in, in] -> (codes uint8 [out, in], scales [out, in/g], zeros uint8 [out, in/g]),
    the same layout as `rtn_quantize`."""
    out_features, in_features = weight.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dim {in_features}")
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight's input dim is {in_features}")
    if not 0 <= damp < 1:
        raise ValueError(f"damp={damp} must lie in [0, 1)")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    groups = in_features // group_size
    scale = torch.empty(out_features, groups, dtype=scale_dtype, device=W.device)
    zero = torch.empty(out_features, groups, dtype=torch.float32, device=W.device)
    order = torch.arange(in_features, device=W.device)
    if act_order:
        for g in range(groups):  # static groups: grids from the weights before any update
            cols = slice(g * group_size, (g + 1) * group_size)
            scale[:, g], zero[:, g] = group_grid(W[:, cols], bits, symmetric, scale_dtype)
        order = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, order], H[order][:, order]
    Hinv = _upper_cholesky_of_inverse(H, damp)

    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=W.device)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group_size
            if not act_order and column % group_size == 0:  # a group begins: its grid from the updated weights
                scale[:, g], zero[:, g] = group_grid(
                    _updated_ahead(block, W, errors, Hinv, start, end, i, group_size), bits, symmetric, scale_dtype
                )
            s, z = scale[:, g].float(), zero[:, g]
            w = block[:, i]
            q = to_codes(w, s, z, bits)
            codes[:, column] = q
            err = (w - (q.float() - z) * s) / Hinv[start + i, start + i]
            block[:, i:] -= err[:, None] * Hinv[start + i, start + i : end][None, :]
            errors[:, i] = err
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return codes, scale, zero.to(torch.uint8)


def _updated_ahead(block, W, errors, Hinv, start: int, end: int, i: int, width: int) -> torch.Tensor:
    """Columns start+i .. start+i+width of W with every update so far, including the current block's
    updates that the lazy scheme has not yet applied past the block (so the block size changes nothing)."""
    inside = block[:, i : i + width]
    missing = width - inside.shape[1]
    if missing <= 0:
        return inside
    beyond = W[:, end : end + missing] - errors[:, :i] @ Hinv[start : start + i, end : end + missing]
    return torch.cat([inside, beyond], dim=1)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, U upper triangular (raising the damping
    tenfold, up to twice, when H is too ill-conditioned to factor)."""
    eye = torch.eye(H.shape[0], device=H.device)
    mean_diag = torch.diagonal(H).mean()
    for attempt in range(3):
        damped = H + damp * 10**attempt * mean_diag * eye
        L, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return U
    raise ValueError(f"the Hessian is not positive definite even with damping {damp * 100:g}; raise damp")


@dataclass
class GPTQLog:
    """What the quantizer fell back on: experts quantized with their pool's Hessian, modules no
    calibration token reached (quantized by RTN)."""

    pooled_experts: dict[str, int] = field(default_factory=dict)
    uncalibrated: list[str] = field(default_factory=list)


def gptq_weight_quantizer(
    calibration: Calibration,
    bits: int,
    symmetric: bool,
    damp: float,
    act_order: bool,
    block_size: int,
    min_expert_tokens: int,
    scale_dtype: torch.dtype,
    log: GPTQLog,
) -> WeightQuantizer:
    """GPTQ codes for each weight `quantize_model` hands over, from the calibration's Hessians."""

    def gptq(weight, hessian, group_size):
        return gptq_quantize(weight, hessian, bits, group_size, symmetric, damp, act_order, block_size, scale_dtype)

    def quantize(name: str, weight: torch.Tensor, group_size: int):
        try:
            if weight.dim() == 2:
                return gptq(weight, calibration.linear[name].hessian(), group_size)
            pool, which = name.rsplit(".", 1)
            parts = []
            for e in range(weight.shape[0]):
                hessian, source = calibration.expert_hessian(pool, which, e, min_expert_tokens)
                if source == "pooled":
                    log.pooled_experts[name] = log.pooled_experts.get(name, 0) + 1
                parts.append(gptq(weight[e], hessian, group_size))
            return tuple(torch.stack(p) for p in zip(*parts, strict=True))
        except ValueError as err:
            if "no calibration token" not in str(err):
                raise
            log.uncalibrated.append(name)
            return rtn_quantize(weight, bits, group_size, symmetric, scale_dtype)

    return quantize
