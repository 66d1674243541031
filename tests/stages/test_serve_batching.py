"""Continuous batching in the serving engine (no Ray): requests decoded together give exactly what
each gets alone and what `ernie.generation.generate` gives, newcomers join a running batch, seeded
sampling does not depend on the batch, the KV budget holds under load, and a closed stream frees
its rows."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from served_app import varied_model
from serving_requests import EOS, greedy_reference, greedy_requests, prompts, run_concurrently

from ernie.generation import generate
from stages.data.tokenizer import train_tokenizer
from stages.serve.engine import Engine, RequestError
from stages.serve.scheduler import SamplingParams, Scheduler, Sequence, sample_rows


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["how many red squares are there", "two", "three", "a blue circle", "1+2=3"] * 30, 300)


@pytest.fixture
def make_engine(tokenizer):
    engines = []

    def make(model=None, **scheduling) -> Engine:
        engines.append(Engine(model if model is not None else varied_model(), tokenizer, **scheduling))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def test_concurrent_greedy_requests_get_exactly_their_own_greedy_decode(make_engine):
    engine = make_engine()
    requests = greedy_requests([12, 5, 30, 9, 1, 20], seed=0)
    expected = [greedy_reference(engine.model, p, params.max_tokens) for p, params in requests]
    alone = [list(engine.scheduler.submit(*r).tokens()) for r in requests]
    together = run_concurrently(engine, requests)
    assert together == alone == expected
    assert engine.scheduler.stats.max_batch > 1
    # the engine's own API on top: text and token counts of each concurrent completion
    texts: list = [None] * len(requests)

    def complete(i: int) -> None:
        texts[i] = engine.complete(requests[i][0], requests[i][1].max_tokens, temperature=0.0)

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for completion, tokens in zip(texts, expected, strict=True):
        assert completion.completion_tokens == len(tokens)
        assert completion.text == engine.decode([t for t in tokens if t != EOS])


def test_a_request_arriving_mid_decode_joins_the_running_batch(make_engine):
    engine = make_engine(varied_model(eos=False))
    long_prompt, short_prompt = prompts(2, seed=1)
    long_expected = greedy_reference(engine.model, long_prompt, 80)
    short_expected = greedy_reference(engine.model, short_prompt, 10)
    assert len(long_expected) == 80
    first = engine.scheduler.submit(long_prompt, SamplingParams(max_tokens=80, temperature=0.0))
    tokens = first.tokens()
    head = [next(tokens) for _ in range(5)]  # it is decoding now
    second = engine.scheduler.submit(short_prompt, SamplingParams(max_tokens=10, temperature=0.0))
    assert list(second.tokens()) == short_expected
    assert head + list(tokens) == long_expected
    assert engine.scheduler.stats.max_batch == 2
    # the newcomer's tokens came from decode steps that also served the running request
    assert first.steps[0] < second.steps[0] and second.steps[-1] < first.steps[-1]
    assert set(second.steps[1:]) <= set(first.steps)


def test_seeded_sampling_is_the_same_batched_or_alone(make_engine):
    engine = make_engine()
    sampled = [
        SamplingParams(max_tokens=12, temperature=1.0, seed=7),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7),
        SamplingParams(max_tokens=15, temperature=1.2, top_k=5, seed=123),
        SamplingParams(max_tokens=7, temperature=0.0),
    ]
    requests = list(zip(prompts(4, seed=2), sampled, strict=True))
    alone = [list(engine.scheduler.submit(*r).tokens()) for r in requests]
    assert run_concurrently(engine, requests) == alone
    assert engine.scheduler.stats.max_batch > 1
    # the same draws as `generate` seeded alike (top-k is the engine's own; generate has none)
    for (prompt, params), tokens in zip(requests[:2], alone[:2], strict=True):
        new = generate(
            engine.model,
            torch.tensor([prompt]),
            params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
        )[0].tolist()
        assert tokens == (new[: new.index(EOS) + 1] if EOS in new else new)


def test_top_k_draws_only_among_the_k_most_likely_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    seq = Sequence([5], SamplingParams(max_tokens=200, temperature=1.0, top_k=2, seed=0), None, EOS)
    assert {sample_rows(logits, [seq])[0] for _ in range(200)} == {0, 1}


def test_kv_budget_holds_under_load_and_queued_requests_complete(make_engine):
    budget = 80
    engine = make_engine(kv_cache_tokens=budget, max_batch=8)
    requests = greedy_requests([14, 6, 20, 14, 6, 20, 14, 6], seed=3)
    assert all(len(p) + r.max_tokens <= budget for p, r in requests)
    results = run_concurrently(engine, requests)
    assert results == [greedy_reference(engine.model, p, r.max_tokens) for p, r in requests]
    stats = engine.scheduler.stats
    assert stats.max_cached_tokens <= budget  # prefills and padding included
    assert 2 <= stats.max_batch < len(requests)  # some ran together, others waited in the queue
    with pytest.raises(RequestError, match="KV cache budget"):
        engine.complete([5] * 70, max_tokens=11)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 30), st.integers(1, 20), st.integers(1, 30)), min_size=1, max_size=10),
    st.integers(4, 16),
    st.integers(1, 24),
    st.integers(0, 2),
    st.booleans(),
)
def test_the_block_pool_never_overflows_and_frees_every_block(requests, block_tokens, chunk, spare, caching):
    """Any mix of prompts (some sharing prefixes), max_tokens, block and chunk sizes under a budget of one to three
    requests' longest: blocks are taken as requests grow, the latest requests are preempted when the pool runs
    short and computed again, yet every request ends with its own greedy tokens (long prompts run in chunks), the
    pool never holds more than its blocks, and every block comes back."""
    model = varied_model(eos=False)
    longest = max(shared + own + m for shared, own, m in requests)
    budget = longest * (1 + spare)
    scheduler = Scheduler(
        model,
        kv_cache_tokens=budget,
        max_batch=4,
        prefix_caching=caching,
        block_tokens=block_tokens,
        prefill_chunk_tokens=chunk,
    )
    rng = random.Random(len(requests))
    base = [rng.randrange(3, 250) for _ in range(30)]
    seqs = [
        scheduler.submit(
            base[:shared] + [rng.randrange(3, 250) for _ in range(own)], SamplingParams(m, temperature=0.0)
        )
        for shared, own, m in requests
    ]
    outs = [list(seq.tokens()) for seq in seqs]
    scheduler.close()
    for seq, out in zip(seqs, outs, strict=True):
        assert out == greedy_reference(model, seq.prompt_ids, seq.params.max_tokens)
    assert scheduler.stats.max_cached_tokens <= scheduler.pool.num_blocks * block_tokens
    assert scheduler.pool.free_blocks == scheduler.pool.num_blocks
    assert all(scheduler.pool.holders(b) == 0 for b in range(scheduler.pool.num_blocks))


def test_a_short_pool_preempts_the_latest_request_which_resumes_where_it_was(make_engine):
    """Three long requests in a pool that holds one at its longest: all are admitted (their prompts fit), the
    pool runs short as they grow, the latest ones give their blocks back and are computed again later. Greedy
    ones get their own greedy decode, and a seeded sampled one draws the very tokens it draws alone: its
    generator is not touched by the preemption, and nothing it sent is sent again."""
    model = varied_model(eos=False)
    prompt_a, prompt_b, prompt_c = prompts(3, seed=11)
    sampled = SamplingParams(max_tokens=60, temperature=1.0, top_p=0.9, seed=7)
    alone = make_engine(model)
    expected_c = list(alone.scheduler.submit(prompt_c, sampled).tokens())
    engine = make_engine(model, kv_cache_tokens=96, kv_block_tokens=8, prefix_caching=False)
    requests = [
        (prompt_a, SamplingParams(max_tokens=60, temperature=0.0)),
        (prompt_b, SamplingParams(max_tokens=60, temperature=0.0)),
        (prompt_c, sampled),
    ]
    assert all(len(p) + 60 <= 96 for p, _ in requests)
    got = run_concurrently(engine, requests)
    assert got[0] == greedy_reference(model, prompt_a, 60)
    assert got[1] == greedy_reference(model, prompt_b, 60)
    assert got[2] == expected_c
    stats = engine.scheduler.stats
    assert stats.preemptions >= 1 and stats.max_batch >= 2
    assert stats.max_cached_tokens <= 96
    from stages.serve.metrics import ServeMetrics

    scraped = ServeMetrics(engine.scheduler).expose()[0].decode()
    assert f'ernie_serve_preemptions{{role="colocated"}} {float(stats.preemptions)}' in scraped


def test_closing_a_stream_cancels_its_sequence_and_frees_its_rows(make_engine):
    engine = make_engine(varied_model(eos=False))
    keep_prompt, drop_prompt = prompts(2, seed=4)
    expected = greedy_reference(engine.model, keep_prompt, 120)
    kept = engine.scheduler.submit(keep_prompt, SamplingParams(max_tokens=120, temperature=0.0))
    kept_tokens = kept.tokens()
    head = [next(kept_tokens) for _ in range(3)]
    dropped = engine.stream(drop_prompt, max_tokens=500, temperature=0.0)
    next(dropped)
    while engine.scheduler.batch_size < 2:
        time.sleep(0.001)
    dropped.close()  # what a client disconnect does to the app's generator
    deadline = time.monotonic() + 10
    while engine.scheduler.batch_size != 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.scheduler.batch_size == 1  # its row left while the other request runs on
    assert head + list(kept_tokens) == expected
    deadline = time.monotonic() + 10
    while engine.scheduler.cached_tokens and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.scheduler.cached_tokens == 0


def test_a_request_cancelled_while_the_finished_ones_are_removed_keeps_its_blocks_accounted():
    """A client cancels from its own thread, at any moment: also between the scheduler's check of which
    requests finished and its removal of them. A request is removed with its blocks released, or kept."""

    class CancelledMidway(Sequence):
        reads = 0

        @property
        def finished(self) -> bool:
            self.reads += 1
            return self.reads > 2  # running at the first two looks, cancelled at every later one

    scheduler = Scheduler(varied_model(), kv_cache_tokens=256, max_batch=4)
    seq = CancelledMidway([11, 12, 13], SamplingParams(max_tokens=8), None, EOS)
    other = Sequence([14, 15], SamplingParams(max_tokens=8), None, EOS)  # one that finished: removal is due
    other.cancel()
    seq.blocks, other.blocks = scheduler.pool.allocate(2), scheduler.pool.allocate(1)
    scheduler._running += [seq, other]
    for _ in range(3):
        scheduler._remove_finished()
        held = sum(len(s.blocks) for s in scheduler._running)
        assert scheduler.pool.used_blocks == held, "a request left the batch holding its blocks"
    assert scheduler._running == [] and scheduler.pool.used_blocks == 0


def test_a_stop_string_frees_the_rows_of_its_request(make_engine):
    engine = make_engine()
    prompt = prompts(1, seed=5)[0]
    free = engine.complete(prompt, max_tokens=40, temperature=0.0)
    stop = free.text[len(free.text) // 2 :][:2]
    cut = engine.complete(prompt, max_tokens=40, temperature=0.0, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(stop)]
    deadline = time.monotonic() + 10
    while engine.scheduler.batch_size and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.scheduler.batch_size == 0


@pytest.mark.parametrize("bits", [4, 2])
def test_a_quantized_model_batches_too(make_engine, bits):
    from stages.quantize.rtn import quantize_model

    model = varied_model("tiny_dense")
    quantize_model(model, bits=bits, group_size=32)
    engine = make_engine(model)
    requests = greedy_requests([8, 16, 3, 11], seed=6)
    assert run_concurrently(engine, requests) == [greedy_reference(model, p, r.max_tokens) for p, r in requests]
    assert engine.scheduler.stats.max_batch > 1


def test_an_image_request_batches_with_text_requests(make_engine):
    """VL rows carry their 3D RoPE positions into the batch (the cache keeps each row's next position)."""
    import base64

    from stages.data.scenes import generate_scenes
    from stages.serve.images import RequestImages, image_bytes

    model = varied_model("tiny_vl")
    engine = make_engine(model)
    engine.images = RequestImages(model.config, {"min_pixels": 56 * 56, "max_pixels": 112 * 112})
    png = generate_scenes(1, random.Random(0))[0].png
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    image_prompt = [11, 12, model.config.image_token_id, 13, 14]
    ids, vision = engine.images.apply(image_prompt, [(image_bytes(url, "x"), "x")])
    expected = generate(model, torch.tensor([ids]), 12, **vision)[0].tolist()
    expected = expected[: expected.index(EOS) + 1] if EOS in expected else expected
    texts = greedy_requests([15, 6], seed=7)
    results: list = [None] * 3

    def client(i: int) -> None:
        if i == 0:
            results[0] = list(
                engine.scheduler.submit(ids, SamplingParams(max_tokens=12, temperature=0.0), vision).tokens()
            )
        else:
            results[i] = list(engine.scheduler.submit(*texts[i - 1]).tokens())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results[0] == expected
    assert results[1:] == [greedy_reference(model, p, r.max_tokens) for p, r in texts]
    assert engine.scheduler.stats.max_batch > 1


def test_a_preempted_image_request_is_computed_again_with_its_pixels(make_engine):
    """An image request arriving after a text one, in a pool too short for both at their longest: as they grow
    it is preempted (the latest), then readmitted and prefilled alone again over its prompt and the tokens it made,
    with its pixels and 3D positions; both get the model's own greedy decode."""
    import base64

    from stages.data.scenes import generate_scenes
    from stages.serve.images import RequestImages, image_bytes

    model = varied_model("tiny_vl", eos=False)
    engine = make_engine(model, kv_cache_tokens=96, kv_block_tokens=8, prefix_caching=False)
    engine.images = RequestImages(model.config, {"min_pixels": 56 * 56, "max_pixels": 112 * 112})
    png = generate_scenes(1, random.Random(0))[0].png
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    ids, vision = engine.images.apply([11, 12, model.config.image_token_id, 13], [(image_bytes(url, "x"), "x")])
    image_max = 96 - len(ids) - 8
    expected = generate(model, torch.tensor([ids]), image_max, **vision)[0].tolist()
    text = prompts(1, seed=5)[0]
    text_max = 96 - len(text)
    first = engine.scheduler.submit(text, SamplingParams(max_tokens=text_max, temperature=0.0))
    second = engine.scheduler.submit(ids, SamplingParams(max_tokens=image_max, temperature=0.0), vision)
    assert list(first.tokens()) == greedy_reference(model, text, text_max)
    assert list(second.tokens()) == expected
    assert engine.scheduler.stats.preemptions >= 1


def test_serve_config_rejects_a_budget_without_room_for_a_request():
    import stages.serve as serve_stage
    from pipeline.contract import UserError

    with pytest.raises(UserError, match="serve.kv_cache_tokens=64 must exceed max_tokens"):
        serve_stage.validate(serve_stage.Config(kv_cache_tokens=64, max_tokens=64))
    with pytest.raises(UserError, match="serve.max_batch=0"):
        serve_stage.validate(serve_stage.Config(max_batch=0))


# ---------------------------------------------------------------------- prefix caching
def test_prompts_sharing_a_prefix_prefill_only_the_rest_and_give_the_same_tokens(make_engine):
    """Chat-like requests: one long shared prefix (a system prompt), different questions. The first request's full
    blocks stay in the pool once it ends; the later prompts share the blocks of the prefix (whole 16-token blocks)
    and prefill only their own tail; their greedy tokens are the model's own greedy decode, as without the cache."""
    model = varied_model(eos=False)
    rng = random.Random(0)
    system = [rng.randrange(3, 250) for _ in range(45)]
    prompts = [system + [rng.randrange(3, 250) for _ in range(rng.randrange(1, 9))] for _ in range(5)]
    engine = make_engine(model)
    for prompt in prompts:
        got = list(engine.scheduler.submit(prompt, SamplingParams(8, temperature=0.0)).tokens())
        assert got == greedy_reference(model, prompt, 8)
    scheduler = engine.scheduler
    assert scheduler.stats.prefix_hit_tokens == 4 * 32  # the 45-token prefix, its first two blocks
    assert scheduler.pool.cached_blocks > 0
    from stages.serve.metrics import ServeMetrics

    scraped = ServeMetrics(scheduler).expose()[0].decode()
    assert 'ernie_serve_prefix_cache_reused_tokens{role="colocated"} 128.0' in scraped
    # what the API reports as usage.prompt_tokens_details.cached_tokens
    assert engine.complete(system + [7, 7], 3, temperature=0.0).cached_tokens == 32

    off = make_engine(model, prefix_caching=False)
    assert off.complete(system + [7, 7], 3, temperature=0.0).cached_tokens == 0
    for prompt in prompts:
        assert list(off.scheduler.submit(prompt, SamplingParams(8, temperature=0.0)).tokens()) == (
            greedy_reference(model, prompt, 8)
        )
    assert off.scheduler.stats.prefix_hit_tokens == 0 and off.scheduler.pool.cached_blocks == 0


def test_concurrent_requests_share_one_copy_of_a_cached_prefix(make_engine):
    """Requests running together over the same cached prefix hold the same blocks (counted once), not copies."""
    model = varied_model(eos=False)
    rng = random.Random(1)
    system = [rng.randrange(3, 250) for _ in range(64)]
    engine = make_engine(model)
    first = engine.scheduler.submit(system + [7], SamplingParams(4, temperature=0.0))
    assert list(first.tokens()) == greedy_reference(model, system + [7], 4)
    tails = [[rng.randrange(3, 250) for _ in range(3)] for _ in range(4)]
    seqs = [engine.scheduler.submit(system + tail, SamplingParams(40, temperature=0.0)) for tail in tails]
    streams = [seq.tokens() for seq in seqs]
    heads = [next(stream) for stream in streams]  # all four admitted and decoding
    pool = engine.scheduler.pool
    shared = seqs[0].blocks[:4]
    assert all(seq.blocks[:4] == shared for seq in seqs) and all(pool.holders(b) == 4 for b in shared)
    # four private tails of 67..107 tokens would hold 4 * 7 blocks; shared, the prefix's 4 count once
    assert pool.used_blocks <= 4 + 4 * 3
    for head, stream, tail in zip(heads, streams, tails, strict=True):
        assert [head, *stream] == greedy_reference(model, system + tail, 40)
    deadline = time.monotonic() + 10
    while pool.used_blocks and time.monotonic() < deadline:  # the scheduler frees them after the last token
        time.sleep(0.01)
    assert pool.used_blocks == 0


def test_requests_that_arrive_together_are_prefilled_in_one_forward_with_their_own_tokens():
    """Queued together, plain text requests of different lengths are prefilled in one forward (their tokens end to
    end in one row: one model call, not one each) and still give exactly their own greedy decode; a seeded sampled
    one its own draw. Later forwards carry one token per request."""
    model = varied_model(eos=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (3, 17, 9, 30)]
    scheduler = Scheduler(model, kv_cache_tokens=4096, max_batch=8)
    calls = []
    model.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(args[0].shape if args else None), with_kwargs=True
    )
    seqs = [Sequence(p, SamplingParams(6, temperature=0.0), None, EOS) for p in prompts]
    seqs.append(Sequence(prompts[1], SamplingParams(6, temperature=1.0, seed=3), None, EOS))
    scheduler._waiting.extend(seqs)  # queued before the loop looks: they are admitted together
    with torch.inference_mode():
        scheduler.step()
        assert scheduler.stats.prefills == 5 and calls == [(1, sum(map(len, prompts)) + 17)]
        while scheduler._running:
            scheduler.step()
    assert calls[1] == (1, 5) and scheduler.stats.max_batch == 5
    for seq, prompt in zip(seqs[:4], prompts, strict=True):
        assert seq.tokens_so_far == greedy_reference(model, prompt, 6)
    alone = Sequence(prompts[1], SamplingParams(6, temperature=1.0, seed=3), None, EOS)
    single = Scheduler(model, kv_cache_tokens=4096, max_batch=8)
    single._waiting.append(alone)
    with torch.inference_mode():
        while single.step() or single._running or single._prefilling:
            pass
    assert seqs[4].tokens_so_far == alone.tokens_so_far


def _forwards_of(model) -> list[int]:
    """Tokens fed to each forward of `model` from now on."""
    fed = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: fed.append(args[0].shape[1]), with_kwargs=True)
    return fed


def test_prompts_arriving_one_a_step_wait_to_run_together_and_keep_their_own_tokens():
    """With prompt_wait_steps=3, prompts that arrive one per decode step run in one forward once the first has
    waited 3 steps; the steps in between carry only the decoding rows (what the compiled step takes), and every
    request gets exactly its own greedy decode."""
    model = varied_model(eos=False)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 250) for _ in range(n)] for n in (11, 4, 9, 6)]
    scheduler = Scheduler(model, kv_cache_tokens=4096, max_batch=8, prompt_wait_steps=3)
    fed = _forwards_of(model)
    first = Sequence(prompts[0], SamplingParams(12, temperature=0.0), None, EOS)
    later = [Sequence(p, SamplingParams(5, temperature=0.0), None, EOS) for p in prompts[1:]]
    with torch.inference_mode():
        scheduler._waiting.append(first)
        scheduler.step()  # nothing decodes yet: the first prompt runs at once
        for seq in later:  # one newcomer a step, each admitted while the first decodes
            scheduler._waiting.append(seq)
            scheduler.step()
        scheduler.step()
        assert fed == [11, 1, 1, 1, 1 + 4 + 9 + 6], "the newcomers wait 3 decode steps, then run in one forward"
        while scheduler._running or scheduler._prefilling:
            scheduler.step()
    assert first.tokens_so_far == greedy_reference(model, prompts[0], 12)
    for seq, prompt in zip(later, prompts[1:], strict=True):
        assert seq.tokens_so_far == greedy_reference(model, prompt, 5)


def test_a_waiting_prompt_runs_at_once_when_nothing_decodes_and_after_its_wait_when_the_batch_is_full():
    """A prompt waits for company only while requests decode; a full batch does not cut the wait short (its rows
    free up as requests end, and the prompts that take them run with the waiting one)."""
    model = varied_model(eos=False)
    scheduler = Scheduler(model, kv_cache_tokens=4096, max_batch=2, prompt_wait_steps=2)
    fed = _forwards_of(model)
    decoding = Sequence([5, 6, 7], SamplingParams(6, temperature=0.0), None, EOS)
    newcomer = Sequence([9, 10], SamplingParams(8, temperature=0.0), None, EOS)
    with torch.inference_mode():
        scheduler._waiting.append(decoding)
        scheduler.step()  # nothing decodes: no wait
        scheduler._waiting.append(newcomer)  # it takes the batch's last row
        for _ in range(3):
            scheduler.step()
        assert fed == [3, 1, 1, 1 + 2]
        while scheduler._running:
            scheduler.step()
    assert decoding.tokens_so_far == greedy_reference(model, [5, 6, 7], 6)
    assert newcomer.tokens_so_far == greedy_reference(model, [9, 10], 8)


def test_prompt_wait_steps_below_zero_is_refused_by_name():
    with pytest.raises(ValueError, match="prompt_wait_steps=-1"):
        Scheduler(varied_model(), kv_cache_tokens=256, max_batch=2, prompt_wait_steps=-1)
