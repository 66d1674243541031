"""The Triton dequantizing matmul (`ernie.quant_kernel`) equals dequantize-then-matmul, for every
packed width, ragged shapes and groups; run through Triton's interpreter on CPU tensors."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is built: CPU tensors through the interpreter

import pytest
import torch

from ernie.quant import QuantizedLinear, dequantize
from ernie.quant_kernel import dequant_matmul


def _packed_layer(bits: int, out_features: int, in_features: int, group: int, seed: int) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=g)
    scales = (torch.rand(out_features, in_features // group, generator=g) * 0.1 + 0.01).to(torch.float16)
    zeros = torch.randint(0, 2**bits, (out_features, in_features // group), generator=g)
    return QuantizedLinear.from_codes(codes, scales, zeros, group, bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features", "group"), [(1, 64, 64, 16), (5, 48, 96, 32), (33, 80, 128, 64)]
)
def test_kernel_equals_dequantize_then_matmul(bits, rows, out_features, in_features, group):
    layer = _packed_layer(bits, out_features, in_features, group, seed=bits * 100 + rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    expected = x @ dequantize(layer.codes(), layer.scales, layer.zeros, group).T
    got = dequant_matmul(x, layer.qweight, layer.scales, layer.zeros, bits, group, in_features)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_kernel_keeps_leading_dims_and_the_activation_dtype():
    layer = _packed_layer(4, 32, 64, 32, seed=1)
    x = torch.randn(2, 3, 64)
    got = dequant_matmul(x, layer.qweight, layer.scales, layer.zeros, 4, 32, 64, block=(16, 16, 32))
    assert got.shape == (2, 3, 32) and got.dtype == x.dtype
    torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-4)
