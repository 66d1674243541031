"""Prefill/decode disaggregation (PD) on Ray, with roles that follow the load.

    engine = PDEngine.load(model_dir, tokenizer_path, workers=3, prefill_workers=1)
    for delta in engine.stream(engine.encode("2+3="), max_tokens=8, temperature=0.0): ...
    engine.stats(), engine.role_switches

`PDEngine` is what `OpenAIServer` uses of an `Engine` (the same `EngineFront`: tokenizer, checks, text
deltas), but its tokens come from worker actors (`PDWorker`), each a whole `Engine` with the model
loaded once. A worker's role is the router's (this object's) business, not the worker's; any worker
serves whatever it is sent. A request:

  1. goes to the least-loaded prefill worker, whose scheduler prefills it alone and draws its first
     token (`Scheduler.submit_prefill`, the colocated code path up to the first token);
  2. the handoff (`Prefilled`: the prompt's K/V, first token, generator state, RoPE position) is
     `ray.put` by that worker, and only its ObjectRef comes back, inside a list so that Ray passes it
     on unresolved: the K/V never travel through the router or the actor call's arguments;
  3. the least-loaded decode worker fetches it from the object store (on one node a mapping of shared
     memory: the tensors travel as numpy byte arrays, which Ray reads zero-copy; torch tensors it would
     copy) and decodes it in its running batch (`Scheduler.submit_prefilled`), streaming tokens back
     through a Ray streaming generator. Closing the client's stream cancels that generator, which
     frees the request's rows on the worker.

Tokens are those of colocated serving: the same prefill, the same first draw, the generator carried
over, and decoding is per row. Loads are counted by the router (requests sent and not done, per
worker); a controller thread applies `RoleSwitchPolicy` (stages/serve/roles.py) every `interval_s`.
Switching drops nothing: the router only stops sending the old role's work to the worker, whose
scheduler finishes what it has (in arrival order) while it takes the new role's.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from .delivery import LoopThread, outbox
from .engine import DEFAULT_KV_CACHE_TOKENS, DEFAULT_MAX_BATCH, Engine, EngineFront, load_front
from .roles import DECODE, PREFILL, ROLES, RoleSwitch, RoleSwitchPolicy, WorkerLoad, decide
from .scheduler import DEFAULT_BLOCK_TOKENS, DEFAULT_PREFILL_CHUNK_TOKENS, SamplingParams

REPORT_TTL_S = 0.5
"""Worker-reported loads (`stats`, metrics gauges) are at most this old."""
AFFINITY_SLACK = 2
"""Prefills in flight a prompt's own prefill worker may have beyond the least-loaded one's before the prompt goes
to the least-loaded (its cached prefix is worth less than the wait)."""


@dataclass
class PrefillHead:
    """What a prefill returns to the router: the first token now, the handoff only by reference."""

    first_token: int
    finished: bool
    """The first token ends the request (eos, or max_tokens 1): there is no handoff."""
    handoff: list | None
    """[ObjectRef of the `Prefilled`], put by the prefill worker; a list, so Ray does not resolve it."""
    nbytes: int = 0
    cached_tokens: int = 0
    """Prompt tokens the prefill worker took from its prefix cache."""


@ray.remote
class PDWorker:
    """One engine serving prefill and decode requests alike (an asyncio actor: its methods await the
    scheduler's thread, so many run at once)."""

    def __init__(
        self,
        model_dir: str,
        tokenizer_path: str,
        dtype: torch.dtype | None,
        device: str,
        threads: int,
        scheduling: dict,
    ) -> None:
        torch.set_num_threads(threads)
        self.engine = Engine.load(model_dir, tokenizer_path, dtype, device, **scheduling)
        self.received: deque[dict] = deque(maxlen=1024)
        """How each handoff arrived (tests, debugging): as an ObjectRef, zero-copy, its size."""

    def info(self) -> dict:
        s = self.engine.scheduler
        return {"config": self.engine.config, "kv_cache_tokens": s.kv_cache_tokens, "max_batch": s.max_batch}

    def load(self) -> dict:
        s = self.engine.scheduler
        return {
            "queued": s.queued,
            "running": s.batch_size,
            "cached_tokens": s.cached_tokens,
            "prefills": s.stats.prefills,
            "handed_off": s.stats.handed_off,
            "taken_over": s.stats.taken_over,
            "decode_steps": s.stats.decode_steps,
            "compiled_steps": s.stats.compiled_steps,
            "max_batch_seen": s.stats.max_batch,
            "prefix_cached_tokens": s.prefix_cached_tokens,
            "prefix_hit_tokens": s.prefix_hit_tokens,
            "preemptions": s.preemptions,
        }

    def transport_log(self) -> list[dict]:
        return list(self.received)

    async def prefill(self, prompt_ids: list[int], params: SamplingParams, vision: dict | None) -> PrefillHead:
        prefilled = await asyncio.wrap_future(self.engine.scheduler.submit_prefill(prompt_ids, params, vision))
        if prefilled.finished:
            return PrefillHead(prefilled.first_token, True, None, cached_tokens=prefilled.cached_tokens)
        return PrefillHead(
            prefilled.first_token, False, [ray.put(prefilled)], prefilled.nbytes, prefilled.cached_tokens
        )

    @ray.method(num_returns="streaming")
    async def decode(self, handoff: list) -> AsyncIterator[list[int]]:
        """The tokens after the first (the router has that one), in lists of what is ready. Cancelling
        the call (`ray.cancel`) ends it at its next await and frees the request's rows."""
        ref = handoff[0]
        by_ref = isinstance(ref, ray.ObjectRef)
        prefilled = await ref if by_ref else ref
        arrays = prefilled.arrays()
        zero_copy = bool(arrays) and not any(a.flags.writeable for a in arrays)
        self.received.append({"object_ref": by_ref, "zero_copy": zero_copy, "nbytes": prefilled.nbytes})
        out: asyncio.Queue = asyncio.Queue()
        seq = self.engine.scheduler.submit_prefilled(prefilled, outbox(asyncio.get_running_loop()).sender(out))
        del prefilled, arrays, ref  # the scheduler drops its copy once the cache is restored
        got, done = 0, False
        try:
            while not done:
                items = [await out.get()]
                while not out.empty():
                    items.append(out.get_nowait())
                tokens = []
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    got += 1
                    if got > 1:
                        tokens.append(item)
                    done = item == seq.eos or got >= seq.params.max_tokens
                if tokens:
                    yield tokens
        finally:
            seq.cancel()  # a no-op once finished

    def close(self) -> None:
        self.engine.close()


class _SchedulerView:
    """What app.py and metrics.py read of `engine.scheduler`, over all workers (as last reported)."""

    def __init__(self, engine: PDEngine) -> None:
        self._engine = engine
        self.max_batch: int = engine.max_batch
        """One worker's batch: app.py sizes its per-request reader threads by it."""

    def _sum(self, key: str) -> int:
        return sum(report.get(key, 0) for report in self._engine._reports())

    @property
    def kv_cache_tokens(self) -> int:
        return self._engine.kv_cache_tokens * len(self._engine._workers)

    @property
    def batch_size(self) -> int:
        return self._sum("running")

    @property
    def cached_tokens(self) -> int:
        return self._sum("cached_tokens")

    @property
    def queued(self) -> int:
        return self._sum("queued")

    @property
    def prefix_cached_tokens(self) -> int:
        return self._sum("prefix_cached_tokens")

    @property
    def prefix_hit_tokens(self) -> int:
        return self._sum("prefix_hit_tokens")

    @property
    def preemptions(self) -> int:
        return self._sum("preemptions")

    @property
    def decode_steps(self) -> int:
        return self._sum("decode_steps")

    @property
    def compiled_steps(self) -> int:
        return self._sum("compiled_steps")


class PDEngine(EngineFront):
    """Colocated `Engine`'s interface over `workers` Ray actors, `prefill_workers` of them prefilling at
    first. Each asks for `worker_cpus` / `worker_gpus` (a GPU worker loads its model on cuda)."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer_path: str | Path,
        workers: int = 2,
        prefill_workers: int = 1,
        worker_cpus: float = 1.0,
        worker_gpus: float = 0.0,
        dtype: torch.dtype | None = None,
        policy: RoleSwitchPolicy | None = None,
        kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefix_caching: bool = True,
        kv_block_tokens: int = DEFAULT_BLOCK_TOKENS,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        compile_decode: bool = False,
        pack_weights: bool = True,
        prompt_wait_steps: int = 0,
    ) -> None:
        if not 1 <= prefill_workers < workers:
            raise ValueError(f"prefill_workers={prefill_workers} of workers={workers}: each role needs a worker")
        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS when set, else a local Ray
        tokenizer, settings = load_front(model_dir, tokenizer_path)
        scheduling = {
            "kv_cache_tokens": kv_cache_tokens,
            "max_batch": max_batch,
            "kv_block_tokens": kv_block_tokens,
            "prefill_chunk_tokens": prefill_chunk_tokens,
            "compile_decode": compile_decode,
            "pack_weights": pack_weights,
            "prompt_wait_steps": prompt_wait_steps,
        }
        scheduling["prefix_caching"] = prefix_caching  # each worker its own pool and cache
        device = "cuda" if worker_gpus > 0 else "cpu"
        threads = max(1, math.floor(worker_cpus))
        options = {"num_cpus": worker_cpus, "num_gpus": worker_gpus}
        actors = [
            PDWorker.options(**options).remote(str(model_dir), str(tokenizer_path), dtype, device, threads, scheduling)
            for _ in range(workers)
        ]
        try:
            info = ray.get([a.info.remote() for a in actors])  # every worker has its model
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise
        self._init_front(tokenizer, info[0]["config"], str(model_dir), settings, kv_cache_tokens)
        self.max_batch, self.block_tokens = max_batch, kv_block_tokens
        self.policy = policy or RoleSwitchPolicy()
        """Read at every look of the controller: may be replaced while serving."""
        self.role_switches: list[RoleSwitch] = []
        self._actors = actors
        self._workers = [WorkerLoad(i, PREFILL if i < prefill_workers else DECODE) for i in range(workers)]
        self._lock = threading.Lock()
        self._turn = 0
        self._ttft: deque[tuple[float, float]] = deque(maxlen=4096)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=4096)
        self._requests = {"prefills": 0, "decodes": 0, "cancelled": 0}
        self._report_cache: tuple[float, list[dict]] = (-math.inf, [{} for _ in actors])
        self.scheduler = _SchedulerView(self)
        self._stop = threading.Event()
        self._controller = threading.Thread(target=self._control, name="pd-roles", daemon=True)
        self._controller.start()
        self._io = LoopThread("pd-io")
        """Where synchronous readers' requests (`stream`, `complete`) talk to the workers."""

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer_path: str | Path, **settings) -> PDEngine:
        """`Engine.load`'s counterpart (the workers load the model); `settings`: the constructor's."""
        return cls(model_dir, tokenizer_path, **settings)

    def close(self) -> None:
        """Stop the controller and the workers; requests still running get an error."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._controller.join()
        self._io.close()
        try:
            ray.get([a.close.remote() for a in self._actors], timeout=30)
        finally:
            for actor in self._actors:
                ray.kill(actor)

    # ------------------------------------------------------------------ serving
    def _tokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> Iterator[int]:
        return self._io.iterate(self._atokens(prompt_ids, params, vision, info))

    async def _atokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> AsyncIterator[int]:
        started = time.monotonic()
        worker = self._acquire(PREFILL, prompt_ids)
        try:
            head: PrefillHead = await self._actors[worker.index].prefill.remote(prompt_ids, params, vision)
        finally:
            self._release(worker, PREFILL)
        first_at = time.monotonic()
        self._observe(self._ttft, first_at, first_at - started)
        if info is not None:
            info["cached_tokens"] = head.cached_tokens
        if head.finished:
            yield head.first_token
            return
        worker = self._acquire(DECODE)
        count, ended, stream = 1, False, None
        try:
            stream = self._actors[worker.index].decode.remote(head.handoff)  # decoding starts as the first token goes
            first, head = head.first_token, None  # the decode call holds the handoff's reference now
            yield first
            async for ref in stream:
                for token in await ref:
                    count += 1
                    yield token
            ended = True
        finally:
            if not ended and stream is not None:
                with contextlib.suppress(Exception):  # a worker already gone has nothing left to free
                    ray.cancel(stream)  # the worker frees the rows
                with self._lock:
                    self._requests["cancelled"] += 1
            self._release(worker, DECODE)
            if ended and count > 1:
                now = time.monotonic()
                self._observe(self._tpot, now, (now - first_at) / (count - 1))

    def _acquire(self, role: str, prompt_ids: list[int] | None = None) -> WorkerLoad:
        """The least-loaded worker of `role` (ties taken in turn), its count raised. A prompt of a whole KV block or
        more goes by its first block to the same prefill worker each time (each worker has its own prefix cache),
        unless that worker has `AFFINITY_SLACK` more prefills in flight than the least-loaded one."""
        with self._lock:
            n = len(self._workers)
            candidates = [w for w in self._workers if w.role == role]
            worker = min(candidates, key=lambda w: (w.load, (w.index - self._turn) % n))
            if prompt_ids is not None and len(prompt_ids) >= self.block_tokens:
                preferred = candidates[hash(tuple(prompt_ids[: self.block_tokens])) % len(candidates)]
                if preferred.load <= worker.load + AFFINITY_SLACK:
                    worker = preferred
            self._turn = (worker.index + 1) % n
            if role == PREFILL:
                worker.prefills += 1
            else:
                worker.decodes += 1
            self._requests[f"{role}s"] += 1
            return worker

    def _release(self, worker: WorkerLoad, role: str) -> None:
        with self._lock:
            if role == PREFILL:
                worker.prefills -= 1
            else:
                worker.decodes -= 1

    def _observe(self, window: deque, now: float, value: float) -> None:
        with self._lock:
            window.append((now, value))

    def _median(self, window: deque, now: float) -> float | None:
        recent = [v for t, v in window if now - t <= self.policy.window_s]
        return statistics.median(recent) if recent else None

    # ------------------------------------------------------------------ roles
    def _control(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            now = time.monotonic()
            with self._lock:
                move = decide(
                    self.policy, self._workers, now, self._median(self._ttft, now), self._median(self._tpot, now)
                )
                if move is not None:
                    self._switch(*move)

    def set_role(self, index: int, role: str, reason: str = "set by hand") -> None:
        """Give worker `index` the role `role` now (no dwell applies); each role keeps a worker."""
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {ROLES}")
        with self._lock:
            worker = self._workers[index]
            if worker.role == role:
                return
            if sum(w.role == worker.role for w in self._workers) < 2:
                raise ValueError(f"worker {index} is the last {worker.role} worker")
            self._switch(worker, role, reason)

    def _switch(self, worker: WorkerLoad, role: str, reason: str) -> None:
        """(Under the lock.) From now on the router sends `role`'s work to it; what it has runs on."""
        self.role_switches.append(RoleSwitch(time.time(), worker.index, worker.role, role, reason))
        worker.role, worker.since = role, time.monotonic()

    @property
    def roles(self) -> list[str]:
        with self._lock:
            return [w.role for w in self._workers]

    # ------------------------------------------------------------------ observing
    def _reports(self) -> list[dict]:
        """Each worker's own `load()`, at most REPORT_TTL_S old (a worker that does not answer: its last)."""
        at, reports = self._report_cache
        now = time.monotonic()
        if now - at > REPORT_TTL_S:
            refs = [a.load.remote() for a in self._actors]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
            done = set(ready)
            reports = [ray.get(r) if r in done else old for r, old in zip(refs, reports, strict=True)]
            self._report_cache = (now, reports)
        return reports

    def worker_loads(self) -> list[dict]:
        """Each worker's own report, fetched now (tests wait on these)."""
        return ray.get([a.load.remote() for a in self._actors])

    def transport_logs(self) -> list[list[dict]]:
        """How the handoffs reached each worker (see `PDWorker.decode`)."""
        return ray.get([a.transport_log.remote() for a in self._actors])

    def stats(self) -> dict:
        """For /metrics: per role the workers, requests in flight (router), queued and running (workers'
        reports); the switches; recent TTFT / TPOT medians."""
        reports = self._reports()
        now = time.monotonic()
        with self._lock:
            workers = [
                {
                    "index": w.index,
                    "role": w.role,
                    "role_for_s": None if w.since == -math.inf else now - w.since,
                    "prefills_in_flight": w.prefills,
                    "decodes_in_flight": w.decodes,
                    **report,
                }
                for w, report in zip(self._workers, reports, strict=True)
            ]
            switches = list(self.role_switches)
            ttft, tpot, requests = self._median(self._ttft, now), self._median(self._tpot, now), dict(self._requests)

        def per_role(key: str) -> dict[str, int]:
            return {role: sum(w.get(key, 0) for w in workers if w["role"] == role) for role in ROLES}

        return {
            "workers": {role: sum(w["role"] == role for w in workers) for role in ROLES},
            "in_flight": {
                PREFILL: sum(w["prefills_in_flight"] for w in workers),
                DECODE: sum(w["decodes_in_flight"] for w in workers),
            },
            "queue_depth": per_role("queued"),
            "running": per_role("running"),
            "switches": len(switches),
            "switches_to": {role: sum(s.to_role == role for s in switches) for role in ROLES},
            "requests": requests,
            "ttft_p50_s": ttft,
            "tpot_p50_s": tpot,
            "per_worker": workers,
        }
