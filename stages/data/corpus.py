"""Sampling and holdout helpers for the bundled corpus and the generated post-training records."""

from __future__ import annotations

import random


def sample_documents(texts: list[str], cap: int, rng: random.Random) -> list[str]:
    """At most `cap` of `texts`, chosen by `rng`, kept in their original order."""
    if len(texts) <= cap:
        return list(texts)
    keep = sorted(rng.sample(range(len(texts)), cap))
    return [texts[i] for i in keep]


def holdout_split(records: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) of already-shuffled generated records; val gets at least one when possible."""
    n_val = round(len(records) * val_fraction)
    if len(records) >= 2:
        n_val = max(1, n_val)
    return records[n_val:], records[:n_val]
