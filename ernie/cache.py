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

    # ------------------------------------------------------------------ continuous batching
    def merge(self, other: KVCache) -> None:
        """Append `other`'s rows to this cache's batch (a request joining a running batch).

        Rows are left-padded: the shorter side gets invalid key slots in front, so every row's
        newest token stays in the last slot and one decode step serves all rows. Positions stay
        per row (`next_position`), so padding never shifts a row's RoPE positions."""
        if other.keys[0] is None:
            return
        if self.keys[0] is None:
            self.__dict__.update(other.__dict__)
            return
        length = max(self.length, other.length)
        key_valid = _stack_left_padded(self._valid(), other._valid(), length, 1)
        if self.document_ids is not None or other.document_ids is not None:
            self.document_ids = _stack_left_padded(self._documents(), other._documents(), length, 1)
        for i in range(len(self.keys)):
            self.keys[i] = _stack_left_padded(self.keys[i], other.keys[i], length, 2)
            self.values[i] = _stack_left_padded(self.values[i], other.values[i], length, 2)
        self.key_valid = key_valid
        self.next_position = torch.cat([self.next_position, other.next_position])

    def trim(self) -> None:
        """Drop the key slots no row holds a real token in (the padding of rows that left); a cache
        whose slots are then all real forgets its `key_valid`, so attention needs no mask again."""
        if self.key_valid is None or self.keys[0] is None:
            return
        keep = self.key_valid.any(dim=0)
        if not bool(keep.all()):
            # left padding leaves the unused slots in front: a slice (a view, no copy) drops them
            first = int(keep.int().argmax())
            cols = slice(first, None) if bool(keep[first:].all()) else keep
            for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                self.keys[i], self.values[i] = k[:, :, cols], v[:, :, cols]
            self.key_valid = self.key_valid[:, cols]
            if self.document_ids is not None:
                self.document_ids = self.document_ids[:, cols]
        if bool(self.key_valid.all()):
            self.key_valid = None

    @property
    def batch_size(self) -> int:
        k = self.keys[0]
        return 0 if k is None else k.shape[0]

    # ------------------------------------------------------------------ handing rows to another engine
    def export(self) -> dict:
        """The cache as contiguous CPU tensors, without the slots no row holds a real token in: what an
        engine that did not compute it needs to decode on (prefill/decode disaggregation). Nothing here
        changes; `from_state` rebuilds it."""
        if self.keys[0] is None:
            return {"keys": list(self.keys), "values": list(self.values)}
        cols = slice(None) if self.key_valid is None else self.key_valid.any(dim=0)

        def cpu(t: torch.Tensor | None, dim: int) -> torch.Tensor | None:
            if t is None:
                return None
            index = (slice(None),) * dim + (cols,)
            return t[index].detach().to("cpu").contiguous()

        state = {"keys": [cpu(k, 2) for k in self.keys], "values": [cpu(v, 2) for v in self.values]}
        state.update({name: cpu(getattr(self, name), 1) for name in ("key_valid", "document_ids")})
        state["next_position"] = None if self.next_position is None else self.next_position.detach().cpu()
        return state

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str = "cpu") -> KVCache:
        """A cache of `export()`'s tensors, moved to `device`."""
        cache = cls(len(state["keys"]))
        cache.keys = [None if k is None else k.to(device) for k in state["keys"]]
        cache.values = [None if v is None else v.to(device) for v in state["values"]]
        for name in ("key_valid", "document_ids", "next_position"):
            t = state.get(name)
            setattr(cache, name, None if t is None else t.to(device))
        return cache

    def _valid(self) -> torch.Tensor:
        if self.key_valid is not None:
            return self.key_valid
        return torch.ones(self.batch_size, self.length, dtype=torch.bool, device=self.keys[0].device)

    def _documents(self) -> torch.Tensor:
        if self.document_ids is not None:
            return self.document_ids
        return torch.zeros(self.batch_size, self.length, dtype=torch.long, device=self.keys[0].device)


def _stack_left_padded(a: torch.Tensor, b: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`a` and `b` stacked along the batch (dim 0), each left-padded with zeros (False) along `dim` to
    `length`: one new tensor, written once."""
    shape = list(a.shape)
    shape[0], shape[dim] = a.shape[0] + b.shape[0], length
    out = a.new_empty(shape)
    for rows, t in ((out[: a.shape[0]], a), (out[a.shape[0] :], b)):
        pad = length - t.shape[dim]
        rows.narrow(dim, 0, pad).zero_()
        rows.narrow(dim, pad, t.shape[dim]).copy_(t)
    return out
