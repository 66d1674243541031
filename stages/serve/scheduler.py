"""Continuous batching: one thread owns the model and decodes every running request in one batch.

    scheduler = Scheduler(model, kv_cache_tokens=65536, max_batch=64)
    seq = scheduler.submit(prompt_ids, SamplingParams(max_tokens=16, temperature=0.0))
    for token in seq.tokens(): ...                  # as the scheduler samples them
    seq.cancel()                                    # a client went away: its rows are freed

Each iteration of the scheduler's thread:
  1. drops cancelled requests (queued or running) and trims the cache columns nobody uses;
  2. admits queued requests in arrival order while the batch has room (`max_batch` rows) and the
     KV budget holds (`kv_cache_tokens`, see `peak_cached_tokens`): each is prefilled alone into
     its own `KVCache`, its first token sampled, and the cache merged into the batch's
     (`KVCache.merge` left-pads the shorter side);
  3. runs ONE decode step for all running rows (each row's last token; positions per row from the
     cache), samples each row with its own parameters and generator, and removes finished rows
     (eos or max_tokens) with `KVCache.reorder` + `KVCache.trim`.

A request's tokens go out on its own queue; `Engine.stream` turns them into text deltas. Requests
are independent: a row's logits depend only on its own tokens (padding is masked, MoE routing is
per token), and each request samples from its own generator, so a seeded request draws the same
tokens batched or alone.

Prefill/decode disaggregation (stages/serve/pd.py) splits step 2 across engines on one code path:
`submit_prefill` runs it up to the first token and hands back a `Prefilled` (the request's cache,
first token and generator state) instead of joining the batch; `submit_prefilled` admits such a
request on another engine under the same rules, restoring its cache instead of computing it, so it
decodes exactly as it would have where it was prefilled.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ernie.cache import KVCache
from ernie.generation import sample_next, without_vision_tokens

from .prefix_cache import PrefixCache


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    """0: greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """Sample among the k most likely tokens only (ties at the k-th kept); 0 or less: off."""
    seed: int | None = None
    """Seeds this request's own generator: the same samples whatever else runs in the batch."""


class _Packed(NamedTuple):
    """A tensor as raw bytes: numpy arrays travel out of band (pickle 5; in Ray's object store they are
    read zero-copy on the node), torch tensors would be copied into the pickle."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]


def _pack(t: torch.Tensor | None) -> _Packed | None:
    if t is None:
        return None
    flat = t.detach().cpu().contiguous().reshape(-1)
    return _Packed(flat.view(torch.uint8).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def _unpack(x: torch.Tensor | _Packed | None, device) -> torch.Tensor | None:
    """A tensor on `device` owning its memory: a received array may be a read-only view of the object
    store, and a handoff kept in process may be restored more than once."""
    if not isinstance(x, _Packed):
        return None if x is None else x.to(device, copy=True)
    with warnings.catch_warnings():  # read-only buffer: only read here, then copied
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(x.data)
    return raw.view(getattr(torch, x.dtype)).reshape(x.shape).to(device, copy=True)


def _map_cache(state: dict, fn) -> dict:
    return {k: [fn(t) for t in v] if isinstance(v, list) else fn(v) for k, v in state.items()}


@dataclass
class Prefilled:
    """A request prefilled by one engine for another to decode (prefill/decode disaggregation): all its
    decode needs to go on exactly as it would have on the engine that prefilled it. Pickling sends the
    tensors as raw byte arrays (`_Packed`), which Ray's object store hands out without a copy."""

    prompt_ids: list[int]
    params: SamplingParams
    first_token: int
    eos: int
    cache: dict
    """`KVCache.export()` of the prompt: per-layer K/V trimmed to its length, the next RoPE position
    (for VL prompts the position after the images' 3D positions), key validity and documents."""
    generator_state: torch.Tensor | None = None
    """The request's seeded generator after drawing the first token."""

    @property
    def finished(self) -> bool:
        """The first token already ends the request: nothing is left to decode."""
        return self.first_token == self.eos or self.params.max_tokens <= 1

    @property
    def nbytes(self) -> int:
        sizes = []
        for v in self.cache.values():
            for t in v if isinstance(v, list) else [v]:
                if isinstance(t, _Packed):
                    sizes.append(t.data.nbytes)
                elif t is not None:
                    sizes.append(t.numel() * t.element_size())
        return sum(sizes)

    def arrays(self) -> list[np.ndarray]:
        """The byte arrays of a received handoff (empty before pickling): read-only when they are views
        of Ray's object store, i.e. when it came zero-copy."""
        found = [p for v in self.cache.values() for p in (v if isinstance(v, list) else [v])]
        return [p.data for p in [*found, self.generator_state] if isinstance(p, _Packed)]

    def restore_cache(self, device) -> KVCache:
        return KVCache.from_state(_map_cache(self.cache, lambda t: _unpack(t, device)), device)

    def restore_generator(self, device) -> torch.Generator | None:
        if self.generator_state is None:
            return None
        generator = torch.Generator(device=device)
        generator.set_state(_unpack(self.generator_state, "cpu"))
        return generator

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["cache"] = _map_cache(self.cache, lambda t: t if isinstance(t, _Packed) else _pack(t))
        gen = self.generator_state
        state["generator_state"] = gen if isinstance(gen, _Packed) else _pack(gen)
        return state


class Sequence:
    """One request inside the scheduler: its inputs, its tokens so far and the queue they go out on."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, eos: int, device="cpu"
    ) -> None:
        self.prompt_ids, self.params, self.vision, self.eos = prompt_ids, params, vision or {}, eos
        seed = params.seed
        self.generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        self.tokens_so_far: list[int] = []
        self.steps: list[int] = []
        """The scheduler's decode step count when each token was sampled (interleaving is visible here)."""
        self.cancelled = False
        self.prefilled: Prefilled | None = None
        """Set for a request prefilled elsewhere: its cache is restored from here, not computed."""
        self.handoff: Future | None = None
        """Set for a prefill-only request: gets its `Prefilled` instead of joining the batch."""
        self.listener: Callable[[int | BaseException], None] | None = None
        """Also told each token (or the error) as it goes out: for readers that cannot block on a queue."""
        self._out: queue.Queue = queue.Queue()

    @property
    def finished(self) -> bool:
        done = self.tokens_so_far and (self.tokens_so_far[-1] == self.eos)
        return self.cancelled or bool(done) or len(self.tokens_so_far) >= self.params.max_tokens

    @property
    def cached(self) -> int:
        """Real tokens this request holds in the KV cache: the prompt and every token fed back."""
        return len(self.prompt_ids) + max(len(self.tokens_so_far) - 1, 0)

    @property
    def steps_left(self) -> int:
        """Decode steps this request may still take part in."""
        return self.params.max_tokens - max(len(self.tokens_so_far), 1)

    def cancel(self) -> None:
        """Stop generating (a no-op once finished); the scheduler frees the rows at its next step."""
        self.cancelled = True

    def tokens(self) -> Iterator[int]:
        """The generated tokens as they come, up to eos or max_tokens; a scheduler error is raised here."""
        for _ in range(self.params.max_tokens):
            item = self._out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item == self.eos:
                return

    def _emit(self, token: int, step: int) -> None:
        self.tokens_so_far.append(token)
        self.steps.append(step)
        self._put(token)

    def _put(self, item: int | BaseException) -> None:
        self._out.put(item)
        if self.listener is not None:
            try:
                self.listener(item)
            except Exception:  # noqa: BLE001 - its reader is gone (e.g. a closed event loop): only it stops
                self.cancelled = True

    def _fail(self, err: BaseException) -> None:
        self.cancelled = True
        if self.handoff is not None:
            if not self.handoff.done():
                self.handoff.set_exception(err)
            return
        self._put(err)


@dataclass
class SchedulerStats:
    """What the scheduler did, for tests and benchmarks."""

    decode_steps: int = 0
    prefills: int = 0
    max_batch: int = 0
    """Largest batch one decode step ran."""
    max_cached_tokens: int = 0
    """Most key slots (rows x padded length, prefills included) held at once; never above the budget."""
    row_steps: int = 0
    """Rows summed over decode steps (row_steps / decode_steps: the mean batch)."""
    handed_off: int = 0
    """Prefills handed to another engine (`submit_prefill`)."""
    taken_over: int = 0
    """Requests admitted with a cache prefilled elsewhere (`submit_prefilled`)."""


def peak_cached_tokens(rows: list[tuple[int, int]]) -> int:
    """The most key slots a batch will hold from now on, for rows of (cached tokens, decode steps left).

    After t more steps the rows still running (steps left >= t) hold cached + t tokens each, and the
    left-padded cache is as long as its longest row (columns that are padding for everyone are
    trimmed), so the batch holds len(alive) x (max cached of alive + t). Between two rows leaving that
    only grows, so the peak falls just before a row leaves: t = its steps left. Taking rows by steps
    left, longest first, the alive rows at each such t are the ones taken so far."""
    peak, longest = 0, 0
    for count, (cached, left) in enumerate(sorted(rows, key=lambda row: -row[1]), start=1):
        longest = max(longest, cached)
        peak = max(peak, count * (longest + left))
    return peak


def _alone(seq: Sequence) -> tuple[int, int]:
    """(cached tokens, decode steps left) of a queued request once it is prefilled; a prefill-only
    request holds its cache for the prefill alone."""
    return len(seq.prompt_ids), 0 if seq.handoff is not None else seq.params.max_tokens - 1


def sample_rows(logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token of each row: argmax for greedy rows, else each row's own sampling and generator."""
    greedy = logits_BV.argmax(dim=-1).tolist()
    tokens = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            tokens.append(greedy[row])
            continue
        logits = logits_BV[row : row + 1]
        if 0 < p.top_k < logits.shape[-1]:
            kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        tokens.append(int(sample_next(logits, p.temperature, p.top_p, seq.generator)[0]))
    return tokens


class Scheduler:
    def __init__(self, model, kv_cache_tokens: int, max_batch: int, prefix_cache_tokens: int = 0) -> None:
        """`prefix_cache_tokens`: prompt-prefix KV kept for reuse (`PrefixCache`); 0: off."""
        self.model, self.config = model, model.config
        self.kv_cache_tokens, self.max_batch = kv_cache_tokens, max_batch
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.device = next(model.parameters()).device
        self.stats = SchedulerStats()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # row i of the cache is _running[i]
        self._cache = KVCache(self.config.num_layers)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def batch_size(self) -> int:
        """Requests decoding now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for admission (prefill-only ones included)."""
        return len(self._waiting)

    @property
    def cached_tokens(self) -> int:
        """Key slots the running batch holds now (rows x padded length)."""
        cache = self._cache
        return cache.batch_size * cache.length

    def submit(self, prompt_ids: list[int], params: SamplingParams, vision: dict | None = None) -> Sequence:
        """Queue a request (checked by the engine: it fits the context and the budget alone)."""
        return self._queue(Sequence(prompt_ids, params, vision, self.config.eos_token_id, self.device))

    def submit_prefill(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None = None
    ) -> Future[Prefilled]:
        """Queue a request to be prefilled only: its prompt runs and its first token is drawn as for
        `submit`, then it is handed back (for another engine's `submit_prefilled`) instead of joining
        the batch. It takes no batch row; it waits for KV room for its prompt."""
        seq = Sequence(prompt_ids, params, vision, self.config.eos_token_id, self.device)
        seq.handoff = Future()
        self._queue(seq)
        return seq.handoff

    def submit_prefilled(
        self, prefilled: Prefilled, listener: Callable[[int | BaseException], None] | None = None
    ) -> Sequence:
        """Queue a request prefilled elsewhere: admitted as `submit` admits (batch rows, KV budget, in
        order), its cache restored, its first token (emitted first, as `submit`'s) the prefill's, and its
        generator where the prefill left it. `listener`: see `Sequence.listener`."""
        seq = Sequence(prefilled.prompt_ids, prefilled.params, None, self.config.eos_token_id, self.device)
        seq.prefilled, seq.listener = prefilled, listener
        if prefilled.generator_state is not None:
            seq.generator = prefilled.restore_generator(self.device)
        return self._queue(seq)

    def _queue(self, seq: Sequence) -> Sequence:
        if peak_cached_tokens([_alone(seq)]) > self.kv_cache_tokens:
            raise ValueError(
                f"a request of {len(seq.prompt_ids)} + {seq.params.max_tokens} tokens never fits the KV budget"
            )
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="serve-scheduler", daemon=True)
                self._thread.start()
            self._waiting.append(seq)
            self._wake.notify()
        return seq

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._closed or self._waiting or self._running):
                        self._wake.wait()
                    if self._closed:
                        break
                try:
                    self._remove_finished()
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as err:  # noqa: BLE001 - the requests get the error, the server keeps running
                    self._fail(self._running, err)
                    self._running, self._cache = [], KVCache(self.config.num_layers)
        self._fail([*self._running, *self._waiting], RuntimeError("the serving engine was closed"))

    def _admit(self) -> None:
        """Admit what fits: plain text requests that arrive together are prefilled in one padded forward
        (`_prefill_together`); the rest (restored, prefill-only, image or prefix-cached requests) one by one."""
        picked: list[Sequence] = []
        while (seq := self._next_admitted(picked)) is not None:
            picked.append(seq)
        together = [s for s in picked if self._batchable(s)]
        if len(together) > 1:
            self._prefill_together(together)
            picked = [s for s in picked if not self._batchable(s)]
        for seq in picked:
            try:
                cache, first = self._start(seq)
                if seq.handoff is not None:
                    seq.handoff.set_result(self._handoff(seq, cache, first))
                    continue
            except Exception as err:  # noqa: BLE001 - a bad request (e.g. its vision inputs) fails alone
                self._fail([seq], err)
                continue
            seq._emit(first, self.stats.decode_steps)
            if not seq.finished:
                self._cache.merge(cache)
                self._running.append(seq)
                self._observe(self._cache.batch_size * self._cache.length)

    def _batchable(self, seq: Sequence) -> bool:
        return seq.prefilled is None and seq.handoff is None and not seq.vision and self.prefixes is None

    def _prefill_together(self, seqs: list[Sequence]) -> None:
        """One left-padded prefill for several text requests: their first tokens, then their rows join the batch.
        Padding is masked and positions count real tokens only, so each row is what its own prefill gives."""
        longest = max(len(s.prompt_ids) for s in seqs)
        pad = self.config.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (longest - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs])
        cache = KVCache(self.config.num_layers)
        try:
            logits = self.model(ids, attention_mask=mask.to(self.device), cache=cache, logits_to_keep=1).logits[:, -1]
            firsts = sample_rows(without_vision_tokens(logits, self.config), seqs)
        except Exception as err:  # noqa: BLE001 - these requests fail, the server keeps running
            self._fail(seqs, err)
            return
        self.stats.prefills += len(seqs)
        self._observe(self._cache.batch_size * self._cache.length + cache.batch_size * cache.length)
        for seq, first in zip(seqs, firsts, strict=True):
            seq._emit(first, self.stats.decode_steps)
        keep = [i for i, s in enumerate(seqs) if not s.finished]
        if not keep:
            return
        if len(keep) < len(seqs):
            cache.reorder(torch.tensor(keep, device=self.device))
        self._cache.merge(cache)
        self._running.extend(seqs[i] for i in keep)
        self._observe(self._cache.batch_size * self._cache.length)

    def _next_admitted(self, picked: list[Sequence] = ()) -> Sequence | None:
        """The first queued request, taken off the queue if the batch has room for it beside the running rows
        and the requests `picked` this round (a row, unless it is prefill-only, and the KV budget); None:
        nothing more can be admitted now."""
        with self._wake:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            if not self._waiting:
                return None
            seq = self._waiting[0]
            rows = len(self._running) + sum(1 for s in picked if s.handoff is None)
            if seq.handoff is None and rows >= self.max_batch:
                return None
            planned = [(s.cached, s.steps_left) for s in self._running] + [_alone(s) for s in (*picked, seq)]
            if peak_cached_tokens(planned) > self.kv_cache_tokens:
                return None  # it waits (in order) until running rows finish
            return self._waiting.popleft()

    def _start(self, seq: Sequence) -> tuple[KVCache, int]:
        """A request's prompt cache and first token: computed here, or restored from its prefill elsewhere."""
        if seq.prefilled is not None:
            prefilled, seq.prefilled = seq.prefilled, None  # its buffers (maybe object store memory) can go
            self.stats.taken_over += 1
            return prefilled.restore_cache(self.device), prefilled.first_token
        cache, logits = self._prefill(seq)
        return cache, sample_rows(logits, [seq])[0]

    def _handoff(self, seq: Sequence, cache: KVCache, first: int) -> Prefilled:
        self.stats.handed_off += 1
        state = None if seq.generator is None else seq.generator.get_state()
        return Prefilled(seq.prompt_ids, seq.params, first, seq.eos, cache.export(), state)

    def _prefill(self, seq: Sequence) -> tuple[KVCache, torch.Tensor]:
        """The prompt's cache and last logits; with prefix caching (text prompts), only the part after the
        longest stored prefix runs, and the prompt is stored for the prompts after it."""
        cache, done = KVCache(self.config.num_layers), 0
        reuse = self.prefixes is not None and not seq.vision
        if reuse and (hit := self.prefixes.lookup(seq.prompt_ids)) is not None:
            cache, done = hit
        vision = {k: v.to(self.device) for k, v in seq.vision.items()}
        ids = torch.tensor([seq.prompt_ids[done:]], device=self.device)
        logits = self.model(ids, cache=cache, logits_to_keep=1, **vision).logits[:, -1]
        if reuse:
            self.prefixes.store(seq.prompt_ids, cache)
        self.stats.prefills += 1
        self._observe(self._cache.batch_size * self._cache.length + cache.length)
        return cache, without_vision_tokens(logits, self.config)

    def _decode(self) -> None:
        """One step for every running row; the rows that finished leave the batch right after."""
        last = torch.tensor([[s.tokens_so_far[-1]] for s in self._running], device=self.device)
        logits = self.model(last, cache=self._cache).logits[:, -1]
        self.stats.decode_steps += 1
        self.stats.max_batch = max(self.stats.max_batch, len(self._running))
        self.stats.row_steps += len(self._running)
        self._observe(self._cache.batch_size * self._cache.length)
        tokens = sample_rows(without_vision_tokens(logits, self.config), self._running)
        for seq, token in zip(self._running, tokens, strict=True):
            if not seq.cancelled:
                seq._emit(token, self.stats.decode_steps)
        self._remove_finished()

    def _remove_finished(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.finished]
        if len(keep) == len(self._running):
            return
        if not keep:
            self._running, self._cache = [], KVCache(self.config.num_layers)
            return
        self._cache.reorder(torch.tensor(keep, device=self.device))
        self._cache.trim()
        self._running = [self._running[i] for i in keep]

    def _observe(self, cached_tokens: int) -> None:
        self.stats.max_cached_tokens = max(self.stats.max_cached_tokens, cached_tokens)

    @staticmethod
    def _fail(seqs: list[Sequence], err: Exception) -> None:
        for seq in seqs:
            seq._fail(err)
