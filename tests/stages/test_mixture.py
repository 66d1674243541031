"""Mixture weights decide each source's tokens; the interleaved stream is deterministic and resumable."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.data.mixture import MixtureState, interleave, realised, token_targets


def make_sources(lengths: dict[str, list[int]]):
    return {name: (lambda ls=ls, name=name: [(n, (name, i)) for i, n in enumerate(ls)]) for name, ls in lengths.items()}


def test_targets_follow_the_weights_and_default_to_all_tokens():
    targets = token_targets({"a": 1000, "b": 3000}, {"a": 1, "b": 1})
    assert targets == {"a": 2000, "b": 2000}
    assert token_targets({"a": 1000, "b": 3000}, {"a": 3, "b": 1}, total_tokens=400) == {"a": 300, "b": 100}
    assert token_targets({"a": 0, "b": 10}, {"a": 1, "b": 1}) == {"b": 10}  # an empty source drops out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), weights=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4))
def test_realised_mixture_is_within_two_percent_of_the_asked_one(seed, weights):
    rng = random.Random(seed)
    names = [f"s{i}" for i in range(len(weights))]
    lengths = {n: [rng.randint(5, 200) for _ in range(rng.randint(50, 400))] for n in names}
    asked = dict(zip(names, weights, strict=True))
    targets = token_targets({n: sum(ls) for n, ls in lengths.items()}, asked)
    state = MixtureState()
    items = list(interleave(make_sources(lengths), targets, state))
    shares = realised(state, asked)
    for name in names:
        assert abs(shares[name]["realised"] - shares[name]["asked"]) < 0.02, (name, shares)
    assert sum(state.tokens.values()) == sum(lengths[name][i] for name, (_, i) in items)


def test_small_sources_repeat_and_every_window_of_the_stream_is_mixed():
    lengths = {"big": [10] * 1000, "small": [10] * 20}
    state = MixtureState()
    stream = [name for name, _ in interleave(make_sources(lengths), {"big": 5000, "small": 5000}, state)]
    assert state.taken == {"big": 500, "small": 500}  # "small" went round 25 times
    for start in range(0, len(stream), 100):
        window = stream[start : start + 100]
        assert 45 <= window.count("small") <= 55


def test_resuming_from_a_saved_state_continues_the_same_stream():
    rng = random.Random(0)
    lengths = {n: [rng.randint(1, 50) for _ in range(300)] for n in ("a", "b", "c")}
    targets = token_targets({n: sum(v) for n, v in lengths.items()}, {"a": 0.5, "b": 0.3, "c": 0.2})
    full = list(interleave(make_sources(lengths), targets))
    state = MixtureState()
    first = []
    for item in interleave(make_sources(lengths), targets, state):
        first.append(item)
        if len(first) == 123:
            break
    saved = MixtureState(dict(state.taken), dict(state.tokens))
    rest = list(interleave(make_sources(lengths), targets, saved))
    assert first + rest == full


def test_a_source_without_documents_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'empty'"):
        list(interleave({"empty": lambda: []}, {"empty": 10}))
