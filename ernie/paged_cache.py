"""Paged KV cache for serving: fixed blocks of token slots shared by every request, and one forward's view of them.

    pool = BlockPool.for_model(model, num_blocks=4096, block_size=16)
    blocks = pool.allocate(pool.blocks_for(len(prompt)))
    batch = PagedBatch(pool, [Segment(blocks, past=0, new=len(prompt))])
    logits = model(torch.tensor([prompt]), cache=batch).logits    # [1, segments, vocab]: each one's last token

A request's keys and values live in its own blocks wherever they are in the pool, so requests join and
leave a running batch without moving anyone else's cache (the contiguous `KVCache` copies the whole batch
then), and memory is counted in blocks, not in rows padded to the longest one.

One forward serves any mix of requests: their new tokens are laid end to end in one row ([1, T]), so the
projections, MLPs and the LM head run once over all of them (a decode step's one token per request and a
prompt's chunk alike: chunked prefill), and only attention looks at which request a token belongs to.
The one-token segments (decode) attend in one batched call over their blocks, gathered into a reused
workspace; each longer segment (a prompt or a prompt's chunk) attends causally on its own.

Prefix caching lives in the pool too: a full block whose keys and values a request computed can be registered
under its token ids (chained to the blocks before it), and a later request whose tokens start the same way
shares those blocks instead of computing them again (`match`, `share`). Blocks are reference counted; a
registered block nobody holds any more keeps its contents until an allocation needs the room (least recently
released first), so the cache costs no memory of its own.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROOT_SERIAL = 0
"""The chain every sequence's first block hangs on."""


class BlockPool:
    """Per layer, keys and values of `num_blocks` blocks of `block_size` token slots, and which blocks are free.

    The memory is zeroed once: a slot no request owns still holds finite numbers, so attention may read it
    under a mask (a masked NaN would still poison the softmax)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a block pool needs num_blocks >= 1 (got {num_blocks}) and block_size >= 1 (got {block_size})"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block = num_blocks
        """One block past the others that no request ever holds: padded rows of a decode step write and read it."""
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free: deque[int] = deque(range(num_blocks))
        """Blocks nobody holds and whose contents nobody can ask for."""
        self._refs = [0] * num_blocks
        """Requests holding each block (a shared prefix block: several)."""
        self._cached: OrderedDict[int, None] = OrderedDict()
        """Registered blocks nobody holds: reusable until evicted, least recently released first."""
        self._key_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        self._block_of: dict[tuple[int, tuple[int, ...]], int] = {}
        """A registered block's key: (the serial of the block before it, or ROOT_SERIAL; its token ids)."""
        self._serial_of: dict[int, int] = {}
        """A registered block's serial: never reused, so a key cannot point past an evicted block."""
        self._next_serial = ROOT_SERIAL + 1
        self.evictions = 0
        self._workspace: list[torch.Tensor] = []
        """Two buffers of blocks (keys, values) the decode gather writes into, reused by every layer and step."""

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> BlockPool:
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, num_blocks, block_size, weight.dtype, weight.device)

    # ------------------------------------------------------------------ blocks
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take: the empty ones and the cached ones nobody holds."""
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        """Blocks requests hold."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Registered blocks nobody holds: prefix cache kept in otherwise free room."""
        return len(self._cached)

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one request: empty ones first, then cached ones, least recently released first."""
        if count > self.free_blocks:
            raise RuntimeError(f"the KV block pool has {self.free_blocks} free blocks, {count} were asked for")
        out = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._cached.popitem(last=False)
                self._forget(block)
                self.evictions += 1
            self._refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: list[int]) -> None:
        """A request lets go of its blocks. Its last blocks go first, so they are evicted before its first
        ones (which more prompts share)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise RuntimeError(f"KV block {block} was released more often than it was held")
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    self._free.append(block)

    def holders(self, block: int) -> int:
        return self._refs[block]

    # ------------------------------------------------------------------ prefix caching
    def match(self, token_ids: list[int], max_blocks: int) -> list[int]:
        """The registered blocks holding the first tokens of `token_ids`, whole blocks in a chain, at most
        `max_blocks` (not taken: see `share`)."""
        bs, found, parent = self.block_size, [], ROOT_SERIAL
        for i in range(min(max_blocks, len(token_ids) // bs)):
            block = self._block_of.get((parent, tuple(token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            found.append(block)
            parent = self._serial_of[block]
        return found

    def share(self, blocks: list[int]) -> None:
        """Hold matched blocks for one more request (a cached one is no longer evictable)."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._cached[block]
            self._refs[block] += 1

    def register(self, block: int, parent: int, token_ids: list[int]) -> int:
        """Note that `block`, full, holds the keys and values of `token_ids` following the block of serial
        `parent` (ROOT_SERIAL: the sequence's start). Returns the serial the next block chains on; when these
        contents are registered already (another request computed them), that block's serial."""
        if len(token_ids) != self.block_size:
            raise ValueError(f"only full blocks are registered ({len(token_ids)} ids for {self.block_size} slots)")
        key = (parent, tuple(token_ids))
        known = self._block_of.get(key)
        if known is not None:
            return self._serial_of[known]
        if block in self._key_of:
            raise ValueError(f"KV block {block} is registered already")
        serial, self._next_serial = self._next_serial, self._next_serial + 1
        self._key_of[block], self._block_of[key], self._serial_of[block] = key, block, serial
        return serial

    def serial(self, block: int) -> int:
        """A registered block's serial (what the block after it chains on)."""
        return self._serial_of[block]

    def _forget(self, block: int) -> None:
        del self._block_of[self._key_of.pop(block)]
        del self._serial_of[block]

    def slot_list(self, blocks: list[int], start: int, stop: int) -> list[int]:
        """Flat slot indices (block * block_size + offset) of token positions [start, stop) of a request. Plain
        Python: per-request tensor ops would cost more than a small model's decode step."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    def table(self, blocks: list[list[int]], width: int) -> list[list[int]]:
        """Each request's first `width` blocks, a short row repeating its first block (read under a mask past the
        request's length, never seen): the block table of a batched decode step."""
        return [b[:width] + [b[0]] * (width - len(b[:width])) for b in blocks]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """A layer's new keys/values [1, Hkv, T, D] into the flat slots [T] of its pool."""
        self._flat(self.keys[layer]).index_copy_(0, slots, k[0].transpose(0, 1))
        self._flat(self.values[layer]).index_copy_(0, slots, v[0].transpose(0, 1))

    def slots(self, blocks: list[int], start: int, stop: int) -> torch.Tensor:
        return torch.tensor(self.slot_list(blocks, start, stop), dtype=torch.long, device=self.keys[0].device)

    # ------------------------------------------------------------------ moving a request's cache in and out
    def write(self, blocks: list[int], start: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Store per-layer [Hkv, n, D] keys/values at positions [start, start + n) of the request owning `blocks`."""
        n = keys[0].shape[1]
        slots = self.slots(blocks, start, start + n)
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self._flat(self.keys[layer]).index_copy_(0, slots, k.transpose(0, 1).to(self.keys[layer].dtype))
            self._flat(self.values[layer]).index_copy_(0, slots, v.transpose(0, 1).to(self.values[layer].dtype))

    def read(self, blocks: list[int], length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [Hkv, length, D] keys/values of a request's first `length` positions (a copy)."""
        slots = self.slots(blocks, 0, length)
        keys = [self._flat(k).index_select(0, slots).transpose(0, 1).contiguous() for k in self.keys]
        values = [self._flat(v).index_select(0, slots).transpose(0, 1).contiguous() for v in self.values]
        return keys, values

    @staticmethod
    def _flat(pool: torch.Tensor) -> torch.Tensor:
        return pool.view(-1, *pool.shape[2:])

    def _gather(self, layer: int, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the blocks in `table` [B, nb], as [B, Hkv, nb * block_size, D] views of the workspace."""
        B, nb = table.shape
        need = B * nb
        if not self._workspace or self._workspace[0].shape[0] < need:
            shape = (max(need, 2 * self._workspace[0].shape[0] if self._workspace else need), *self.keys[0].shape[1:])
            self._workspace = [self.keys[0].new_empty(shape), self.keys[0].new_empty(shape)]
        flat = table.reshape(-1)
        out = []
        for pool, ws in ((self.keys[layer], self._workspace[0]), (self.values[layer], self._workspace[1])):
            gathered = torch.index_select(pool, 0, flat, out=ws[:need])
            out.append(gathered.view(B, nb * self.block_size, *pool.shape[2:]).transpose(1, 2))
        return out[0], out[1]


class BlockAttention:
    """A forward's attention over a `BlockPool`, what the model's attention layers call instead of attending
    themselves: `PagedBatch` (any mix of prompts and decode steps) and `ernie.compiled_decode`'s decode step."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this layer's new keys/values, then attention of every new token over its own request's cache:
        q [1, H, T, D], k / v [1, Hkv, T, D] -> [1, T, H * D]."""
        raise NotImplementedError


@dataclass
class Segment:
    """One request's part of a forward: its new tokens, after the `past` ones already in its blocks."""

    blocks: list[int]
    """The request's blocks, enough for past + new tokens."""
    past: int
    new: int
    next_position: int | None = None
    """RoPE position of its first new token; None for a prompt starting from scratch: the model's own positions
    (a VL prompt's 3D ones; plain text counts tokens). Several segments all need it."""


class PagedBatch(BlockAttention):
    """One forward over a `BlockPool`: what the model takes as `cache` (see the module docstring).

    Built once per forward and shared by the layers (slot indices, the decode group's block table and mask);
    each layer's `attend` stores its new keys/values and attends. After the forward, `next_positions` holds
    each segment's position to continue from."""

    def __init__(self, pool: BlockPool, segments: list[Segment]) -> None:
        if not segments:
            raise ValueError("a paged batch needs at least one segment")
        if len(segments) > 1 and any(s.next_position is None for s in segments):
            raise ValueError(
                "segments of a batched forward need their next_position (the model's positions are per row)"
            )
        self.pool, self.segments = pool, segments
        device = pool.keys[0].device
        bs = pool.block_size
        # index lists built in Python and made tensors once: per-segment tensor ops would cost more than a
        # small model's decode step
        starts, slots, positions, offset = [], [], [], 0
        for s in segments:
            if s.new < 1:
                raise ValueError(f"a segment must bring at least one new token (got {s.new})")
            if len(s.blocks) * bs < s.past + s.new:
                raise ValueError(f"{len(s.blocks)} blocks of {bs} slots cannot hold {s.past} + {s.new} tokens")
            starts.append(offset)
            offset += s.new
            slots += pool.slot_list(s.blocks, s.past, s.past + s.new)
            if s.next_position is not None:
                positions += range(s.next_position, s.next_position + s.new)
        self.tokens = offset
        self._starts = starts
        self.write_slots = torch.tensor(slots, device=device)
        self.logit_index = torch.tensor([a + s.new - 1 for a, s in zip(starts, segments, strict=True)], device=device)
        self.position_ids = torch.tensor([positions], device=device) if positions else None
        self.next_positions: list[int] | None = None

        # one-token segments (decode steps) attend together over a padded table of their blocks
        self._decode = [i for i, s in enumerate(segments) if s.new == 1]
        self._decode_tokens = torch.tensor([starts[i] for i in self._decode], dtype=torch.long, device=device)
        if self._decode:
            lengths = [segments[i].past + 1 for i in self._decode]
            width = pool.blocks_for(max(lengths))
            # short rows repeat their first block: read under the mask, never seen
            self._table = torch.tensor(pool.table([segments[i].blocks for i in self._decode], width), device=device)
            self._bias = None
            if min(lengths) < width * bs:
                seen = torch.arange(width * bs, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
                bias = torch.zeros(seen.shape, dtype=pool.keys[0].dtype, device=device)
                self._bias = bias.masked_fill_(~seen, float("-inf"))[:, None, None, :]
        self._longer = [i for i, s in enumerate(segments) if s.new > 1]
        # a chunk after earlier ones reads its whole request back: its slots and causal mask, made once for all layers
        self._reads = {}
        for i in self._longer:
            s = segments[i]
            if s.past:
                seen = (
                    torch.arange(s.past + s.new, device=device)[None, :]
                    <= torch.arange(s.past, s.past + s.new, device=device)[:, None]
                )
                self._reads[i] = (pool.slots(s.blocks, 0, s.past + s.new), seen)

    # the attributes the model reads of any cache
    next_position = None
    key_valid = None
    document_ids = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this layer's new keys/values, then attention of every new token over its own request's cache.

        q [1, H, T, D], k / v [1, Hkv, T, D] -> [1, T, H * D]."""
        _, H, T, D = q.shape
        Hkv = k.shape[1]
        pool = self.pool
        pool.store(layer, self.write_slots, k, v)
        k_pool, v_pool = pool._flat(pool.keys[layer]), pool._flat(pool.values[layer])
        out = q.new_empty(T, H * D) if self._longer else None
        if self._decode:
            B = len(self._decode)
            only_decode = B == T  # a plain decode step: token i is request i's, no picking needed
            q_dec = q[0] if only_decode else q[0].index_select(1, self._decode_tokens)
            # the g query heads of a KV head are g query rows of it: one SDPA call, no per-head copy of K/V
            q_dec = q_dec.transpose(0, 1).reshape(B, Hkv, H // Hkv, D)
            keys, values = pool._gather(layer, self._table)
            att = F.scaled_dot_product_attention(q_dec, keys, values, attn_mask=self._bias).reshape(B, H * D)
            if only_decode:
                return att[None]
            out.index_copy_(0, self._decode_tokens, att)
        gqa = H != Hkv
        for i in self._longer:
            seg, a = self.segments[i], self._starts[i]
            q_seg = q[:, :, a : a + seg.new]
            if not seg.past:
                att = F.scaled_dot_product_attention(
                    q_seg, k[:, :, a : a + seg.new], v[:, :, a : a + seg.new], is_causal=True, enable_gqa=gqa
                )
            else:
                slots, seen = self._reads[i]
                keys = k_pool.index_select(0, slots).transpose(0, 1)[None]
                values = v_pool.index_select(0, slots).transpose(0, 1)[None]
                att = F.scaled_dot_product_attention(q_seg, keys, values, attn_mask=seen, enable_gqa=gqa)
            out[a : a + seg.new] = att[0].transpose(0, 1).reshape(seg.new, H * D)
        return out[None]

    def finish(self, position_ids: torch.Tensor) -> None:
        """Note where each segment's positions go on (for 3D positions, from their largest axis)."""
        flat = position_ids if position_ids.dim() == 2 else position_ids.amax(dim=0)
        self.next_positions = (flat[0, self.logit_index] + 1).tolist()
