"""The compiled decode step (`serve.compile_decode`, `ernie.compiled_decode`): one torch.compile graph over every
layer, fed by tensors only. Its logits equal the paged forward's to rounding whatever the rows and their blocks,
padded rows touch only the scratch block, and an engine that decodes through it serves exactly the model's own
greedy decode. One engine for the module: compiling takes seconds."""

from __future__ import annotations

import random
import time

import pytest
import torch
from served_app import varied_model
from serving_requests import greedy_reference, greedy_requests, run_concurrently

from ernie import ErnieForCausalLM, get_preset
from ernie.compiled_decode import CompiledDecode
from ernie.packed_linear import can_pack
from ernie.paged_cache import PagedBatch, Segment
from stages.data.tokenizer import train_tokenizer
from stages.serve.engine import Engine
from stages.serve.metrics import ServeMetrics
from stages.serve.scheduler import SamplingParams


@pytest.fixture(scope="module")
def engine():
    tokenizer = train_tokenizer(["how many red squares are there", "two", "three", "1+2=3"] * 30, 300)
    engine = Engine(varied_model("tiny_moe"), tokenizer, kv_cache_tokens=4096, max_batch=8, compile_decode=True)
    yield engine
    engine.close()


def test_an_engine_decoding_through_the_compiled_step_serves_the_models_own_greedy_decode(engine):
    requests = greedy_requests([12, 5, 30, 9, 1, 20, 40], seed=3)
    expected = [greedy_reference(engine.model, p, params.max_tokens) for p, params in requests]
    alone = [list(engine.scheduler.submit(*r).tokens()) for r in requests[:2]]
    together = run_concurrently(engine, requests)
    assert together == expected and alone == expected[:2]
    stats = engine.scheduler.stats
    assert stats.max_batch > 1 and stats.compiled_steps > 0
    scraped = ServeMetrics(engine.scheduler).expose()[0].decode()
    assert f'ernie_serve_compiled_decode_steps{{role="colocated"}} {float(stats.compiled_steps)}' in scraped
    assert f'ernie_serve_decode_steps{{role="colocated"}} {float(stats.decode_steps)}' in scraped


def test_a_prompt_arriving_mid_decode_rides_a_paged_step_and_the_compiled_steps_go_on(engine):
    """A step that carries a prompt chunk runs the paged forward; the plain steps around it the compiled one."""
    requests = greedy_requests([40] * 8, seed=5)
    expected = [greedy_reference(engine.model, p, params.max_tokens) for p, params in requests]
    first = max(range(len(requests)), key=lambda i: len(expected[i]))
    second = min(range(len(requests)), key=lambda i: len(expected[i]) if i != first else 99)
    assert len(expected[first]) > 10
    stats = engine.scheduler.stats
    steps, compiled = stats.decode_steps, stats.compiled_steps
    tokens = engine.scheduler.submit(*requests[first]).tokens()
    head = [next(tokens) for _ in range(5)]  # decoding now
    assert list(engine.scheduler.submit(*requests[second]).tokens()) == expected[second]
    assert head + list(tokens) == expected[first]
    paged = (stats.decode_steps - steps) - (stats.compiled_steps - compiled)
    assert paged >= 1 and stats.compiled_steps - compiled >= len(expected[first]) - 1 - paged


def test_prompts_waiting_for_each_other_leave_more_steps_to_the_compiled_step(engine, monkeypatch):
    """serve.prompt_wait_steps: newcomers to a running batch gather before they run, and the greedy tokens stay the
    model's own. Five requests sent one after another while an earlier one decodes take a paged forward each
    without a wait, and share fewer with a wait of 6 steps."""
    requests = greedy_requests([40] * 6, seed=9)
    expected = [greedy_reference(engine.model, p, params.max_tokens) for p, params in requests]
    longest = max(range(len(requests)), key=lambda i: len(expected[i]))
    others = [r for i, r in enumerate(requests) if i != longest]
    paged = {}
    for wait in (0, 6):
        monkeypatch.setattr(engine.scheduler, "prompt_wait_steps", wait)
        stats = engine.scheduler.stats
        steps, compiled = stats.decode_steps, stats.compiled_steps
        tokens = engine.scheduler.submit(*requests[longest]).tokens()
        head = [next(tokens)]  # decoding now
        sent = []
        for request in others:  # the next newcomer once the last is admitted: one a step at most
            sent.append(engine.scheduler.submit(*request))
            while sent[-1].next_position is None:
                time.sleep(0.0005)
        assert [list(seq.tokens()) for seq in sent] == [e for i, e in enumerate(expected) if i != longest]
        assert head + list(tokens) == expected[longest]
        paged[wait] = (stats.decode_steps - steps) - (stats.compiled_steps - compiled)
    assert len(expected[longest]) > len(others) + 6
    assert paged[0] == len(others) and paged[6] < paged[0], paged


@pytest.mark.parametrize("seed", range(4))
def test_compiled_step_logits_equal_the_paged_forward_and_padding_writes_only_the_scratch_block(engine, seed):
    scheduler = engine.scheduler
    pool, model, compiled = scheduler.pool, scheduler.model, scheduler.compiled
    rng = random.Random(seed)
    rows = rng.choice([1, 2, 3, 7])
    lengths = [rng.randint(1, 70) for _ in range(rows)]
    blocks = [pool.allocate(pool.blocks_for(n + 1)) for n in lengths]
    for bl in blocks:
        rng.shuffle(bl)  # wherever a request's blocks lie in the pool
    try:
        with torch.inference_mode():
            for bl, n in zip(blocks, lengths, strict=True):  # each request's cache, from a prefill of its own
                model(torch.randint(11, 300, (1, n)), cache=PagedBatch(pool, [Segment(bl, 0, n, 0)]))
            tokens = [rng.randrange(11, 300) for _ in range(rows)]
            before = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values, strict=True)]
            segments = [Segment(bl, n, 1, n) for bl, n in zip(blocks, lengths, strict=True)]
            expected = model(torch.tensor([tokens]), cache=PagedBatch(pool, segments)).logits[0]
            paged_pool = [(k.clone(), v.clone()) for k, v in zip(pool.keys, pool.values, strict=True)]
            for (k, v), (k0, v0) in zip(zip(pool.keys, pool.values, strict=True), before, strict=True):
                k.copy_(k0)
                v.copy_(v0)
            got = compiled(tokens, lengths, blocks, [n + 1 for n in lengths])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        scratch = pool.scratch_block
        for (k, v), (pk, pv) in zip(zip(pool.keys, pool.values, strict=True), paged_pool, strict=True):
            # every request's slots hold what the paged forward wrote; only the scratch block may differ
            torch.testing.assert_close(k[:scratch], pk[:scratch], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v[:scratch], pv[:scratch], rtol=1e-5, atol=1e-5)
    finally:
        for bl in blocks:
            pool.release(bl)


def test_the_cuda_graph_mode_pads_rows_and_blocks_to_powers_of_two_and_gives_the_same_logits(engine):
    """mode="reduce-overhead" (what a GPU replica uses): rows and block tables padded to powers of two, padded rows
    on the scratch block. On a CPU no graph is captured, but the padded step runs as it would on a GPU."""
    scheduler = engine.scheduler
    pool, model = scheduler.pool, scheduler.model
    padded = CompiledDecode(model, pool, mode="reduce-overhead")
    lengths = [3, 40, 17]  # 3 rows -> 4; 3 blocks at most -> 4
    blocks = [pool.allocate(pool.blocks_for(n + 1)) for n in lengths]
    try:
        with torch.inference_mode():
            for bl, n in zip(blocks, lengths, strict=True):
                model(torch.randint(11, 300, (1, n)), cache=PagedBatch(pool, [Segment(bl, 0, n, 0)]))
            tokens = [50, 60, 70]
            expected = scheduler.compiled(tokens, lengths, blocks, [n + 1 for n in lengths])
            got = padded(tokens, lengths, blocks, [n + 1 for n in lengths])
        assert got.shape == expected.shape == (3, model.config.vocab_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # each step compiles its own graphs (torch.compile caches per code object, a few dozen at most)
        assert padded.step_code is not scheduler.compiled.step_code
    finally:
        for bl in blocks:
            pool.release(bl)


def test_the_scratch_block_is_never_handed_to_a_request(engine):
    pool = engine.scheduler.pool
    taken = pool.allocate(pool.free_blocks)
    try:
        assert pool.scratch_block not in taken and pool.scratch_block == pool.num_blocks
        assert pool.keys[0].shape[0] == pool.num_blocks + 1
    finally:
        pool.release(taken)


def test_sampled_requests_decode_through_the_compiled_step_as_they_do_through_the_paged_forward(engine):
    """Seeded sampling draws from the compiled step's logits exactly as from the paged forward's."""
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=11)
    prompt = [40, 41, 42, 43]
    plain = Engine(engine.model, engine.tokenizer, kv_cache_tokens=4096, max_batch=8)
    try:
        assert list(engine.scheduler.submit(prompt, params).tokens()) == list(
            plain.scheduler.submit(prompt, params).tokens()
        )
    finally:
        plain.close()


def test_a_decode_step_that_cannot_compile_fails_the_engine_before_it_takes_a_request(engine, monkeypatch):
    def broken(self):
        raise OSError("no C++ compiler")

    monkeypatch.setattr(CompiledDecode, "warm_up", broken)
    with pytest.raises(RuntimeError, match=r"serve.compile_decode.*no C\+\+ compiler"):
        Engine(engine.model, engine.tokenizer, kv_cache_tokens=1024, max_batch=2, compile_decode=True)


def test_a_model_wide_enough_to_pack_decodes_through_a_frozen_step_as_through_the_paged_forward():
    """Weights as large as `serve.pack_weights` packs (bf16, 256 x 256): on a CPU whose oneDNN runs bf16 the step is
    compiled with inductor's freezing (the weights folded into the graph, the linears packed for oneDNN). Its logits
    follow the paged forward's over a whole greedy decode, whose every step but the prompt's ran compiled; the tiny
    models, whose weights are smaller, are compiled without it (freezing made their step slower)."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_dense").replace(hidden_size=256, head_dim=64, intermediate_size=512))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    model = model.to(torch.bfloat16).eval()
    tokenizer = train_tokenizer(["one two three four", "five six"] * 30, 300)
    engine = Engine(model, tokenizer, kv_cache_tokens=1024, max_batch=4, compile_decode=True)
    try:
        compiled = engine.scheduler.compiled
        # frozen where this CPU's oneDNN runs bf16 linears (AVX-512 BF16 / AMX), else compiled as the tiny models are
        assert compiled.freeze == can_pack(model.lm_head.weight)
        assert not CompiledDecode(varied_model("tiny_dense"), engine.scheduler.pool).freeze
        prompt, params = [40, 41, 42, 43, 44], SamplingParams(max_tokens=12, temperature=0.0)
        got = list(engine.scheduler.submit(prompt, params).tokens())
        assert engine.scheduler.stats.compiled_steps == len(got) - 1
        # the paged forward's logits at every step of that decode: the served token is (one of) their best
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + got[:-1]])).logits[0, len(prompt) - 1 :].float()
        best = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(got)[:, None])[:, 0]
        assert (best - chosen <= 0.05 * best.abs().clamp(min=1.0)).all(), (best - chosen).tolist()
    finally:
        engine.close()
