"""A control reward for the RLVR tests: a reward with no relation to the right answer."""

from __future__ import annotations

import hashlib

from stages.posttrain.rewards import exact_match


def shuffled_exact_match(completion: str, record: dict) -> float:
    """Exact match against a target drawn at random per prompt (uniform over 0..18, fixed by a hash of
    the prompt): the right answer, like any other number, is rewarded about 1 time in 19, so learning
    this reward teaches nothing about arithmetic, nor which numbers are likely answers."""
    digest = hashlib.sha256(repr(record["prompt"]).encode()).digest()
    return exact_match(completion, {"answer": str(digest[0] % 19)})
