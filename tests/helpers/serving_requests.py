"""Greedy requests for the serving engine's tests, the model's own greedy decode to check them against, and
clients that send them all at once."""

from __future__ import annotations

import random
import threading

import torch

from ernie import get_preset
from ernie.generation import generate
from stages.serve.engine import Engine
from stages.serve.scheduler import SamplingParams

EOS = get_preset("tiny_moe").eos_token_id


def greedy_reference(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The model's own greedy decode, up to and including its eos."""
    new = generate(model, torch.tensor([prompt]), max_tokens)[0].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(11, 500) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def greedy_requests(max_tokens: list[int], seed: int) -> list[tuple[list[int], SamplingParams]]:
    """Greedy requests of various prompt lengths, one per entry of `max_tokens`."""
    rows = prompts(len(max_tokens), seed)
    return [(p, SamplingParams(max_tokens=m, temperature=0.0)) for p, m in zip(rows, max_tokens, strict=True)]


def run_concurrently(engine: Engine, requests: list[tuple], read=None) -> list[list[int]]:
    """Submit every request from its own thread at once; the tokens each got. `read(request)`: its tokens (by
    default from the engine's scheduler)."""
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))
    read = read or (lambda request: engine.scheduler.submit(*request).tokens())

    def client(i: int) -> None:
        start.wait()
        results[i] = list(read(requests[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results
