"""KV cache for incremental decoding: prefill once, then one (or a few) tokens per step.

A contiguous per-layer cache that grows by concatenation. It also remembers, per batch
row, which key slots hold real tokens (left padding), which document each slot belongs to
and the next RoPE position, so a decode step needs nothing but the new token ids.

It serves `generate` and evaluation, and is the exchange format of a request's cache (prefix
caching, prefill/decode handoff); the serving engine keeps its running requests in the paged
cache (`ernie.paged_cache`).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_valid: torch.Tensor | None = None  # [B, S_cached] bool
        self.document_ids: torch.Tensor | None = None  # [B, S_cached]
        self.next_position: torch.Tensor | None = None  # [B] next RoPE position per row

    @property
    def length(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k_BNSD: torch.Tensor, v_BNSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values for `layer`; return everything cached so far."""
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer] = k_BNSD, v_BNSD
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k_BNSD], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v_BNSD], dim=2)
        return self.keys[layer], self.values[layer]

    @property
    def batch_size(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[0]
