"""Grouped-query attention with interleaved RoPE, document masking and a KV cache.

Two kernels: SDPA (default; takes the flash/causal path when nothing but causality masks)
and FlexAttention (a block-sparse document mask, for long packed rows on GPU). Both see
the same `AttentionMask`, so they agree to floating-point tolerance.

A decode step (one new token per row after a cached prefix) takes its own SDPA path: the
query heads that share a KV head are folded into the query-length dimension, so one SDPA
call attends over the cached K/V as they are, with no per-query-head copy of K/V (what
`enable_gqa` costs with a single query: on CPU the fused kernel then works head by head,
re-reading and, in bf16, re-converting each KV block once per query head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ErnieConfig
from .paged_cache import BlockAttention
from .rope import apply_rope

AttnImpl = Literal["sdpa", "flex"]


@dataclass
class AttentionMask:
    """Who may attend to whom in one forward pass, shared by every layer.

    A query at slot `past + i` sees key slot `j` iff `j <= past + i`, key `j` is a real
    token (`key_valid`) and both belong to the same document (`document_ids`).
    """

    past: int
    q_len: int
    kv_len: int
    key_valid: torch.Tensor | None = None  # [B, kv_len] bool
    document_ids: torch.Tensor | None = None  # [B, kv_len]
    impl: AttnImpl = "sdpa"
    _prepared: object = None
    _decode_bias: torch.Tensor | None = None  # additive form of `_prepared` for decode steps

    @property
    def is_decode(self) -> bool:
        """One new token per row after a cached prefix (the SDPA kernel's grouped-query fast path)."""
        return self.impl == "sdpa" and self.q_len == 1 and self.past > 0

    def prepare(self, batch: int, device: torch.device) -> AttentionMask:
        """Build the mask tensor (or flex block mask) once for all layers."""
        if self.impl == "flex":
            self._prepared = self.flex_block_mask(batch, device)
        elif not (self.is_plain_causal or self.sees_everything):
            self._prepared = self.dense(device)
        return self

    @property
    def is_plain_causal(self) -> bool:
        return self.past == 0 and self.key_valid is None and self.document_ids is None

    @property
    def sees_everything(self) -> bool:
        """One new token per row with no padding or documents: no mask needed."""
        return self.q_len == 1 and self.key_valid is None and self.document_ids is None

    def dense(self, device: torch.device) -> torch.Tensor:
        """Boolean mask [B or 1, 1, q_len, kv_len]."""
        q_slot = torch.arange(self.past, self.past + self.q_len, device=device)
        k_slot = torch.arange(self.kv_len, device=device)
        allowed = (k_slot[None, :] <= q_slot[:, None])[None]  # [1, Sq, Skv]
        if self.document_ids is not None:
            docs = self.document_ids.to(device)
            allowed = allowed & (docs[:, self.past :, None] == docs[:, None, :])
        if self.key_valid is not None:
            allowed = allowed & self.key_valid.to(device)[:, None, :]
        # A padded query with no visible key would give NaN; let it see all (its output is unused).
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed[:, None]

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """For a decode step: the mask as an additive bias [B or 1, 1, 1, kv_len] in `dtype` (0 where
        a key is seen, -inf elsewhere; the same numbers SDPA makes of the boolean mask), or None when
        every key is seen. Made by the first layer, reused by the others."""
        if self._prepared is None:
            return None
        bias = self._decode_bias
        if bias is None or bias.dtype != dtype:
            allowed = self._prepared
            bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
            self._decode_bias = bias
        return bias

    def flex_block_mask(self, batch: int, device: torch.device):
        from torch.nn.attention.flex_attention import create_block_mask

        past = self.past
        docs, valid = self.document_ids, self.key_valid

        def mask_mod(b, h, q_idx, kv_idx):
            keep = kv_idx <= q_idx + past
            if docs is not None:
                keep = keep & (docs[b, q_idx + past] == docs[b, kv_idx])
            if valid is not None:
                keep = keep & valid[b, kv_idx]
            return keep

        return create_block_mask(mask_mod, batch, None, self.q_len, self.kv_len, device=device)


class Attention(nn.Module):
    def __init__(self, config: ErnieConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x_BSH: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | BlockAttention | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q = self.q_proj(x_BSH).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSH).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSH).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if isinstance(cache, BlockAttention):
            return self.o_proj(cache.attend(self.layer_idx, q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if mask.is_decode:
            return self.o_proj(self._decode_attention(q, k, v, mask).view(B, 1, -1))
        gqa = self.num_heads != self.num_kv_heads
        if mask.impl == "flex":
            out = _flex_attention()(q, k, v, block_mask=mask._prepared, enable_gqa=gqa)
        elif mask.is_plain_causal:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif mask.sees_everything:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask._prepared, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def _decode_attention(
        self, q_BH1D: torch.Tensor, k_BNLD: torch.Tensor, v_BNLD: torch.Tensor, mask: AttentionMask
    ) -> torch.Tensor:
        """Attention of one new token per row: [B, H, 1, D] queries over [B, Hkv, kv_len, D] keys and
        values -> [B, H * D].

        Query head h reads KV head h // g (g = H / Hkv, as `enable_gqa` pairs them), so the g query heads
        of a KV head become g query rows of that head: q [B, Hkv, g, D]. They are one token, so they see
        the same keys: the mask [B, 1, 1, kv_len] broadcasts over heads and rows, and causality leaves
        the new token, the last slot, free to see every cached one."""
        B, H, _, D = q_BH1D.shape
        q = q_BH1D.reshape(B, self.num_kv_heads, H // self.num_kv_heads, D)
        out = F.scaled_dot_product_attention(q, k_BNLD, v_BNLD, attn_mask=mask.decode_bias(q.dtype))
        return out.reshape(B, H * D)


_FLEX = None


def _flex_attention():
    """flex_attention, compiled on GPU (the unfused CPU path is for tests only)."""
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention
    return _FLEX
