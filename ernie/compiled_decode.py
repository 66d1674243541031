"""A decode step as a function of tensors only, compiled once: what `torch.compile` needs to take a whole step.

    step = CompiledDecode(model, pool)                 # serve.compile_decode=true
    logits = step(tokens, positions, blocks, lengths)  # [B, V]: request b's next-token logits

A serving step where every request brings one token (a plain decode step) is the same computation whatever
the requests are; only the sizes change (rows B, blocks per row W). `PagedBatch` builds its indices in Python
per forward and branches on the mix of prompts and decode rows, which a compiler cannot follow; here the
per-step inputs are five tensors (ids, RoPE positions, write slots, block table, lengths) and the step is one
traced graph over the model's own layers (embedding, every decoder layer, the final norm and the LM head),
compiled with dynamic sizes, so the graph does not change with B or W. On a CPU inductor freezes the weights
into the graph (the linears' packed for oneDNN) and fuses the element-wise work between the matmuls; on a GPU
`mode="reduce-overhead"` replays it as CUDA graphs (rows and blocks are then padded to powers of two, so a few
graphs cover every step).

Padded rows read and write the pool's scratch block, which no request ever holds. The attention is the
decode group of `PagedBatch` (the g query heads of a KV head as g query rows over the gathered blocks, a
-inf bias past each row's length): the logits equal `PagedBatch`'s to rounding.
"""

from __future__ import annotations

import contextlib
import itertools
import types

import torch
import torch.nn.functional as F

from .moe import grouped_mm_runs
from .packed_linear import MIN_ELEMENTS, can_pack
from .paged_cache import BlockAttention, BlockPool
from .rope import rope_cos_sin


class _DecodeAttention(BlockAttention):
    """One decode step's attention over the pool, from tensors only (built inside the compiled step)."""

    def __init__(self, pool: BlockPool, slots_B, table_BW, bias_B11L) -> None:
        self.pool, self.slots_B, self.table_BW, self.bias_B11L = pool, slots_B, table_BW, bias_B11L

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _, H, B, D = q.shape
        Hkv = k.shape[1]
        self.pool.store(layer, self.slots_B, k, v)
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        bs = keys.shape[1]
        flat = self.table_BW.reshape(-1)
        W = self.table_BW.shape[1]
        k_BNLD = keys.index_select(0, flat).view(B, W * bs, Hkv, D).transpose(1, 2)
        v_BNLD = values.index_select(0, flat).view(B, W * bs, Hkv, D).transpose(1, 2)
        q_BNgD = q[0].transpose(0, 1).reshape(B, Hkv, H // Hkv, D)
        out = F.scaled_dot_product_attention(q_BNgD, k_BNLD, v_BNLD, attn_mask=self.bias_B11L)
        return out.reshape(1, B, H * D)


_instances = itertools.count()


def _bucket(n: int) -> int:
    """The power of two at least n: the sizes CUDA graphs are recorded for."""
    return 1 << max(n - 1, 0).bit_length()


def _worth_freezing(model) -> bool:
    """Whether a decoder linear is as large as `pack_weights` packs: freezing packs every linear for oneDNN, whose
    calls cost more than `F.linear`'s on small weights (the tiny models' compiled step was 1.3-2.5x slower frozen
    in bench/serve_load.py)."""
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return any(can_pack(w) and w.numel() >= MIN_ELEMENTS[w.dtype] for w in linears)


def _freezing():
    """Inductor's freezing switched on (its config imported here: a second of import for a CPU-only need)."""
    from torch._inductor import config

    return config.patch(freezing=True)


class CompiledDecode:
    """`model`'s decode step over `pool`, compiled by `warm_up` (else on first use). `mode`: torch.compile's;
    "reduce-overhead" (CUDA graphs) pads rows and blocks to powers of two. A VL model's decode tokens are text:
    they go to the text experts, as in `MoE` without a vision mask."""

    def __init__(self, model, pool: BlockPool, mode: str | None = None) -> None:
        self.model, self.pool = model, pool
        self.pad = mode == "reduce-overhead"
        if self.pad:  # CUDA graphs replay writes into the pool only if its tensors are known to stay where they are
            for t in (*pool.keys, *pool.values):
                torch._dynamo.mark_static_address(t)
        weight = model.model.embed_tokens.weight
        self.experts_impl = "grouped" if grouped_mm_runs(weight.dtype, weight.device, compiled=True) else "gather"
        """MoE layers: grouped GEMMs where they compile, else each slot's experts gathered (no routing-dependent
        shapes, so no graph break)."""
        # torch.compile keeps its graphs per code object, a few dozen at most: each step gets a code object of its
        # own, so engines in one process (other models, dtypes) do not crowd each other back to eager
        code = CompiledDecode._step.__code__
        self.step_code = code.replace(co_name=f"{code.co_name}_{next(_instances)}")
        step = types.FunctionType(self.step_code, CompiledDecode._step.__globals__, self.step_code.co_name)
        self._compiled = torch.compile(types.MethodType(step, self), dynamic=True, mode=mode)
        self.freeze = mode is None and _worth_freezing(model)
        """On a CPU, inductor's freezing: the weights become constants of the graph, the linears' packed once for
        oneDNN (as `serve.pack_weights` does for the eager forward) and the rest folded. A copy of the weights
        beside the model's own, which the paged forward still runs on. `torch.compile(options=...)` does not reach
        the switch in this torch, so it is patched around each call (a call may compile)."""

    def __call__(
        self, tokens: list[int], positions: list[int], blocks: list[list[int]], lengths: list[int]
    ) -> torch.Tensor:
        """Logits [B, V] of each request's next token. Request b feeds `tokens[b]` at RoPE position
        `positions[b]`; its cache is its `blocks[b]`, `lengths[b]` tokens long with this one (the caller made
        sure the blocks hold them)."""
        pool, bs = self.pool, self.pool.block_size
        B = len(tokens)
        width = max(2, *(pool.blocks_for(n) for n in lengths))  # a width of 1 would be a graph of its own
        rows, width = (_bucket(B), _bucket(width)) if self.pad else (B, width)
        scratch = pool.scratch_block
        table = pool.table(blocks, width) + [[scratch] * width] * (rows - B)
        slots = [pool.slot_list(b, n - 1, n)[0] for b, n in zip(blocks, lengths, strict=True)]
        pad = rows - B
        inputs = (tokens + [0] * pad, positions + [0] * pad, slots + [scratch * bs] * pad, table, lengths + [1] * pad)
        device = pool.keys[0].device
        if self.pad:  # a new step: the last replay's outputs are done with, its buffers may be reused
            torch.compiler.cudagraph_mark_step_begin()
        tensors = [torch.tensor(x, dtype=torch.long, device=device) for x in inputs]
        with _freezing() if self.freeze else contextlib.nullcontext():
            return self._compiled(*tensors)[:B]

    def warm_up(self) -> None:
        """Compile now, for one row and for several (a size of 1 is a graph of its own), on padded rows only:
        nothing but the scratch block is read or written."""
        scratch, bs = self.pool.scratch_block, self.pool.block_size
        # sizes unlike any other (rows 3, width 5): a compiler would tie equal sizes together into one symbol
        for rows in (1, 3):
            self([0] * rows, [0] * rows, [[scratch] * 5] * rows, [4 * bs + 1] * rows)

    def _step(self, ids_B, positions_B, slots_B, table_BW, lengths_B) -> torch.Tensor:
        model, pool = self.model, self.pool
        x = model.model.embed_tokens(ids_B)[None]  # [1, B, hidden]: the requests' tokens side by side
        cos_sin = rope_cos_sin(positions_B[None], model.rope_inv_freq, model.rope_axes)
        span = table_BW.shape[1] * pool.block_size
        seen = torch.arange(span, device=ids_B.device)[None, :] < lengths_B[:, None]
        bias = torch.zeros(seen.shape, dtype=x.dtype, device=x.device).masked_fill(~seen, float("-inf"))
        attention = _DecodeAttention(pool, slots_B, table_BW, bias[:, None, None, :])
        for layer in model.model.layers:
            x, _ = layer(x, cos_sin, None, attention, None, self.experts_impl)
        return model.lm_head(model.model.norm(x)[0])
