"""Continuous batching: one thread owns the model and decodes every running request in one batch.

    scheduler = Scheduler(model, kv_cache_tokens=65536, max_batch=64)
    seq = scheduler.submit(prompt_ids, SamplingParams(max_tokens=16, temperature=0.0))
    for token in seq.tokens(): ...                  # as the scheduler samples them
    seq.cancel()                                    # a client went away: its blocks are freed

The requests' keys and values live in a paged cache (`ernie.paged_cache`): a pool of fixed blocks of
`block_tokens` slots, `kv_cache_tokens` in all. Each iteration of the scheduler's thread:
  1. frees the blocks of finished and cancelled requests;
  2. admits queued requests in arrival order while the batch has a row (`max_batch`) and the free blocks hold
     what the request computes before its first token (with prefix caching, a cached prefix's blocks are
     shared, not computed); the others wait in the queue;
  3. runs ONE forward: a token for every decoding request and the next chunk of the admitted prompts
     (`prefill_chunk_tokens` in all; a longer prompt goes on in the next forwards), laid end to end. Requests
     take blocks as they grow; when none is free, the latest arrivals are preempted: their blocks go back and
     they are queued again, to compute their tokens again when readmitted. Every request whose step or prompt
     is done samples with its own parameters and generator, and the finished ones (eos, max_tokens) leave.
     Nobody's cache moves when a request joins or leaves. With `compile_decode`, a forward with no prompt in it
     runs as `ernie.compiled_decode`'s one compiled graph instead (compiled when the scheduler starts).

A request's tokens go out on its own queue, or to its listener (an event loop's reader: `stages.serve.delivery`);
`Engine.stream` / `Engine.astream` turn them into text deltas. Requests are independent: a request's logits
depend only on its own tokens (attention reads its own blocks, MoE routing is per token), and each request
samples from its own generator, so a seeded request draws the same tokens batched or alone.

Prefill/decode disaggregation (stages/serve/pd.py) splits a request across engines on one code path:
`submit_prefill` runs a prompt up to the first token and hands back a `Prefilled` (the request's
cache, first token and generator state) instead of decoding; `submit_prefilled` admits such a
request on another engine under the same rules, restoring its cache instead of computing it, so it
decodes exactly as it would have where it was prefilled.
"""

from __future__ import annotations

import math
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
from ernie.compiled_decode import CompiledDecode
from ernie.generation import sample_next, without_vision_tokens
from ernie.paged_cache import ROOT_SERIAL, BlockPool, PagedBatch, Segment

from . import delivery


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
    """The prompt's cache: per-layer keys and values [1, kv_heads, prompt tokens, head_dim] and the next RoPE
    position (for VL prompts the position after the images' 3D positions)."""
    generator_state: torch.Tensor | None = None
    """The request's seeded generator after drawing the first token."""
    vision: dict | None = None
    """A VL prompt's image inputs: should the decoding engine have to preempt the request, it computes the
    cache again from them and the tokens."""
    cached_tokens: int = 0
    """Prompt tokens the prefilling engine took from its prefix cache."""

    @property
    def finished(self) -> bool:
        """The first token already ends the request: nothing is left to decode."""
        return self.first_token == self.eos or self.params.max_tokens <= 1

    def _tensors(self) -> list:
        found = [t for v in self.cache.values() for t in (v if isinstance(v, list) else [v])]
        return [*found, *(self.vision or {}).values()]

    @property
    def nbytes(self) -> int:
        sizes = []
        for t in self._tensors():
            if isinstance(t, _Packed):
                sizes.append(t.data.nbytes)
            elif t is not None:
                sizes.append(t.numel() * t.element_size())
        return sum(sizes)

    def arrays(self) -> list[np.ndarray]:
        """The byte arrays of a received handoff (empty before pickling): read-only when they are views
        of Ray's object store, i.e. when it came zero-copy."""
        return [p.data for p in [*self._tensors(), self.generator_state] if isinstance(p, _Packed)]

    def restore_cache(self, device) -> KVCache:
        state = _map_cache(self.cache, lambda t: _unpack(t, device))
        cache = KVCache(len(state["keys"]))
        cache.keys, cache.values, cache.next_position = state["keys"], state["values"], state["next_position"]
        return cache

    def restore_vision(self, device) -> dict | None:
        return None if self.vision is None else {k: _unpack(v, device) for k, v in self.vision.items()}

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
        if self.vision is not None:
            state["vision"] = {k: v if isinstance(v, _Packed) else _pack(v) for k, v in self.vision.items()}
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
        """Told each token (or the error) as it goes out, instead of the request's own queue: for readers that
        cannot block on a queue (an event loop: `stages.serve.delivery`)."""
        self.arrival = 0
        """Its place in the order requests came in: the later, the sooner it is preempted."""
        self.blocks: list[int] = []
        """Its KV blocks in the scheduler's pool (its first ones maybe shared: prefix caching)."""
        self.done = 0
        """Tokens whose keys/values are in its blocks."""
        self.next_position: int | None = None
        """RoPE position of the next token it feeds the model."""
        self.registered = 0
        """Its first blocks registered for prefix caching (or shared from the cache)."""
        self.chain = ROOT_SERIAL
        """The serial its next registered block chains on."""
        self.cached_tokens: int | None = None
        """Prompt tokens its first admission took from cached blocks (None until admitted)."""
        self.admitted_at = 0
        """The scheduler's count of decode forwards when it was last admitted (`prompt_wait_steps`)."""
        self._out: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def finished(self) -> bool:
        done = self.tokens_so_far and (self.tokens_so_far[-1] == self.eos)
        return self.cancelled or bool(done) or len(self.tokens_so_far) >= self.params.max_tokens

    @property
    def feed_length(self) -> int:
        """Tokens a prefill runs before it samples: the prompt, and after a preemption the tokens made so far."""
        return len(self.prompt_ids) + len(self.tokens_so_far)

    def ids(self, start: int, stop: int) -> list[int]:
        """Its token ids at positions [start, stop): the prompt's, then the generated ones."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        return (self.prompt_ids + self.tokens_so_far)[start:stop]

    def cancel(self) -> None:
        """Stop generating (a no-op once finished); the scheduler frees the rows at its next step."""
        self.cancelled = True

    def tokens(self) -> Iterator[int]:
        """The generated tokens as they come, up to eos or max_tokens; a scheduler error is raised here. (A request
        with a `listener` has them told to that instead.)"""
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
        if self.listener is None:
            self._out.put(item)
            return
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


DEFAULT_BLOCK_TOKENS = 16
DEFAULT_PREFILL_CHUNK_TOKENS = 512


@dataclass
class SchedulerStats:
    """What the scheduler did, for tests and benchmarks."""

    decode_steps: int = 0
    prefills: int = 0
    max_batch: int = 0
    """Most requests one decode step advanced."""
    max_cached_tokens: int = 0
    """Most token slots held at once (whole blocks, prompts included); never above the budget."""
    row_steps: int = 0
    """Requests summed over decode steps (row_steps / decode_steps: the mean batch)."""
    handed_off: int = 0
    """Prefills handed to another engine (`submit_prefill`)."""
    taken_over: int = 0
    """Requests admitted with a cache prefilled elsewhere (`submit_prefilled`)."""
    preemptions: int = 0
    """Requests that gave their blocks back to let older ones grow (their cache is computed again)."""
    prefix_hit_tokens: int = 0
    """Prompt tokens whose keys and values came from cached blocks instead of a prefill."""
    compiled_steps: int = 0
    """Decode steps run by the compiled decode step (`compile_decode`)."""


def sample_rows(logits_BV: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Next token of each row: argmax for greedy rows, else each row's own sampling and generator."""
    # max().indices is argmax (the first of equal maxima), several times faster on CPU (bf16 most)
    greedy = logits_BV.max(dim=-1).indices.tolist()
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
    def __init__(
        self,
        model,
        kv_cache_tokens: int,
        max_batch: int,
        prefix_caching: bool = True,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        compile_decode: bool = False,
        prompt_wait_steps: int = 0,
    ) -> None:
        """`kv_cache_tokens`: the KV budget in token slots (rounded up to whole blocks of `block_tokens`);
        `prefill_chunk_tokens`: prompt tokens one forward takes beside the decode rows (longer prompts go in
        chunks over several steps); `prefix_caching`: text requests share the blocks of a prefix computed before;
        `compile_decode`: steps with no prompt in them run `ernie.compiled_decode` (compiled here, before any
        request: CUDA graphs on a GPU); `prompt_wait_steps`: a prompt admitted while requests decode waits up to this
        many decode steps for later prompts to run with it (`_prompts_join`)."""
        if kv_cache_tokens < 1 or max_batch < 1 or block_tokens < 1 or prefill_chunk_tokens < 1:
            raise ValueError(
                f"kv_cache_tokens={kv_cache_tokens}, max_batch={max_batch}, block_tokens={block_tokens} and "
                f"prefill_chunk_tokens={prefill_chunk_tokens} must all be at least 1"
            )
        if prompt_wait_steps < 0:
            raise ValueError(f"prompt_wait_steps={prompt_wait_steps} must be at least 0")
        self.model, self.config = model, model.config
        self.kv_cache_tokens, self.max_batch = kv_cache_tokens, max_batch
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prompt_wait_steps = prompt_wait_steps
        self._decode_forwards = 0
        """Forwards that decoded so far (never reset, unlike `stats`): what a waiting prompt's wait is counted in."""
        self.prefix_caching = prefix_caching
        self.pool = BlockPool.for_model(model, math.ceil(kv_cache_tokens / block_tokens), block_tokens)
        self.watermark = max(1, self.pool.num_blocks // 100)
        """Free blocks kept back from admission while requests run, for them to grow into."""
        self.device = next(model.parameters()).device
        self.compiled: CompiledDecode | None = None
        if compile_decode:
            self.compiled = CompiledDecode(model, self.pool, "reduce-overhead" if self.device.type == "cuda" else None)
        self.stats = SchedulerStats()
        self._arrivals = 0
        self._waiting: deque[Sequence] = deque()
        """Not admitted yet (or preempted), in arrival order."""
        self._prefilling: list[Sequence] = []
        """Admitted, their prompt (partly) still to run."""
        self._running: list[Sequence] = []
        """Decoding: one token each per forward."""
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        if self.compiled is not None:  # compiled before any request, in the thread that runs the steps
            self._compiling: Future = Future()
            self._start()
            self._compiling.result()  # what compiling raised, raised here

    @property
    def batch_size(self) -> int:
        """Requests decoding now."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Requests waiting for admission (new ones, and preempted ones to be computed again) or with their prompt
        still running: the queue depth /metrics and the role controller read."""
        return len(self._waiting) + len(self._prefilling)

    @property
    def cached_tokens(self) -> int:
        """Token slots of the blocks requests hold now."""
        return self.pool.used_blocks * self.pool.block_size

    @property
    def prefix_cached_tokens(self) -> int:
        """Token slots of cached blocks nobody holds: prefixes kept in the pool's free room."""
        return self.pool.cached_blocks * self.pool.block_size

    @property
    def prefix_hit_tokens(self) -> int:
        return self.stats.prefix_hit_tokens

    @property
    def preemptions(self) -> int:
        return self.stats.preemptions

    @property
    def decode_steps(self) -> int:
        return self.stats.decode_steps

    @property
    def compiled_steps(self) -> int:
        return self.stats.compiled_steps

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        vision: dict | None = None,
        listener: Callable[[int | BaseException], None] | None = None,
    ) -> Sequence:
        """Queue a request (checked by the engine: it fits the context and the budget alone). `listener`: see
        `Sequence.listener`."""
        seq = Sequence(prompt_ids, params, vision, self.config.eos_token_id, self.device)
        seq.listener = listener
        return self._queue(seq)

    def submit_prefill(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None = None
    ) -> Future[Prefilled]:
        """Queue a request to be prefilled only: its prompt runs and its first token is drawn as for
        `submit`, then it is handed back (for another engine's `submit_prefilled`) instead of decoding
        here. It takes no batch row."""
        seq = Sequence(prompt_ids, params, vision, self.config.eos_token_id, self.device)
        seq.handoff = Future()
        self._queue(seq)
        return seq.handoff

    def submit_prefilled(
        self, prefilled: Prefilled, listener: Callable[[int | BaseException], None] | None = None
    ) -> Sequence:
        """Queue a request prefilled elsewhere: admitted as `submit` admits (batch rows, KV room, in
        order), its cache restored, its first token (emitted first, as `submit`'s) the prefill's, and its
        generator where the prefill left it. `listener`: see `Sequence.listener`."""
        vision = prefilled.restore_vision(self.device)
        seq = Sequence(prefilled.prompt_ids, prefilled.params, vision, self.config.eos_token_id, self.device)
        seq.prefilled, seq.listener = prefilled, listener
        if prefilled.generator_state is not None:
            seq.generator = prefilled.restore_generator(self.device)
        return self._queue(seq)

    def _queue(self, seq: Sequence) -> Sequence:
        longest = len(seq.prompt_ids) + (0 if seq.handoff is not None else seq.params.max_tokens - 1)
        if self.pool.blocks_for(longest) > self.pool.num_blocks:
            raise ValueError(
                f"a request of {len(seq.prompt_ids)} + {seq.params.max_tokens} tokens never fits the KV budget"
            )
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._thread is None:
                self._start()
            self._arrivals += 1
            seq.arrival = self._arrivals
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
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="serve-scheduler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with torch.inference_mode():
            if self.compiled is not None:  # CUDA graphs are recorded and replayed per thread: this one's
                try:
                    self.compiled.warm_up()
                except BaseException as err:  # noqa: BLE001 - the constructor raises it
                    failure = RuntimeError(f"compiling the decode step (serve.compile_decode) failed: {err!r}")
                    failure.__cause__ = err
                    self._compiling.set_exception(failure)
                    return
                self._compiling.set_result(None)
            while True:
                with self._wake:
                    while not (self._closed or self._waiting or self._running or self._prefilling):
                        self._wake.wait()
                    if self._closed:
                        break
                self.step()
        with delivery.batched():
            closed = RuntimeError("the serving engine was closed")
            self._fail([*self._running, *self._prefilling, *self._waiting], closed)

    def step(self) -> None:
        """One iteration: free what finished, admit what fits, run one forward for every admitted request. Its
        tokens reach readers on an event loop in one wake-up (`delivery.batched`)."""
        with delivery.batched():
            self._step()

    def _step(self) -> None:
        try:
            self._remove_finished()
            self._admit()
            if self._running or self._prefilling:
                self._forward()
        except Exception as err:  # noqa: BLE001 - the requests get the error, the server keeps running
            failed = [*self._running, *self._prefilling]
            self._fail(failed, err)
            for seq in failed:
                self._release(seq)
            self._running, self._prefilling = [], []

    def _admit(self) -> None:
        """Take queued requests in order while they fit. Text prompts wait in `_prefilling` for the next forward
        (with the blocks of a cached prefix already theirs); a request prefilled elsewhere decodes on its restored
        cache, an image prompt is prefilled alone now."""
        while (seq := self._next_admitted()) is not None:
            try:
                if seq.prefilled is not None:
                    self._restore(seq)
                elif seq.vision:
                    self._prefill_alone(seq)
                else:
                    self._prefilling.append(seq)
            except Exception as err:  # noqa: BLE001 - a bad request (e.g. its vision inputs) fails alone
                self._fail([seq], err)
                self._release(seq)

    def _next_admitted(self) -> Sequence | None:
        """The first queued request, taken off the queue if the batch has a row for it (unless it is
        prefill-only) and the free blocks hold what it must compute before it samples (beside what the admitted
        prompts still need, and the watermark); None: nothing more can be admitted now. Its blocks grow as it
        decodes; should the pool run short, the latest requests give theirs back (`_preempt`)."""
        with self._wake:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            if not self._waiting:
                return None
            seq = self._waiting[0]
            rows = len(self._running) + sum(1 for s in self._prefilling if s.handoff is None)
            if seq.handoff is None and rows >= self.max_batch:
                return None
            cached = self._cached_prefix(seq)
            tokens = seq.feed_length if seq.prefilled is None else seq.prefilled.cache["keys"][0].shape[2]
            pending = sum(self.pool.blocks_for(s.feed_length) - len(s.blocks) for s in self._prefilling)
            # a cached block nobody holds counts as free until this request holds it
            need = self.pool.blocks_for(tokens) - len(cached) + sum(self.pool.holders(b) == 0 for b in cached)
            busy = self._running or self._prefilling
            if need + pending + (self.watermark if busy else 0) > self.pool.free_blocks:
                return None  # it waits (in order) until running requests finish
            self._waiting.popleft()
        seq.done, seq.next_position = 0, 0
        seq.admitted_at = self._decode_forwards
        if cached:
            self.pool.share(cached)
            seq.blocks, seq.registered = list(cached), len(cached)
            seq.chain = self.pool.serial(cached[-1])
            seq.done = seq.next_position = len(cached) * self.pool.block_size
            self.stats.prefix_hit_tokens += seq.done
        if seq.cached_tokens is None:  # a readmission after a preemption is the server's business, not usage
            seq.cached_tokens = seq.done
        return seq

    def _cacheable(self, seq: Sequence) -> bool:
        """Image prompts' keys depend on the pixels, not only on the ids: never shared."""
        return self.prefix_caching and not seq.vision

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the first tokens a text request computes, leaving it one to compute (its next
        token's logits need one)."""
        if not self._cacheable(seq) or seq.prefilled is not None:
            return []
        feed = seq.feed_length
        return self.pool.match(seq.ids(0, feed), (feed - 1) // self.pool.block_size)

    def _grow(self, seq: Sequence, tokens: int) -> list[int]:
        """The request's blocks, enough for `tokens` (the caller made sure the pool has them)."""
        missing = self.pool.blocks_for(tokens) - len(seq.blocks)
        if missing > 0:
            seq.blocks += self.pool.allocate(missing)
            self.stats.max_cached_tokens = max(self.stats.max_cached_tokens, self.cached_tokens)
        return seq.blocks

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.registered, seq.chain = [], 0, ROOT_SERIAL

    def _register(self, seq: Sequence) -> None:
        """Register the request's blocks its computed tokens fill, for later requests to share."""
        bs = self.pool.block_size
        while seq.registered < seq.done // bs:
            i = seq.registered
            seq.chain = self.pool.register(seq.blocks[i], seq.chain, seq.ids(i * bs, (i + 1) * bs))
            seq.registered += 1

    def _preempt(self, seq: Sequence) -> None:
        """Give a request's blocks back and queue it again ahead of later arrivals: readmitted, it computes its
        prompt and the tokens it made so far again (from cached blocks where they are still there) and goes on
        with its next token; nothing it sent is sent again, its generator is where it was."""
        self.stats.preemptions += 1
        self._release(seq)
        seq.done, seq.next_position = 0, None
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._prefilling.remove(seq)
        with self._wake:
            at = 0
            while at < len(self._waiting) and self._waiting[at].arrival < seq.arrival:
                at += 1
            self._waiting.insert(at, seq)

    def _restore(self, seq: Sequence) -> None:
        """A request prefilled elsewhere: its cache into its blocks, its first token out."""
        prefilled, seq.prefilled = seq.prefilled, None  # its buffers (maybe object store memory) can go
        cache = prefilled.restore_cache(self.device)
        keys, values = [k[0] for k in cache.keys], [v[0] for v in cache.values]
        self.pool.write(self._grow(seq, keys[0].shape[1]), 0, keys, values)
        seq.done, seq.next_position = keys[0].shape[1], int(cache.next_position[0])
        if self._cacheable(seq):
            self._register(seq)
        self.stats.taken_over += 1
        self._started(seq, prefilled.first_token)

    def _prefill_alone(self, seq: Sequence) -> None:
        """An image prompt (after a preemption: with the tokens made so far): one forward of its own (its
        embeddings and 3D positions need its pixels)."""
        n = seq.feed_length
        batch = PagedBatch(self.pool, [Segment(self._grow(seq, n), 0, n)])
        vision = {k: v.to(self.device) for k, v in seq.vision.items()}
        logits = self.model(torch.tensor([seq.ids(0, n)], device=self.device), cache=batch, **vision).logits[0]
        seq.done, seq.next_position = n, batch.next_positions[0]
        self.stats.prefills += 1
        self._prompt_done(seq, sample_rows(without_vision_tokens(logits, self.config), [seq])[0])

    def _plan(self) -> list[tuple[Sequence, int]]:
        """Who advances in this forward and by how many tokens, with their blocks allocated: every decoding request
        by one, the waiting prompts by their next chunks (`prefill_chunk_tokens` in all). Requests are served in
        arrival order; when the pool runs short, the latest ones are preempted, and the latest prompt takes the
        chunk its room holds."""
        bs, budget, plan = self.pool.block_size, self.prefill_chunk_tokens, []
        if not self._prompts_join():
            budget = 0  # the prompts stay admitted (and preemptible) but run in a later forward
        order = sorted([*self._running, *self._prefilling], key=lambda s: s.arrival)
        decoding = set(map(id, self._running))
        i = 0
        while i < len(order):
            seq = order[i]
            n = 1 if id(seq) in decoding else min(seq.feed_length - seq.done, budget)
            if n <= 0:
                i += 1
                continue
            while self.pool.blocks_for(seq.done + n) - len(seq.blocks) > self.pool.free_blocks and order[-1] is not seq:
                self._preempt(order.pop())
            if self.pool.blocks_for(seq.done + n) - len(seq.blocks) > self.pool.free_blocks:
                if id(seq) in decoding:  # the latest request itself: it waits for room
                    self._preempt(order.pop())
                    break
                n = (len(seq.blocks) + self.pool.free_blocks) * bs - seq.done
                if n <= 0:
                    break
            self._grow(seq, seq.done + n)
            if id(seq) not in decoding:
                budget -= n
            plan.append((seq, n))
            i += 1
        return plan

    def _prompts_join(self) -> bool:
        """Whether this forward takes prompt chunks. A forward with a prompt in it is the paged forward, one of
        decode rows alone may be the compiled step: with `prompt_wait_steps`, prompts that come one after another
        gather and run in one forward, and the decode steps between them stay plain. A prompt joins at once when
        nothing decodes, else once the oldest waiting one has waited `prompt_wait_steps` decode steps (a prompt in
        chunks goes on: it waited already). A full batch does not cut the wait short: its rows free up as requests
        end, and the prompts that take them run with the waiting ones."""
        if not self._prefilling or not self._running or self.prompt_wait_steps == 0:
            return True
        oldest = min(seq.admitted_at for seq in self._prefilling)
        return self._decode_forwards - oldest >= self.prompt_wait_steps

    def _forward(self) -> None:
        """One model call: a token for every decoding request and the next chunk of waiting prompts, laid end to
        end (decoding ones first); then each request whose prompt or step is done samples."""
        plan = self._plan()
        if not plan:
            return
        running = set(map(id, self._running))
        decoding = [seq for seq, _ in plan if id(seq) in running]
        advanced = [(seq, 1) for seq in decoding] + [(seq, n) for seq, n in plan if id(seq) not in running]
        ids = [seq.tokens_so_far[-1] for seq in decoding]
        if self.compiled is not None and len(decoding) == len(advanced):  # a plain decode step
            positions = [seq.next_position for seq in decoding]
            logits = self.compiled(ids, positions, [seq.blocks for seq in decoding], [seq.done + 1 for seq in decoding])
            next_positions = [p + 1 for p in positions]
            self.stats.compiled_steps += 1
        else:
            for seq, n in advanced[len(decoding) :]:
                ids.extend(seq.ids(seq.done, seq.done + n))
            segments = [Segment(seq.blocks, seq.done, n, seq.next_position) for seq, n in advanced]
            batch = PagedBatch(self.pool, segments)
            logits = self.model(torch.tensor([ids], device=self.device), cache=batch).logits[0]
            next_positions = batch.next_positions
        logits = without_vision_tokens(logits, self.config)

        for (seq, n), position in zip(advanced, next_positions, strict=True):
            seq.done, seq.next_position = seq.done + n, position
            if self._cacheable(seq):
                self._register(seq)
        # decoding requests sample, and the prompts whose last chunk this was (decoding ones come first)
        rows = [i for i, (seq, _) in enumerate(advanced) if i < len(decoding) or seq.done >= seq.feed_length]
        tokens = sample_rows(logits[rows] if len(rows) < len(advanced) else logits, [advanced[i][0] for i in rows])
        prompted = [advanced[i][0] for i in rows[len(decoding) :]]
        if decoding:
            self._decode_forwards += 1
            self.stats.decode_steps += 1
            self.stats.max_batch = max(self.stats.max_batch, len(decoding))
            self.stats.row_steps += len(decoding)
        for seq, token in zip(decoding, tokens, strict=False):
            if not seq.cancelled:
                seq._emit(token, self.stats.decode_steps)
        self._prefilling = [seq for seq in self._prefilling if seq not in prompted]
        for seq, token in zip(prompted, tokens[len(decoding) :], strict=True):
            self.stats.prefills += 1
            self._prompt_done(seq, token)
        self._remove_finished()

    def _prompt_done(self, seq: Sequence, token: int) -> None:
        """A request's prompt is computed and `token` drawn from its last logits. After a preemption that is the
        request's next token, as its decode step would have drawn it."""
        if not seq.tokens_so_far:
            self._started(seq, token)
            return
        if not seq.cancelled:
            seq._emit(token, self.stats.decode_steps)
        if seq.finished:
            self._release(seq)
        else:
            self._running.append(seq)

    def _started(self, seq: Sequence, first: int) -> None:
        """A request's prompt is in its blocks and its first token drawn: hand it over, or emit it and decode."""
        if seq.handoff is not None:
            self.stats.handed_off += 1
            state = None if seq.generator is None else seq.generator.get_state()
            vision = {k: v.cpu() for k, v in seq.vision.items()} or None
            handoff = Prefilled(seq.prompt_ids, seq.params, first, seq.eos, self._export(seq), state, vision)
            handoff.cached_tokens = seq.cached_tokens or 0
            self._release(seq)
            seq.handoff.set_result(handoff)
            return
        seq._emit(first, self.stats.decode_steps)
        if seq.finished:
            self._release(seq)
        else:
            self._running.append(seq)

    def _export(self, seq: Sequence) -> dict:
        """The request's cache (`Prefilled.cache`): what another engine restores."""
        keys, values = self.pool.read(seq.blocks, seq.done)
        return {
            "keys": [k[None].cpu() for k in keys],
            "values": [v[None].cpu() for v in values],
            "next_position": torch.tensor([seq.next_position]),
        }

    def _remove_finished(self) -> None:
        # `finished` is read once per request: a client may cancel between two reads, and a request dropped
        # from its group without being released would hold its blocks for good
        for group in ("_running", "_prefilling"):
            seqs = getattr(self, group)
            done = {id(seq) for seq in seqs if seq.finished}
            if done:
                for seq in seqs:
                    if id(seq) in done:
                        self._release(seq)
                setattr(self, group, [s for s in seqs if id(s) not in done])

    @staticmethod
    def _fail(seqs: list[Sequence], err: Exception) -> None:
        for seq in seqs:
            seq._fail(err)
