"""Round-to-nearest (RTN) weight-only quantization, group-wise along the input dim.

Per (row, group of `group_size` inputs): min/max -> scale (and zero point) -> round ->
clamp, written into `ernie.quant`'s packed modules. Asymmetric groups widen [min, max]
to include 0 so the zero point is an integer code (as GPTQ and vLLM's kernels expect);
symmetric groups use zero point 2**(bits-1) and scale = absmax / (2**(bits-1) - 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from ernie.moe import GroupedExperts
from ernie.quant import QuantizedGroupedExperts, QuantizedLinear, dequantize

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LayerQuantStats:
    """What quantizing one module did: relative Frobenius error and bytes before / after."""

    name: str
    kind: str  # linear | experts
    rel_error: float
    bytes_before: int
    bytes_after: int
    bits: int = 0
    """Code bits of the module's weights (per-module widths: `bits_of`)."""


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = False, scale_dtype=torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [..., out, in] -> (codes uint8 [..., out, in], scales [..., out, in/g], zeros uint8 [..., out, in/g])."""
    *lead, out_features, in_features = weight.shape
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide the input dim {in_features}")
    w = weight.detach().float().reshape(*lead, out_features, in_features // group_size, group_size)
    scale, zero = group_grid(w, bits, symmetric, scale_dtype)
    codes = to_codes(w, scale[..., None], zero[..., None], bits)
    return codes.reshape(weight.shape), scale, zero.to(torch.uint8)


def group_grid(
    w: torch.Tensor, bits: int, symmetric: bool, scale_dtype=torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as stored, integer zero point as float) of each group, a group being w's last dim."""
    maxq = 2**bits - 1
    tiny = torch.finfo(scale_dtype).tiny  # an all-zero group gets a tiny, not a zero, scale
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (w.abs().amax(-1) / (half - 1)).clamp(min=tiny).to(scale_dtype)
        return scale, torch.full_like(scale, half, dtype=torch.float32)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / maxq).clamp(min=tiny).to(scale_dtype)  # codes are computed against the scale as stored
    return scale, (-lo / scale.float()).round().clamp(0, maxq)


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes of w on the grid (scale, zero), broadcast against w, as uint8."""
    return ((w / scale.float()).round() + zero).clamp(0, 2**bits - 1).to(torch.uint8)


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern (fnmatch) when the pattern matches it or one of its parents."""
    parts = name.split(".")
    return any(fnmatch(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def is_skipped(name: str, skip: list[str]) -> bool:
    return any(matches(name, p) for p in skip)


def bits_of(name: str, module_bits: dict[str, int], default: int) -> int:
    """A module's code width: the first pattern of `module_bits` (in the order given) that matches it, else
    `default`. First match wins, as in vLLM's GPTQ `dynamic` rules the export writes."""
    return next((int(bits) for pattern, bits in module_bits.items() if matches(name, pattern)), default)


def by_bits(targets: dict[str, nn.Module], module_bits: dict[str, int], default: int) -> dict[int, dict]:
    """Targets split by their code width, each group in model order."""
    groups: dict[int, dict[str, nn.Module]] = {}
    for name, module in targets.items():
        groups.setdefault(bits_of(name, module_bits, default), {})[name] = module
    return groups


def in_target_order(stats: list[LayerQuantStats], targets: dict[str, nn.Module]) -> list[LayerQuantStats]:
    order = {name: i for i, name in enumerate(targets)}
    return sorted(stats, key=lambda s: order[s.name])


def quantization_targets(model: nn.Module, skip: list[str]) -> dict[str, nn.Module]:
    """Linear layers and stacked experts not skipped. Routers, norms and embeddings are not
    `nn.Linear` and are never targets; lm_head is one, kept out by the default skip list."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, GroupedExperts)) and not is_skipped(name, skip)
    }


def input_dims(module: nn.Module) -> list[int]:
    if isinstance(module, GroupedExperts):
        return [module.gate_up_proj.shape[-1], module.down_proj.shape[-1]]
    return [module.in_features]


WeightQuantizer = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(name, weight [..., out, in], group size) -> (codes, scales, zeros) as `rtn_quantize` returns them; an
expert pool's weights come as "<pool>.gate_up" [E, 2I, H] and "<pool>.down" [E, H, I]."""


def quantize_model(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = 32,
    symmetric: bool = False,
    skip: list[str] | None = None,
    scale_dtype: torch.dtype = torch.float16,
    on_layer=None,
    quantize_weight: WeightQuantizer | None = None,
    targets: dict[str, nn.Module] | None = None,
) -> list[LayerQuantStats]:
    """Replace every target module of `model` (in place) by its quantized form: RTN unless
    `quantize_weight` computes the codes (GPTQ). `targets` (names in `model`): the modules to quantize, by
    default every one `skip` leaves (the quantize stage passes one decoder layer's at a time).

    group_size None: one group per row (per-channel scales over the whole input dim)."""
    if quantize_weight is None:

        def quantize_weight(_name, weight, g):
            if weight.dim() == 3:  # an expert pool, one expert at a time: fp32 temporaries of one expert's size
                parts = [rtn_quantize(w, bits, g, symmetric, scale_dtype) for w in weight]
                return tuple(torch.stack(p) for p in zip(*parts, strict=True))
            return rtn_quantize(weight, bits, g, symmetric, scale_dtype)

    stats = []
    targets = quantization_targets(model, skip or []) if targets is None else targets
    for name, module in targets.items():
        if isinstance(module, GroupedExperts):
            qmodule, errors = _quantize_experts(name, module, bits, group_size, scale_dtype, quantize_weight)
            before = sum(p.numel() * p.element_size() for p in (module.gate_up_proj, module.down_proj))
            kind, after = "experts", qmodule.gate_up.nbytes() + qmodule.down.nbytes()
        else:
            g = group_size or module.in_features
            codes, scales, zeros = quantize_weight(name, module.weight, g)
            qmodule = QuantizedLinear.from_codes(codes, scales, zeros, g, bits, module.bias)
            errors = [_rel_error(module.weight, dequantize(codes, scales, zeros, g))]
            before = module.weight.numel() * module.weight.element_size()
            kind, after = "linear", qmodule.nbytes()
        qmodule.to(next(iter(module.parameters())).device)
        model.set_submodule(name, qmodule)
        stats.append(LayerQuantStats(name, kind, _combine(errors), before, after, bits))
        if on_layer is not None:
            on_layer(stats[-1])
    return stats


def _quantize_experts(name: str, module: GroupedExperts, bits, group_size, scale_dtype, quantize_weight):
    E, two_i, H = module.gate_up_proj.shape
    qmodule = QuantizedGroupedExperts(
        E, H, two_i // 2, bits, group_size or H, scale_dtype, down_group_size=group_size or two_i // 2
    )
    errors = []
    parts = ((qmodule.gate_up, module.gate_up_proj, "gate_up"), (qmodule.down, module.down_proj, "down"))
    for packed, weight, which in parts:
        codes, scales, zeros = quantize_weight(f"{name}.{which}", weight, packed.group_size)
        packed.fill(codes, scales.to(scale_dtype), zeros)
        g = packed.group_size
        errors += [_rel_error(weight[e], dequantize(codes[e], scales[e], zeros[e], g)) for e in range(E)]
    return qmodule, errors


def _rel_error(weight: torch.Tensor, approx: torch.Tensor) -> tuple[float, float]:
    """(squared error, squared norm), combined over a module's weights by `_combine`."""
    w = weight.detach().float()
    return float((w - approx).pow(2).sum()), float(w.pow(2).sum())


def _combine(errors: list[tuple[float, float]]) -> float:
    err, norm = sum(e for e, _ in errors), sum(n for _, n in errors)
    return (err / norm) ** 0.5 if norm > 0 else 0.0
