"""KV cache for incremental decoding: prefill once, then one (or a few) tokens per step.

A contiguous per-layer cache that grows by concatenation. It also remembers, per batch
row, which key slots hold real tokens (left padding), which document each slot belongs to
and the next RoPE position, so a decode step needs nothing but the new token ids.
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

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep only / reorder batch rows (beam search, finished sequences)."""
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            if k is not None:
                self.keys[i], self.values[i] = k[rows], v[rows]
        for name in ("key_valid", "document_ids", "next_position"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[rows])
