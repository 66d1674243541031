"""Prefix (context) caching: the KV cache of prompt prefixes already computed, reused by later prompts.

    cache = PrefixCache(budget_tokens=8192, block=16)
    hit = cache.lookup(prompt_ids)          # None, or (its cache truncated to n tokens, n)
    ...prefill only prompt_ids[n:] on top of it...
    cache.store(prompt_ids, kv)             # the prompt's cache, reusable by prompts sharing its prefix

Chat requests share long prefixes (the system prompt, earlier turns), and their prefill is the same work each
time. Prefixes are matched at block boundaries (every `block` tokens): a prompt's cache is stored once, indexed
under each of its boundaries, and a lookup takes the longest boundary it shares that still leaves at least one
token to compute (the first token's logits need one). Stored tensors are never written in place (the cache
grows by concatenation), so a hit shares them without a copy. Entries are evicted least recently used first,
so the stored tokens stay within `budget_tokens`. Text requests only: image tokens' positions depend on the
image, not on the ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ernie.cache import KVCache


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    """Prompt tokens whose prefill a hit saved."""
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    def __init__(self, budget_tokens: int, block: int = 16) -> None:
        if budget_tokens < 0 or block < 1:
            raise ValueError(f"prefix cache budget_tokens={budget_tokens} must be >= 0 and block={block} >= 1")
        self.budget_tokens, self.block = budget_tokens, block
        self.stats = PrefixStats()
        self._entries: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        """Stored prompt (its block-aligned ids) -> its cache, least recently used first."""
        self._index: dict[tuple[int, ...], tuple[int, ...]] = {}
        """Every block boundary of a stored prompt -> that prompt's key."""
        self.tokens = 0

    def lookup(self, prompt_ids: list[int]) -> tuple[KVCache, int] | None:
        """The longest stored prefix of `prompt_ids` at a block boundary, shorter than the prompt."""
        self.stats.lookups += 1
        n = (len(prompt_ids) - 1) // self.block * self.block
        while n > 0:
            key = self._index.get(tuple(prompt_ids[:n]))
            if key is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                self.stats.tokens_reused += n
                return _truncated(self._entries[key], n), n
            n -= self.block
        return None

    def store(self, prompt_ids: list[int], cache: KVCache) -> None:
        """Keep a one-row cache of `prompt_ids` (block-aligned part) if it fits the budget."""
        n = len(prompt_ids) // self.block * self.block
        if n == 0 or n > self.budget_tokens or cache.batch_size != 1 or cache.length < n:
            return
        key = tuple(prompt_ids[:n])
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        while self._entries and self.tokens + n > self.budget_tokens:
            self._evict()
        self._entries[key] = _truncated(cache, n)
        self.tokens += n
        for boundary in range(self.block, n + 1, self.block):
            self._index[key[:boundary]] = key  # the newest prompt answers for a shared boundary
        self.stats.stored += 1

    def _evict(self) -> None:
        key, _ = self._entries.popitem(last=False)
        self.tokens -= len(key)
        self.stats.evicted += 1
        for boundary in range(self.block, len(key) + 1, self.block):
            if self._index.get(key[:boundary]) == key:
                del self._index[key[:boundary]]
                # another stored prompt may share this boundary: let it answer for it again
                for other in reversed(self._entries):
                    if len(other) >= boundary and other[:boundary] == key[:boundary]:
                        self._index[key[:boundary]] = other
                        break


def _truncated(cache: KVCache, n: int) -> KVCache:
    """The first `n` slots of a one-row text cache (views: the cache never writes in place)."""
    out = KVCache(len(cache.keys))
    out.keys = [k[:, :, :n] for k in cache.keys]
    out.values = [v[:, :, :n] for v in cache.values]
    if cache.key_valid is not None:
        out.key_valid = cache.key_valid[:, :n]
    if cache.document_ids is not None:
        out.document_ids = cache.document_ids[:, :n]
    out.next_position = torch.full((1,), n, dtype=torch.long, device=cache.keys[0].device)
    return out
