"""The paged KV cache (`ernie.paged_cache`): any mix of prompt chunks and decode steps laid end to end in one
forward gives each request the logits of the model run on that request alone, wherever its blocks are; shared
prefix blocks are counted once, and a cached block is only found under the tokens it holds."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from ernie.paged_cache import ROOT_SERIAL, BlockPool, PagedBatch, Segment

TOLERANCE = 1e-5  # fp32: the same sums in another order (a token's row among others in one matmul)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ErnieForCausalLM(get_preset("tiny_moe")).eval()


def alone(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0, -1]


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=5),
    block_size=st.integers(1, 8),
    chunk=st.integers(1, 12),
    decode_steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_chunked_prompts_and_decode_steps_in_one_forward_match_each_request_alone(
    model, lengths, block_size, chunk, decode_steps, seed
):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    total = sum(lengths) + len(lengths) * decode_steps
    pool = BlockPool.for_model(model, num_blocks=2 * total // block_size + 2 * len(lengths) + 1, block_size=block_size)
    free_at_start = pool.free_blocks
    # blocks handed out in a shuffled order: a request's blocks are anywhere in the pool
    pool._free = type(pool._free)(rng.sample(list(pool._free), len(pool._free)))
    tokens = [list(p) for p in prompts]
    done = [0] * len(prompts)
    blocks = [pool.allocate(pool.blocks_for(len(p) + decode_steps)) for p in prompts]
    steps_left = [decode_steps] * len(prompts)
    with torch.inference_mode():
        while any(steps_left):
            segments, ids, who = [], [], []
            budget = chunk
            for i, seq in enumerate(tokens):
                if done[i] >= len(prompts[i]) and steps_left[i]:  # decoding: its last token
                    segments.append(Segment(blocks[i], done[i], 1, done[i]))
                    ids.append(seq[done[i]])
                    who.append(i)
                elif done[i] < len(prompts[i]) and budget > 0:  # its prompt's next chunk
                    n = min(len(prompts[i]) - done[i], budget)
                    budget -= n
                    segments.append(Segment(blocks[i], done[i], n, done[i]))
                    ids.extend(seq[done[i] : done[i] + n])
                    who.append(i)
            batch = PagedBatch(pool, segments)
            logits = model(torch.tensor([ids]), cache=batch).logits[0]
            for row, (i, seg) in enumerate(zip(who, segments, strict=True)):
                done[i] += seg.new
                assert batch.next_positions[row] == done[i]
                if done[i] < len(prompts[i]):
                    continue  # a chunk short of the prompt's end: its logits are not used
                torch.testing.assert_close(logits[row], alone(model, tokens[i][: done[i]]), atol=TOLERANCE, rtol=0)
                tokens[i].append(int(logits[row].argmax()))
                steps_left[i] -= 1
    for b in blocks:
        pool.release(b)
    assert pool.free_blocks == free_at_start


def test_a_request_written_in_and_read_back_is_unchanged(model):
    pool = BlockPool.for_model(model, num_blocks=8, block_size=4)
    cfg = model.config
    keys = [torch.randn(cfg.num_kv_heads, 10, cfg.head_dim) for _ in range(cfg.num_layers)]
    values = [torch.randn(cfg.num_kv_heads, 10, cfg.head_dim) for _ in range(cfg.num_layers)]
    blocks = pool.allocate(3)[::-1]
    pool.write(blocks, 0, [k[:, :6] for k in keys], [v[:, :6] for v in values])
    pool.write(blocks, 6, [k[:, 6:] for k in keys], [v[:, 6:] for v in values])
    got_keys, got_values = pool.read(blocks, 10)
    for a, b in zip(got_keys + got_values, keys + values, strict=True):
        assert torch.equal(a, b)


def test_bad_requests_of_the_pool_and_the_batch_are_refused_by_name(model):
    pool = BlockPool.for_model(model, num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="4 free blocks, 5 were asked for"):
        pool.allocate(5)
    blocks = pool.allocate(2)
    with pytest.raises(ValueError, match="2 blocks of 4 slots cannot hold 6 \\+ 3 tokens"):
        PagedBatch(pool, [Segment(blocks, 6, 3, 6)])
    with pytest.raises(ValueError, match="at least one new token"):
        PagedBatch(pool, [Segment(blocks, 0, 0, 0)])
    with pytest.raises(ValueError, match="need their next_position"):
        PagedBatch(pool, [Segment(blocks, 0, 2), Segment(pool.allocate(1), 0, 1)])
    with pytest.raises(ValueError, match="takes input \\[1, 3\\], got \\[1, 2\\]"):
        model(torch.tensor([[5, 6]]), cache=PagedBatch(pool, [Segment(blocks, 0, 3, 0)]))
    with pytest.raises(ValueError, match="block_size >= 1"):
        BlockPool.for_model(model, num_blocks=4, block_size=0)


# ---------------------------------------------------------------------- prefix caching in the pool
def small_pool(num_blocks: int, block_size: int) -> BlockPool:
    """A pool whose one layer stores (token id, position) per slot: what a block holds is plain to check."""
    return BlockPool(1, 1, 2, num_blocks, block_size, torch.float32)


def fill(pool: BlockPool, blocks: list[int], ids: list[int]) -> None:
    rows = torch.tensor([[float(t), float(p)] for p, t in enumerate(ids)])[None]  # [Hkv, n, D]
    pool.write(blocks, 0, [rows], [rows])


def register_all(pool: BlockPool, blocks: list[int], ids: list[int]) -> None:
    serial, bs = ROOT_SERIAL, pool.block_size
    for i in range(len(ids) // bs):
        serial = pool.register(blocks[i], serial, ids[i * bs : (i + 1) * bs])


def test_shared_blocks_count_once_and_cached_ones_go_least_recently_released_first():
    pool = small_pool(num_blocks=6, block_size=4)
    ids = list(range(100, 112))
    first = pool.allocate(3)
    fill(pool, first, ids)
    register_all(pool, first, ids)
    pool.release(first)
    assert (pool.cached_blocks, pool.free_blocks, pool.used_blocks) == (3, 6, 0)
    assert pool.match(ids + [7], max_blocks=3) == first
    assert pool.match(ids, max_blocks=2) == first[:2]
    assert pool.match([100, 101, 102, 999] + ids[4:], max_blocks=3) == []  # a chain: the first block differs

    pool.share(first[:2])
    pool.share(first[:2])  # two requests on one prefix
    assert [pool.holders(b) for b in first] == [2, 2, 0] and pool.used_blocks == 2
    pool.release(first[:2])
    pool.release(first[:2])
    # released last block first: it is the least recent and goes first when empty blocks run out
    taken = pool.allocate(4)
    assert first[2] in taken and pool.evictions == 1
    assert pool.match(ids, max_blocks=3) == first[:2]
    with pytest.raises(ValueError, match="only full blocks"):
        pool.register(taken[0], ROOT_SERIAL, [1, 2])
    with pytest.raises(RuntimeError, match="released more often than it was held"):
        pool.release([taken[0], taken[0]])


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["run", "end"]), st.lists(st.integers(0, 2), min_size=1, max_size=14)),
        min_size=1,
        max_size=30,
    ),
    num_blocks=st.integers(2, 10),
    block_size=st.integers(1, 4),
)
def test_any_run_of_requests_keeps_the_pool_whole_and_its_matches_true(ops, num_blocks, block_size):
    """Requests over a three-token alphabet (so prefixes repeat) start (take their cached prefix, allocate the
    rest, write and register their tokens) and end in any order. A match only ever names blocks that hold the
    matched tokens at their positions; every block is free, cached or held, never two of them; all come back."""
    pool = small_pool(num_blocks, block_size)
    live: list[list[int]] = []
    for op, ids in ops:
        if op == "end":
            if live:
                pool.release(live.pop(0))
            continue
        hit = pool.match(ids, max_blocks=len(ids) // block_size)
        for i, block in enumerate(hit):
            stored = pool.keys[0][block, :, 0].tolist()
            assert stored == [
                [float(t), float(i * block_size + j)] for j, t in enumerate(ids[i * block_size :][:block_size])
            ]
        need = pool.blocks_for(len(ids)) - len(hit)
        if need + sum(pool.holders(b) == 0 for b in hit) > pool.free_blocks:
            continue  # it would wait for room
        pool.share(hit)
        blocks = hit + pool.allocate(need)
        fill(pool, blocks, ids)  # rewrites the shared blocks with the same contents
        register_all(pool, blocks, ids)
        live.append(blocks)
        held = sum(pool.holders(b) > 0 for b in range(num_blocks))
        assert held == pool.used_blocks and pool.free_blocks + pool.used_blocks == num_blocks
        assert not set(pool._free) & set(pool._cached)
    for blocks in live:
        pool.release(blocks)
    assert pool.free_blocks == num_blocks and all(pool.holders(b) == 0 for b in range(num_blocks))
