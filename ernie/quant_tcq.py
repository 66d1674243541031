"""Trellis-coded weights: a bit-shift convolutional code, 2-bit codes whose overlapping windows pick the values.

    from ernie.quant_tcq import TCQLinear, tcq_dequantize
    layer = TCQLinear.from_codes(codes, scales, group_size=32, bits=2, window_bits=10)
    y = layer(x)                    # == F.linear(x, tcq_dequantize(codes, scales, 32, 2, 10))

Each row of a weight W [..., out, in] is a stream of k-bit codes along the input dim (k = `bits`):
a lead-in of L/k - 1 codes, then one code b_t per weight. Weight t takes its value from the
window of the stream's last L bits (L = `window_bits`), its own code in the top bits:

    window_t = b_t << (L - k) | b_{t-1} << (L - 2k) | ... | b_{t-L/k+1}     (b_{-1}... from the lead-in)
    W[r, t]  = trellis_values(L)[window_t] * scales[r, t // group_size]

so every code takes part in L/k consecutive weights: a rate-k convolutional code whose 2**(L-k)
states the encoder searches with the Viterbi algorithm (`stages/quantize/tcq.py`). Decoding is
shifts, one gather and a multiply. `trellis_values(L)` is a fixed table of 2**L values spread as a
standard normal (unit RMS), ordered by an integer hash of the window (so that consecutive windows,
which share bits, get unrelated values); it is computed, never stored.

Storage: the codes, lead-in first, packed as `ernie.quant.pack` packs integer codes (`qweight`
uint8 [..., out, ceil((in + L/k - 1) * k / 8)]) and one scale per row and group of `group_size`
inputs (`scales`, fp16 by default): no zero points, no codebooks. `ernie.quant` saves and loads these modules (kinds
"tcq_linear" and "tcq_experts" in quant_config.json) like its integer ones.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .quant import SUPPORTED_BITS, PackedExperts, QuantFormatError, pack, packed_length, unpack

MAX_WINDOW_BITS = 16


def _lowbias32(x: int) -> int:
    """A 32-bit integer mixing function (C. Wellons' "lowbias32" constants), in exact integer arithmetic."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@lru_cache(maxsize=8)
def _table(window_bits: int) -> torch.Tensor:
    n = 2**window_bits
    order = sorted(range(n), key=lambda w: (_lowbias32(w), w))
    rank = torch.empty(n, dtype=torch.float64)
    rank[torch.tensor(order)] = torch.arange(n, dtype=torch.float64)
    values = torch.special.ndtri((rank + 0.5) / n)
    return (values / values.pow(2).mean().sqrt()).float()


def trellis_values(window_bits: int) -> torch.Tensor:
    """The value of each of the 2**window_bits windows: fp32, unit RMS, a standard normal's quantiles in
    hashed order."""
    if not 0 < window_bits <= MAX_WINDOW_BITS:
        raise QuantFormatError(f"window_bits={window_bits} must lie in [1, {MAX_WINDOW_BITS}]")
    return _table(window_bits).clone()


def lead_in(bits: int, window_bits: int) -> int:
    """Codes before a row's first weight: they fill its window."""
    return window_bits // bits - 1


def windows(codes: torch.Tensor, bits: int, window_bits: int) -> torch.Tensor:
    """A code stream [..., n] -> the window (int64 [..., n]) read at each position, codes before the stream being 0."""
    codes = codes.long()
    window = torch.zeros_like(codes)
    for age in range(window_bits // bits):  # the code `age` steps back sits `age` code widths lower
        older = F.pad(codes, (age, 0))[..., : codes.shape[-1]]
        window |= older << (window_bits - bits * (age + 1))
    return window


def tcq_dequantize(
    codes: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, window_bits: int
) -> torch.Tensor:
    """codes [..., out, lead-in + in], scales [..., out, in/group_size] -> W [..., out, in] (fp32)."""
    read = windows(codes, bits, window_bits)[..., lead_in(bits, window_bits) :]
    values = trellis_values(window_bits).to(codes.device)[read]
    return values * scales.float().repeat_interleave(group_size, dim=-1)


def check_layout(bits: int, window_bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantFormatError(f"bits={bits} is not a packable code width; supported: {SUPPORTED_BITS}")
    if window_bits % bits or not bits < window_bits <= MAX_WINDOW_BITS:
        raise QuantFormatError(
            f"window_bits={window_bits} must be a multiple of bits={bits}, above it and at most {MAX_WINDOW_BITS}"
        )


class _TCQWeight(nn.Module):
    """One trellis-coded weight [..., out, in]: buffers `qweight` (uint8) and `scales`."""

    def __init__(
        self, shape: tuple[int, ...], bits: int, window_bits: int, group_size: int, scale_dtype: torch.dtype
    ) -> None:
        super().__init__()
        check_layout(bits, window_bits)
        *lead, out_features, in_features = shape
        if group_size <= 0 or in_features % group_size:
            raise QuantFormatError(f"group_size={group_size} must divide the input dim {in_features}")
        self.shape, self.bits, self.window_bits, self.group_size = tuple(shape), bits, window_bits, group_size
        self.stream = in_features + lead_in(bits, window_bits)  # codes per row
        self.register_buffer(
            "qweight", torch.zeros(*lead, out_features, packed_length(self.stream, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(*lead, out_features, in_features // group_size, dtype=scale_dtype))

    def fill(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        if tuple(codes.shape) != (*self.shape[:-1], self.stream):
            raise QuantFormatError(
                f"codes {tuple(codes.shape)} should be {(*self.shape[:-1], self.stream)}: a lead-in of "
                f"{self.stream - self.shape[-1]} codes and one per input of the {self.shape} weight"
            )
        if tuple(scales.shape) != tuple(self.scales.shape):
            raise QuantFormatError(f"scales {tuple(scales.shape)} should be {tuple(self.scales.shape)}")
        self.qweight = pack(codes, self.bits).to(self.qweight.device)
        self.scales = scales.to(self.scales.dtype).to(self.scales.device)

    def codes(self) -> torch.Tensor:
        """The code streams [..., out, lead-in + in]."""
        return unpack(self.qweight, self.stream, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return tcq_dequantize(self.codes(), self.scales, self.group_size, self.bits, self.window_bits).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales))

    def spec(self) -> dict:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "window_bits": self.window_bits,
            "group_size": self.group_size,
            "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
        }


class TCQLinear(_TCQWeight):
    """A bias-optional linear layer with a trellis-coded weight [out, in].

    forward dequantizes the weight to the activation dtype, then runs `F.linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 2,
        window_bits: int = 10,
        group_size: int = 32,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__((out_features, in_features), bits, window_bits, group_size, scale_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        group_size: int,
        bits: int = 2,
        window_bits: int = 10,
        bias: torch.Tensor | None = None,
    ) -> TCQLinear:
        out_features, in_features = codes.shape[0], codes.shape[1] - lead_in(bits, window_bits)
        layer = cls(in_features, out_features, bits, window_bits, group_size, bias is not None, scales.dtype)
        layer.fill(codes, scales)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32), for inspection and export."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def spec(self) -> dict:
        return {"kind": "tcq_linear", "bias": self.bias is not None, **super().spec()}

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"window_bits={self.window_bits}, group_size={self.group_size}"
        )


class TCQGroupedExperts(PackedExperts):
    """`GroupedExperts` with trellis-coded weights: gate_up_proj [E, 2I, H] and down_proj [E, H, I], each
    row of each expert its own code stream. forward dequantizes both once per call."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        bits: int = 2,
        window_bits: int = 10,
        group_size: int = 32,
        scale_dtype: torch.dtype = torch.float16,
        down_group_size: int | None = None,
    ) -> None:
        super().__init__(num_experts, intermediate)
        shapes = {"gate_up": (num_experts, 2 * intermediate, hidden), "down": (num_experts, hidden, intermediate)}
        self.gate_up = _TCQWeight(shapes["gate_up"], bits, window_bits, group_size, scale_dtype)
        self.down = _TCQWeight(shapes["down"], bits, window_bits, down_group_size or group_size, scale_dtype)

    def spec(self) -> dict:
        return {"kind": "tcq_experts", "gate_up_proj": self.gate_up.spec(), "down_proj": self.down.spec()}


TCQ_MODULES = (TCQLinear, TCQGroupedExperts)


def tcq_module_from_spec(spec: dict, scale_dtype) -> nn.Module:
    """The empty module a quant_config.json entry of kind tcq_linear / tcq_experts describes
    (`scale_dtype(spec)` reads and checks a spec's scale dtype)."""
    try:
        if spec["kind"] == "tcq_linear":
            out_features, in_features = spec["shape"]
            return TCQLinear(
                in_features,
                out_features,
                spec["bits"],
                spec["window_bits"],
                spec["group_size"],
                spec.get("bias", False),
                scale_dtype(spec),
            )
        gu, down = spec["gate_up_proj"], spec["down_proj"]
        if (gu["bits"], gu["window_bits"]) != (down["bits"], down["window_bits"]):
            raise QuantFormatError("gate_up_proj and down_proj of one expert pool must use the same code")
        E, two_i, H = gu["shape"]
        return TCQGroupedExperts(
            E, H, two_i // 2, gu["bits"], gu["window_bits"], gu["group_size"], scale_dtype(gu), down["group_size"]
        )
    except KeyError as err:
        raise QuantFormatError(f"a {spec['kind']} entry of quant_config.json lacks {err}") from None
