"""A Triton kernel for `x @ dequantize(W).T` straight from `ernie.quant`'s packed weights.

The weight never exists dequantized in memory: each program loads a [BK, BN] tile of packed bytes,
unpacks its 2-, 4- or 8-bit codes, applies the group's scale and zero point ((code - zero) * scale)
and multiplies with the activation tile, accumulating in fp32. Reading 4-bit weights moves a
quarter of bf16's bytes, which is what decode (a few rows of activations) is bound by.

Layout (`ernie.quant`): codes of row n packed along the input dim, 8 / bits to a byte, code i of a
row at bits (i % (8/bits)) * bits of byte i // (8/bits); scales and zero points [N, K / group].

Triton ships with CUDA builds of PyTorch. `QuantizedLinear` uses the kernel for CUDA inputs when
Triton imports; CPU inputs take dequantize-then-matmul. With TRITON_INTERPRET=1 the same kernel
runs on CPU tensors through Triton's interpreter, which is how the tests check it on machines
without a GPU.
"""

from __future__ import annotations

import functools

import torch


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    """The jitted kernel, built on first use (TRITON_INTERPRET is read when it is built)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_matmul(
        x_ptr,
        w_ptr,
        scale_ptr,
        zero_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_om,
        group_size,
        BITS: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        PER_BYTE: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < K
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0
            )
            tile_ok = k_ok[:, None] & (rn[None, :] < N)
            packed = tl.load(w_ptr + rn[None, :] * stride_wn + (rk // PER_BYTE)[:, None], mask=tile_ok, other=0)
            codes = (packed.to(tl.int32) >> ((rk % PER_BYTE) * BITS)[:, None]) & MASK
            group = (rk // group_size)[:, None]
            scale = tl.load(scale_ptr + rn[None, :] * stride_sn + group, mask=tile_ok, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + rn[None, :] * stride_sn + group, mask=tile_ok, other=0).to(tl.float32)
            w = (codes.to(tl.float32) - zero) * scale  # [BK, BN]
            acc += tl.dot(x, w.to(x.dtype))  # bf16 x bf16 on tensor cores, fp32 accumulation
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))

    return dequant_matmul


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    block: tuple[int, int, int] = (16, 64, 64),
) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] in x's dtype, W [N, K] given packed (qweight uint8 [N, K*bits/8],
    scales / zeros [N, K/group_size]). Blocks (BM, BN, BK): at least 16 each (tl.dot)."""
    import triton

    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).contiguous()
    M, N = x2.shape[0], qweight.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=torch.float32)
    BM, BN, BK = block
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _kernel()[grid](
        x2,
        qweight.contiguous(),
        scales.contiguous(),
        zeros.contiguous(),
        out,
        M,
        N,
        in_features,
        x2.stride(0),
        qweight.stride(0),
        scales.stride(0),
        out.stride(0),
        group_size,
        BITS=bits,
        BM=BM,
        BN=BN,
        BK=BK,
    )
    return out.to(x.dtype).reshape(*lead, N)
