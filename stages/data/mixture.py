"""Mixture weights -> how many tokens each source gives, and one deterministic interleaved stream.

Source i is asked for w_i / sum(w) of the mixture's tokens; the mixture holds `total_tokens`,
by default as many tokens as all sources hold together (so some sources are sampled down and
small ones repeat, as in Megatron-style blending). The stream interleaves sources by deficit:
the next document comes from the source furthest behind its share of what has been emitted,
so every window of the stream, not only the whole, has the asked mixture. A source that runs
out before its target starts over (a repeat pass; counted in `epochs`). No randomness: the
order depends only on the documents, so reruns and resumes give the same stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field


def token_targets(available: dict[str, int], weights: dict[str, float], total_tokens: int = 0) -> dict[str, int]:
    """Tokens each source should contribute (sources with nothing available are left out)."""
    usable = {name: w for name, w in weights.items() if available.get(name, 0) > 0}
    total = total_tokens or sum(available[name] for name in usable)
    norm = sum(usable.values())
    return {name: round(total * w / norm) for name, w in usable.items()}


@dataclass
class MixtureState:
    """Documents taken per source (repeat passes included): all a resumed stage needs to skip."""

    taken: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


def interleave(
    sources: dict[str, Callable[[], Iterable[tuple[int, object]]]],
    targets: dict[str, int],
    state: MixtureState | None = None,
) -> Iterator[tuple[str, object]]:
    """(source, item) in deficit order; `sources[name]()` yields (tokens, item) from the start.

    With a `state` from an earlier run, its documents are skipped (read again, not emitted).
    The state is updated in place as items are emitted, so the caller can save it at any point.
    """
    state = state or MixtureState()
    total_target = sum(targets.values())
    iterators: dict[str, Iterator] = {}
    passes: dict[str, int] = {}
    emitted = dict.fromkeys(targets, 0)
    skip = {name: state.taken.get(name, 0) for name in targets}
    for name in targets:
        state.taken.setdefault(name, 0)
        state.tokens.setdefault(name, 0)
        iterators[name], passes[name] = iter(sources[name]()), 0
        emitted[name] = state.tokens[name]

    def next_item(name: str):
        for _ in range(2):  # at most one restart per call: an empty source yields nothing twice
            try:
                return next(iterators[name])
            except StopIteration:
                passes[name] += 1
                iterators[name] = iter(sources[name]())
        raise ValueError(f"source {name!r} yields no documents")

    for name in targets:  # documents a resumed run already emitted
        for _ in range(skip[name]):
            next_item(name)

    active = [name for name in targets if emitted[name] < targets[name]]
    while active:
        done = sum(emitted.values())
        # furthest behind its share of the stream so far (ties: the order of `targets`)
        name = min(active, key=lambda n: (emitted[n] - targets[n] * (done + 1) / total_target, list(targets).index(n)))
        tokens, item = next_item(name)
        emitted[name] += tokens
        state.taken[name] += 1
        state.tokens[name] += tokens
        if emitted[name] >= targets[name]:
            active.remove(name)
        yield name, item


def realised(state: MixtureState, weights: dict[str, float]) -> dict[str, dict[str, float]]:
    """Asked vs realised token share per source (for stats.json)."""
    total = sum(state.tokens.values()) or 1
    norm = sum(weights.values())
    return {name: {"asked": weights[name] / norm, "realised": state.tokens.get(name, 0) / total} for name in weights}
