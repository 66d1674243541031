"""Linear layers whose weights are reordered for oneDNN once, at load: a CPU serving engine's matmuls.

    packed = pack_decoder(model)   # inference only: an ErnieForCausalLM's decoder layers and LM head

On a CPU, `F.linear` in bf16 runs oneDNN but reorders the weight into its blocked layout at every call, a pass
over the whole weight per matmul; in fp32 it runs the BLAS torch was built with (MKL, which takes a slower
code path on AMD CPUs). `PackedLinear` keeps the weight in oneDNN's layout and calls oneDNN's linear on it,
the same op torch.compile's freezing pass uses. Same arithmetic: bf16 gives the same bits, fp32 agrees to
rounding. bench/linear_packing.py measures it against `F.linear` per layer shape.

What it leaves alone: weights under `MIN_ELEMENTS`, layers that are not exactly `nn.Linear` (quantized
layers, LoRA), other devices and dtypes, and CPUs whose oneDNN cannot run bf16. A weight other modules
share stays where they use it: a tied LM head is packed from the embedding table, which stays, so that
weight is held twice. A packed layer has no autograd and no state_dict entry, and `torch.compile` cannot
lower it: the serving engine packs only models it serves eagerly.
"""

from __future__ import annotations

import torch
from torch import nn

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
MIN_ELEMENTS = {torch.float32: 1 << 20, torch.bfloat16: 1 << 16}
"""Smaller weights stay as they are. A call of oneDNN's linear costs more than one of `F.linear` (about 13 against
3-5 us on a 2-core AMD EPYC); at one row packing pays from 256 x 256 weights in bf16 and from about 1024 x 1024 in
fp32, and a tiny model's layers only lose (bench/linear_packing.py, its square weights)."""


def can_pack(weight: torch.Tensor) -> bool:
    """Whether this torch build and CPU run oneDNN's linear for `weight`'s device and dtype."""
    if weight.device.type != "cpu" or weight.dtype not in PACKABLE_DTYPES:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward over a weight reordered for oneDNN (see the module docstring)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # plain attributes, not parameters or buffers: an opaque oneDNN tensor has no storage to save or move
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(
    model: nn.Module, skip: tuple[nn.Module | None, ...] = (), min_elements: dict[torch.dtype, int] | None = None
) -> int:
    """Replace every `nn.Linear` of `model` whose weight `can_pack` and has at least `min_elements[dtype]`
    elements (default `MIN_ELEMENTS`) by a `PackedLinear`, except inside the modules of `skip`; how many were."""
    least = MIN_ELEMENTS if min_elements is None else min_elements
    skipped = {id(m) for part in skip if part is not None for m in part.modules()}
    count = 0
    for parent in list(model.modules()):
        if id(parent) in skipped:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or id(child) in skipped or not can_pack(child.weight):
                continue
            if child.weight.numel() >= least[child.weight.dtype]:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def pack_decoder(model, min_elements: dict[torch.dtype, int] | None = None) -> int:
    """Pack the layers every generated token runs through (`ErnieForCausalLM`'s decoder layers and LM head).
    The vision encoder and adapter run once per image and read their weights' dtype: they stay as stored."""
    return pack_linears(model, skip=(model.vision_encoder, model.adapter), min_elements=min_elements)
