"""The serving engine: a loaded model + tokenizer that turns prompts into completions.

    engine = Engine.load("out/qckpt", "out/qckpt/tokenizer/tokenizer.json")
    result = engine.complete(engine.encode("2+3="), max_tokens=8, temperature=0.0)

Requests from any number of threads are batched continuously by the engine's `Scheduler`
(stages/serve/scheduler.py): each is prefilled alone, then joins the running batch, which takes
one KV-cached decode step per token for all its rows; the cached tokens stay within
`kv_cache_tokens` (a request waits in the queue until it fits) and the batch within `max_batch`
rows. `stream` turns a request's tokens into text deltas (stop strings end it early and free its
rows, as does closing the stream); `astream` is the same for readers on an event loop (the API
server), all of whose requests' tokens reach the loop in one wake-up per step (`stages.serve.delivery`).

`EngineFront` is what the API sees of an engine (tokenizer, checks, text deltas) over a source of
tokens (`_tokens`, and `_atokens` for an event loop); `Engine` draws them from its own scheduler,
`stages.serve.pd.PDEngine` from prefill and decode workers. `Engine.prefill` is the prefill half of a
request on its own: the handoff another engine's scheduler decodes on (`Scheduler.submit_prefilled`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from ernie.chat_template import SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN
from ernie.packed_linear import pack_decoder
from ernie.quant import is_quantized_dir, load_model

from .delivery import outbox
from .scheduler import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    Prefilled,
    SamplingParams,
    Scheduler,
)

DEFAULT_KV_CACHE_TOKENS = 65536
DEFAULT_MAX_BATCH = 64


class RequestError(ValueError):
    """A request the engine cannot serve (too long, ...): HTTP 400 with this message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Delta:
    """New text of a streamed completion; the last delta carries the whole `Completion`."""

    text: str
    completion: Completion | None = None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    """Generated tokens, the end-of-sentence token included when one was generated."""
    finish_reason: str  # "stop" (eos or a stop string) | "length"
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from the prefix cache (OpenAI's
    `usage.prompt_tokens_details.cached_tokens`)."""


def load_front(model_dir: str | Path, tokenizer_path: str | Path):
    """(tokenizer, image settings) as a server finds them: image bounds from the model's artifact, else
    from the artifact the tokenizer came from (the dataset: <artifact>/tokenizer/tokenizer.json)."""
    from tokenizers import Tokenizer

    from .images import find_image_settings

    settings = find_image_settings(Path(model_dir), Path(tokenizer_path).resolve().parents[1])
    return Tokenizer.from_file(str(tokenizer_path)), settings


class EngineFront:
    """What the API uses of an engine, over a source of tokens (`_tokens`): one implementation of the
    checks and of stop strings / held-back text, whichever engine (colocated or PD) makes the tokens."""

    def _init_front(self, tokenizer, config, model_dir: str, image_settings: dict | None, kv_cache_tokens: int):
        from .images import RequestImages  # images builds on this module's RequestError

        self.tokenizer, self.config, self.model_dir = tokenizer, config, model_dir
        self.quantized = bool(model_dir) and is_quantized_dir(model_dir)
        self.kv_cache_tokens = kv_cache_tokens
        self._drop = [t for t in SPECIAL_TOKENS if t not in (THINK_OPEN, THINK_CLOSE)]
        self.images = RequestImages(config, image_settings)
        """Request images -> widened prompt ids and vision inputs (resize bounds `image_settings`)."""

    def _tokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> Iterator[int]:
        """The request's tokens as they come; nothing may start before the first is asked for, and closing
        the iterator must free whatever the request holds."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it (BOS, think tags) become their ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, think tags kept (chat splits reasoning on them), pad/BOS/EOS dropped."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for token in self._drop:
            text = text.replace(token, "")
        return text

    def check(self, prompt_ids: list[int], max_tokens: int) -> None:
        """Refuse a request the model cannot serve (before any streaming starts)."""
        if not prompt_ids:
            raise RequestError("the prompt is empty", "prompt")
        limit = self.config.max_position_embeddings
        if len(prompt_ids) + max_tokens > limit:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context of {limit} tokens",
                "max_tokens",
            )
        if len(prompt_ids) + max_tokens > self.kv_cache_tokens:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the server's KV "
                f"cache budget of {self.kv_cache_tokens} tokens (serve.kv_cache_tokens)",
                "max_tokens",
            )

    def complete(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        vision: dict[str, torch.Tensor] | None = None,
        top_k: int = 0,
    ) -> Completion:
        """The whole completion; `vision`: pixel_values / image_grid_thw of the images in `prompt_ids`."""
        deltas = self.stream(prompt_ids, max_tokens, temperature, top_p, seed, stop, vision, top_k)
        with contextlib.closing(deltas):  # closing an unfinished stream frees its rows in the batch
            for delta in deltas:
                if delta.completion is not None:
                    return delta.completion
        raise AssertionError("a stream always ends with its completion")

    def stream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        vision: dict[str, torch.Tensor] | None = None,
        top_k: int = 0,
    ) -> Iterator[Delta]:
        """The completion as text deltas, the last carrying the `Completion`. Text that could still
        turn out to begin a stop string, or an unfinished UTF-8 character, is held back until it
        cannot, so the deltas always add up to the final text. A request that cannot be served is
        refused here (`RequestError`); it is queued when the stream is first read."""
        params, stop = self._request(prompt_ids, max_tokens, temperature, top_p, seed, stop, top_k)
        return self._deltas(prompt_ids, params, stop, vision)

    def _request(self, prompt_ids, max_tokens, temperature, top_p, seed, stop, top_k) -> tuple[SamplingParams, list]:
        """A checked request's sampling parameters and its non-empty stop strings (`stream`'s and `astream`'s)."""
        self.check(prompt_ids, max_tokens)
        return SamplingParams(max_tokens, temperature, top_p, top_k, seed), [s for s in (stop or []) if s]

    def tokens(self, prompt_ids: list[int], params: SamplingParams, vision: dict | None = None) -> Iterator[int]:
        """The request's token ids as they come (eos included), for callers that detokenize themselves
        (benchmarks, tests); checked as `stream` checks, queued when first read, freed when closed."""
        self.check(prompt_ids, params.max_tokens)
        return self._tokens(prompt_ids, params, vision)

    def _deltas(self, prompt_ids: list[int], params: SamplingParams, stop: list[str], vision) -> Iterator[Delta]:
        info: dict = {}  # the token source notes the request's cached prompt tokens here
        tokens = self._tokens(prompt_ids, params, vision, info)
        text = _TextDeltas(self, len(prompt_ids), stop, info)
        try:
            for token in tokens:
                delta = text.push(token)
                if text.stopped:
                    tokens.close()  # before the last delta: the rows are freed even if nobody reads on
                if delta is not None:
                    yield delta
                if text.finished:
                    return
            yield text.end()
        finally:
            tokens.close()  # a no-op once finished; a closed stream (client gone) leaves the batch

    # ------------------------------------------------------------------ asyncio
    async def _atokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> AsyncIterator[int]:
        """`_tokens` for a reader on an event loop: the same contract, nothing blocks the loop."""
        raise NotImplementedError
        yield  # an async generator

    def atokens(self, prompt_ids: list[int], params: SamplingParams, vision: dict | None = None) -> AsyncIterator[int]:
        """`tokens` on an event loop: many requests read by one thread (`stages.serve.delivery`)."""
        self.check(prompt_ids, params.max_tokens)
        return self._atokens(prompt_ids, params, vision)

    def astream(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        vision: dict[str, torch.Tensor] | None = None,
        top_k: int = 0,
    ) -> AsyncIterator[Delta]:
        """`stream` on an event loop (the API server reads every request this way)."""
        params, stop = self._request(prompt_ids, max_tokens, temperature, top_p, seed, stop, top_k)
        return self._adeltas(prompt_ids, params, stop, vision)

    async def _adeltas(
        self, prompt_ids: list[int], params: SamplingParams, stop: list[str], vision
    ) -> AsyncIterator[Delta]:
        info: dict = {}
        tokens = self._atokens(prompt_ids, params, vision, info)
        text = _TextDeltas(self, len(prompt_ids), stop, info)
        try:
            async for token in tokens:
                delta = text.push(token)
                if text.stopped:
                    await tokens.aclose()
                if delta is not None:
                    yield delta
                if text.finished:
                    return
            yield text.end()
        finally:
            await tokens.aclose()


class _TextDeltas:
    """A request's tokens -> text deltas. Text that could still turn out to begin a stop string, or an
    unfinished UTF-8 character, is held back until it cannot, so the deltas always add up to the final text."""

    def __init__(self, front: EngineFront, prompt_tokens: int, stop: list[str], info: dict) -> None:
        self.front, self.prompt_tokens, self.stop, self.info = front, prompt_tokens, stop, info
        self.new: list[int] = []
        self.sent = 0
        self.finished = False
        """The last delta (with the `Completion`) went out."""
        self.stopped = False
        """A stop string ended it: the token source can be closed."""

    def push(self, token: int) -> Delta | None:
        """The delta `token` releases, if any; the last one carries the `Completion`."""
        self.new.append(token)
        if token == self.front.config.eos_token_id:
            text = self.front.decode(self.new[:-1])
            return self._last(text[self.sent :], text, "stop")
        text = self.front.decode(self.new)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._last(text[self.sent : cut], text[:cut], "stop")
        ready = len(text) - _held_back(text, self.stop)
        if ready <= self.sent:
            return None
        delta, self.sent = Delta(text[self.sent : ready], None), ready
        return delta

    def end(self) -> Delta:
        """The last delta of a request its source ended without eos or a stop string (max_tokens)."""
        text = self.front.decode(self.new)
        return self._last(text[self.sent :], text, "length")

    def _last(self, delta: str, text: str, finish_reason: str) -> Delta:
        self.finished = True
        cached = self.info.get("cached_tokens", 0)
        return Delta(delta, Completion(text, self.prompt_tokens, len(self.new), finish_reason, cached))


class Engine(EngineFront):
    def __init__(
        self,
        model,
        tokenizer,
        model_dir: str = "",
        image_settings: dict | None = None,
        kv_cache_tokens: int = DEFAULT_KV_CACHE_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefix_caching: bool = True,
        kv_block_tokens: int = DEFAULT_BLOCK_TOKENS,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
        compile_decode: bool = False,
        prompt_wait_steps: int = 0,
    ) -> None:
        self.model = model.eval()
        self.packed_layers = 0
        """Linear layers whose weights `load` packed for oneDNN."""
        self._init_front(tokenizer, model.config, model_dir, image_settings, kv_cache_tokens)
        self.scheduler = Scheduler(
            self.model,
            kv_cache_tokens,
            max_batch,
            prefix_caching,
            kv_block_tokens,
            prefill_chunk_tokens,
            compile_decode,
            prompt_wait_steps,
        )
        """Owns the model from its own thread: once the first request comes, or from the start with compile_decode."""

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        tokenizer_path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        pack_weights: bool = True,
        **scheduling,
    ) -> Engine:
        """The model of `model_dir` (in `dtype`, else as stored, on `device`) and the tokenizer, image
        bounds as `load_front` finds them. `scheduling`: `Engine`'s keyword arguments after image_settings.
        `pack_weights`: on a CPU, its linear layers' weights are reordered for oneDNN (`ernie.packed_linear`),
        unless the decode step is compiled (torch.compile cannot lower them)."""
        tokenizer, settings = load_front(model_dir, tokenizer_path)
        model = load_model(model_dir, dtype, device)
        packed = pack_decoder(model) if pack_weights and not scheduling.get("compile_decode") else 0
        engine = cls(model, tokenizer, str(model_dir), settings, **scheduling)
        engine.packed_layers = packed
        return engine

    def close(self) -> None:
        """Stop the scheduler's thread; requests still queued or running get an error."""
        self.scheduler.close()

    def _tokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> Iterator[int]:
        seq = self.scheduler.submit(prompt_ids, params, vision)
        try:
            for token in seq.tokens():
                if info is not None:
                    info["cached_tokens"] = seq.cached_tokens or 0  # known once it is admitted
                yield token
        finally:
            seq.cancel()  # a no-op once finished

    async def _atokens(
        self, prompt_ids: list[int], params: SamplingParams, vision: dict | None, info: dict | None = None
    ) -> AsyncIterator[int]:
        out: asyncio.Queue = asyncio.Queue()
        send = outbox(asyncio.get_running_loop()).sender(out)
        seq = self.scheduler.submit(prompt_ids, params, vision, listener=send)
        try:
            for _ in range(params.max_tokens):
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if info is not None:
                    info["cached_tokens"] = seq.cached_tokens or 0
                yield item
                if item == seq.eos:
                    return
        finally:
            seq.cancel()  # a no-op once finished

    def prefill(self, *request, **sampling) -> Prefilled:
        """The prefill half of a request (`start_prefill`'s arguments), for another engine to decode
        (`Scheduler.submit_prefilled`); checked and sampled as `stream` would. Blocks until it has run."""
        return self.start_prefill(*request, **sampling).result()

    def start_prefill(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        vision: dict[str, torch.Tensor] | None = None,
        top_k: int = 0,
    ) -> Future[Prefilled]:
        """`prefill` without waiting: for callers that await the result (an asyncio actor)."""
        self.check(prompt_ids, max_tokens)
        params = SamplingParams(max_tokens, temperature, top_p, top_k, seed)
        return self.scheduler.submit_prefill(prompt_ids, params, vision)


def _held_back(text: str, stop: list[str]) -> int:
    """Characters at the end of `text` not to stream yet: an unfinished UTF-8 character (decoded as
    U+FFFD), or the longest tail that is the start of a stop string."""
    held = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                held = max(held, n)
                break
    return held


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a thinking-mode completion: what precedes </think> is the reasoning;
    without a </think> (cut by max_tokens) everything is reasoning and the answer is empty."""
    if THINK_CLOSE not in text:
        return text.removeprefix(THINK_OPEN).strip(), ""
    reasoning, _, answer = text.partition(THINK_CLOSE)
    return reasoning.removeprefix(THINK_OPEN).strip(), answer.strip()
