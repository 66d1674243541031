"""Tokens to readers on an event loop (`stages.serve.delivery`, `EngineFront.astream`), no Ray: many requests
read by one thread get exactly their own tokens, in order, a decode step wakes the loop once for all of them, the async
stream's text deltas are the synchronous stream's, and a synchronous reader of an async source gets its items,
its error and its cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from served_app import varied_model
from serving_requests import greedy_reference, greedy_requests

from stages.data.tokenizer import train_tokenizer
from stages.serve import delivery
from stages.serve.delivery import LoopThread, outbox
from stages.serve.engine import Engine


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["how many red squares are there", "two", "three", "a blue circle", "1+2=3"] * 30, 300)


@pytest.fixture
def engine(tokenizer):
    engine = Engine(varied_model(), tokenizer)
    yield engine
    engine.close()


def test_requests_read_on_one_loop_get_their_own_tokens_and_a_step_wakes_the_loop_once(engine, monkeypatch):
    requests = greedy_requests([12, 5, 30, 9, 1, 20, 16, 7], seed=3)
    expected = [greedy_reference(engine.model, p, params.max_tokens) for p, params in requests]
    flushes, steps = [], []
    flush, step = delivery.LoopOutbox._flush, engine.scheduler.step
    monkeypatch.setattr(delivery.LoopOutbox, "_flush", lambda box: (flushes.append(1), flush(box))[1])
    monkeypatch.setattr(engine.scheduler, "step", lambda: (steps.append(1), step())[1])

    async def read_all() -> list[list[int]]:
        async def read(prompt, params) -> list[int]:
            return [token async for token in engine.atokens(prompt, params)]

        return await asyncio.gather(*(read(*r) for r in requests))

    assert asyncio.run(read_all()) == expected
    assert engine.scheduler.stats.max_batch > 1
    tokens = sum(map(len, expected))
    # one wake-up per scheduler step at most, however many requests got a token in it
    assert 0 < len(flushes) <= len(steps) < tokens


def test_the_async_stream_gives_the_deltas_of_the_sync_stream_stop_strings_included(engine):
    prompt = engine.encode("how many red")
    whole = engine.complete(prompt, 24, temperature=0.0).text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    assert stop.strip(), f"the greedy text {whole!r} is too short to cut"
    for stops in ([], [stop]):
        sync = [(d.text, d.completion) for d in engine.stream(prompt, 24, temperature=0.0, stop=stops)]

        async def read(stops=stops) -> list:
            return [(d.text, d.completion) async for d in engine.astream(prompt, 24, temperature=0.0, stop=stops)]

        assert asyncio.run(read()) == sync
    done = sync[-1][1]
    assert done.finish_reason == "stop" and stop not in done.text and "".join(t for t, _ in sync) == done.text
    deadline = time.monotonic() + 10
    while engine.scheduler.batch_size and time.monotonic() < deadline:  # freed at the scheduler's next step
        time.sleep(0.01)
    assert engine.scheduler.batch_size == 0


def test_a_sender_to_a_closed_loop_raises_so_the_scheduler_drops_the_request():
    loop = asyncio.new_event_loop()
    send = outbox(loop).sender(asyncio.Queue())
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        send(1)


def test_a_sync_reader_of_an_async_source_gets_its_items_its_error_and_its_cleanup():
    io = LoopThread("test-io")
    cleaned: list[str] = []

    async def source(n: int, fail: bool = False):
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield i
            if fail:
                raise ValueError("the source broke")
        finally:
            cleaned.append(f"{n}")

    try:
        assert list(io.iterate(source(3))) == [0, 1, 2] and cleaned == ["3"]
        with pytest.raises(ValueError, match="the source broke"):
            list(io.iterate(source(2, fail=True)))
        assert cleaned == ["3", "2"]
        reader = io.iterate(source(1000))
        assert next(reader) == 0
        reader.close()  # cancels the source on the loop: its finally runs there
        for _ in range(200):
            if len(cleaned) == 3:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert cleaned == ["3", "2", "1000"]
    finally:
        io.close()


def test_every_reader_gets_its_items_in_the_order_sent_whatever_the_batching():
    """Two producer threads send interleaved runs of items (some inside `batched` blocks, some not) to eight
    readers on one loop: each reader gets exactly its items, in the order its producer sent them."""

    async def run() -> dict[int, list[int]]:
        loop = asyncio.get_running_loop()
        box = outbox(loop)
        queues = {r: asyncio.Queue() for r in range(8)}
        senders = {r: box.sender(q) for r, q in queues.items()}

        def produce(readers: list[int]) -> None:
            for step in range(300):
                block = delivery.batched() if step % 3 else contextlib.nullcontext()
                with block:
                    for r in readers:
                        senders[r](step)

        threads = [threading.Thread(target=produce, args=(rs,)) for rs in ([0, 1, 2, 3], [4, 5, 6, 7])]
        for t in threads:
            t.start()
        got = {r: [await q.get() for _ in range(300)] for r, q in queues.items()}
        for t in threads:
            t.join()
        return got

    assert asyncio.run(run()) == {r: list(range(300)) for r in range(8)}
