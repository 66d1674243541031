"""The Ray Serve application: a FastAPI ingress serving the OpenAI API under /v1.

    GET  /v1/models             the one served model
    POST /v1/completions        prompt (str or list of str) -> text (`stream: true`: server-sent events)
    POST /v1/chat/completions   messages -> ERNIE chat template with the generation prompt -> reply
                                (VL models: image_url parts with base64 data: URLs, `stages.serve.images`)
    GET  /metrics               Prometheus text format (`stages.serve.metrics`)
    GET  /health                200 once the replica has its model

`n` choices per prompt (and every prompt of a list) are decoded concurrently, so the scheduler batches
them. Requests are read on the replica's event loop (`EngineFront.astream`): one thread for all of them,
woken once per decode step for every request's tokens (`stages.serve.delivery`).

With an API key set, every route but /health wants `Authorization: Bearer <key>` (else 401). Bodies over
the size limit get 413 before they are parsed; bad requests get HTTP 400 (unknown model: 404); all errors
carry an OpenAI-style error body.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as real
# classes in the signatures of Ray Serve's class-based routes, not as strings.

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ernie.chat_template import THINK_CLOSE, THINK_OPEN, render

from .engine import Delta, Engine, RequestError, split_reasoning
from .images import image_bytes
from .metrics import ServeMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_choice,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    models_response,
    new_id,
    usage_chunk,
)

OPEN_PATHS = frozenset({"/health"})
"""Routes that answer without the API key: a load balancer's health check holds no key."""
DEFAULT_MAX_N = 8
DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_TOKENS_LIMIT = 4096

app = FastAPI(title="ernie-pipeline", description="OpenAI-compatible serving of an ERNIE 4.5 checkpoint")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


@app.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    problems = []
    param = None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        problems.append(f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
    return JSONResponse(error_body("; ".join(problems), param=param), status_code=400)


# ---------------------------------------------------------------------- in front of every route
# Everything below up to the deployment class is defined before it: Serve serializes the class (and
# a copy of `app`, middleware included) when it is decorated.
def _replica():
    """The serving replica (the deployment instance) this request reached; None outside Ray Serve."""
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # noqa: BLE001 - no replica context: not running under Serve
        return None


def _authorized(header: bytes | None, key: bytes) -> bool:
    scheme, _, token = (header or b"").partition(b" ")
    # compare_digest: how far the token matches the key does not show in the time the answer takes
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


async def _refuse(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(message, code=code)).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware: the API key, the body size limit and the request counter. Middleware rather
    than a route dependency so an oversized body is refused before FastAPI buffers and parses it, and
    so refusals (401, 413) and unknown routes are counted too."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def __call__(self, scope, receive, send) -> None:
        server = _replica() if scope["type"] == "http" else None
        if server is None:
            await self.inner(scope, receive, send)
            return
        started = [False]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":  # counted before the client can see the answer
                started[0] = True
                server.metrics.request(scope["path"], message["status"])
            await send(message)

        try:
            await self._gated(server, scope, receive, send_counted)
        finally:
            if not started[0]:  # the app failed before answering: the server's 500
                server.metrics.request(scope["path"], 500)

    async def _gated(self, server, scope, receive, send) -> None:
        headers = dict(scope["headers"])
        if server.api_key and scope["path"] not in OPEN_PATHS:
            if not _authorized(headers.get(b"authorization"), server.api_key.encode()):
                missing = b"authorization" not in headers
                message = (
                    "no API key given: send the header Authorization: Bearer <key>"
                    if missing
                    else "Incorrect API key provided"
                )
                await _refuse(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
                return
        limit = server.max_request_bytes
        too_large = f"the request body is larger than this server takes ({limit} bytes, serve.max_request_bytes)"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, 413, too_large, "request_too_large")
            return
        # counted as it arrives too: a chunked body has no Content-Length, and a header can lie
        messages, size, more = [], 0, True
        while more and size <= limit:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)
        if size > limit:
            await _refuse(send, 413, too_large, "request_too_large")
            return
        buffered = iter(messages)

        async def replay():
            return next(buffered, None) or await receive()

        await self.inner(scope, replay, send)


app.add_middleware(Gate)


def _sse(events: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: `data: <json>` per chunk, then `data: [DONE]`."""

    async def body() -> AsyncIterator[str]:
        async with contextlib.aclosing(events):  # a client gone mid-stream stops every choice now
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


_FINISHED = object()


async def _together(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """(index, delta) of every stream as they come. Every stream is read at once, on this event loop, so the
    scheduler queues them together and decodes them in one batch instead of one after another. Closing this
    iterator stops the streams still running: each frees its rows."""
    out: asyncio.Queue = asyncio.Queue()

    async def read(i: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async with contextlib.aclosing(stream):  # closing an unfinished stream frees its rows
                async for delta in stream:
                    out.put_nowait((i, delta))
            out.put_nowait((i, _FINISHED))
        except Exception as err:  # noqa: BLE001 - the request's reader raises it
            out.put_nowait((i, err))

    readers = [asyncio.create_task(read(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await out.get()
            if item is _FINISHED:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for reader in readers:
            reader.cancel()  # a no-op for those that ended


async def _measured(deltas: AsyncIterator[tuple[int, Delta]], metrics: ServeMetrics, n: int, started: float):
    """`deltas` passed through, timing each choice's first text and pace, counting its tokens, and each
    prompt's tokens once (choice i belongs to prompt i // n)."""
    first: dict[int, float] = {}
    prompts_done: set[int] = set()
    async with contextlib.aclosing(deltas):  # closing this closes the streams' reader now, not when collected
        async for i, delta in deltas:
            now = time.perf_counter()
            if i not in first:
                first[i] = now
                metrics.first_token(now - started)
            done = delta.completion
            if done is not None:
                metrics.choice_done(done.completion_tokens, now - first[i])
                if i // n not in prompts_done:
                    prompts_done.add(i // n)
                    metrics.prompt_done(done.prompt_tokens)
            yield i, delta


async def _gather(deltas: AsyncIterator[tuple[int, Delta]], count: int) -> list:
    """The final `Completion` of each of `count` choices, in index order."""
    finals = [None] * count
    async for i, delta in deltas:
        finals[i] = delta.completion or finals[i]
    return finals


def _usage(finals: list, n: int) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, cached prompt tokens) of choices in index order: each prompt counted
    once, as OpenAI counts it (its cached tokens as its first choice found them), and every choice's completion."""
    prompts = finals[::n]
    return (
        sum(done.prompt_tokens for done in prompts),
        sum(done.completion_tokens for done in finals),
        sum(done.cached_tokens for done in prompts),
    )


@serve.deployment
@serve.ingress(app)
class OpenAIServer:
    """One replica: the model (quantized or not) and tokenizer, loaded once."""

    def __init__(
        self,
        model_dir: str,
        tokenizer_path: str,
        model_name: str,
        default_max_tokens: int,
        scheduling: dict | None = None,
        limits: dict | None = None,
        metrics_hub: str = "",
    ) -> None:
        """`scheduling`: the engine's kv_cache_tokens and max_batch; `limits`: api_key, max_n,
        max_request_bytes, max_tokens_limit (serve.Config); `metrics_hub`: the app whose metrics hub sums the
        replicas' /metrics (`stages.serve.metrics_hub`; empty: each replica shows its own)."""
        scheduling = dict(scheduling or {})
        pd = scheduling.pop("pd", None)
        if pd is None:
            self.engine = Engine.load(model_dir, tokenizer_path, **scheduling)
        else:  # prefill/decode workers behind this replica, which routes (stages/serve/pd.py)
            from .pd import PDEngine

            self.engine = PDEngine.load(model_dir, tokenizer_path, **scheduling, **pd)
        self.model_name, self.default_max_tokens = model_name, default_max_tokens
        limits = limits or {}
        self.api_key: str = limits.get("api_key") or ""
        self.max_n: int = limits.get("max_n", DEFAULT_MAX_N)
        self.max_request_bytes: int = limits.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
        self.max_tokens_limit: int = limits.get("max_tokens_limit", DEFAULT_MAX_TOKENS_LIMIT)
        if pd is None:
            self.metrics = ServeMetrics(self.engine.scheduler)
        else:
            self.metrics = ServeMetrics(self.engine.scheduler, "router", self.engine.stats)
        if metrics_hub:
            self.metrics.share(metrics_hub)

    def _check_model(self, requested: str | None) -> None:
        if requested not in (None, "", self.model_name):
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _check_n(self, n: int) -> None:
        if n > self.max_n:
            raise APIError(400, f"n={n} is more choices than this server gives ({self.max_n}, serve.max_n)", param="n")

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    def models(self) -> dict:
        return models_response(self.model_name, self.engine.model_dir)

    @app.get("/metrics")
    def scrape(self) -> Response:
        body, content_type = self.metrics.expose()
        return Response(content=body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        started = time.perf_counter()
        self._check_model(req.model)
        self._check_n(req.n)
        prompts = [self.engine.encode(p) for p in ([req.prompt] if isinstance(req.prompt, str) else req.prompt)]
        max_tokens = req.max_tokens or self.default_max_tokens
        deltas = self._start(prompts, req, max_tokens, "max_tokens", started)
        if req.stream:
            return _sse(self._completion_chunks(deltas, req))
        finals = await _gather(deltas, len(prompts) * req.n)
        choices = [
            {"index": i, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
            for i, done in enumerate(finals)
        ]
        return completion_response(self.model_name, choices, *_usage(finals, req.n))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        started = time.perf_counter()
        self._check_model(req.model)
        self._check_n(req.n)
        image_urls: list[tuple[str, str]] = []
        messages = [m.template_message(i, image_urls) for i, m in enumerate(req.messages)]
        try:
            text = render(messages, add_generation_prompt=True, enable_thinking=req.thinking())
            if image_urls:  # decoding and resizing images in a thread: the event loop serves every stream
                prompt_ids, vision = await asyncio.to_thread(self._with_images, text, image_urls)
            else:
                prompt_ids, vision = self.engine.encode(text), None
        except RequestError as err:
            raise APIError(400, str(err), param=err.param) from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        deltas = self._start([prompt_ids], req, max_tokens, param, started, vision)
        if req.stream:
            return _sse(self._chat_chunks(deltas, req))
        finals = await _gather(deltas, req.n)
        choices = []
        for i, done in enumerate(finals):
            reasoning, content = split_reasoning(done.text) if req.thinking() else (None, done.text.strip())
            choices.append(chat_choice(i, content, reasoning, done.finish_reason))
        return chat_response(self.model_name, choices, *_usage(finals, req.n))

    def _with_images(self, text: str, image_urls: list[tuple[str, str]]) -> tuple[list[int], dict | None]:
        images = [(image_bytes(url, where), where) for url, where in image_urls]
        return self.engine.images.apply(self.engine.encode(text), images)

    # ------------------------------------------------------------------ choices
    def _start(
        self, prompts: list[list[int]], req, max_tokens: int, param: str, started: float, vision: dict | None = None
    ) -> AsyncIterator[tuple[int, Delta]]:
        """Every choice's stream (index prompt_index * n + j, seed + j), refused here, before anything
        runs or streams, when one cannot be served; read together when the result is iterated."""
        try:
            streams = [
                self.engine.astream(
                    prompt_ids,
                    max_tokens,
                    req.temperature,
                    req.top_p,
                    req.choice_seed(j),
                    req.stop_list(),
                    vision,
                    req.top_k,
                )
                for prompt_ids in prompts
                for j in range(req.n)
            ]
        except RequestError as err:
            raise APIError(400, str(err), param=err.param) from None
        # after the engine's own checks: a request beyond the model's context is told that first
        if max_tokens > self.max_tokens_limit:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than this server generates per choice "
                f"({self.max_tokens_limit}, serve.max_tokens_limit)",
                param=param,
            )
        return _measured(_together(streams), self.metrics, req.n, started)

    async def _completion_chunks(self, deltas: AsyncIterator[tuple[int, Delta]], req) -> AsyncIterator[dict]:
        request_id, finals = new_id("cmpl"), []
        async with contextlib.aclosing(deltas):  # a client gone mid-stream stops every choice
            async for i, delta in deltas:
                done = delta.completion
                if delta.text or done is not None:
                    yield completion_chunk(request_id, self.model_name, i, delta.text, done and done.finish_reason)
                if done is not None:
                    finals.append((i, done))
        if req.stream_options is not None and req.stream_options.include_usage:
            ordered = [done for _, done in sorted(finals, key=lambda f: f[0])]
            yield usage_chunk(request_id, self.model_name, "text_completion", *_usage(ordered, req.n))

    async def _chat_chunks(self, deltas: AsyncIterator[tuple[int, Delta]], req) -> AsyncIterator[dict]:
        """Assistant deltas per choice; in thinking mode the text before </think> goes out as
        `reasoning_content`. Every choice first gets its role chunk, as OpenAI sends it."""
        request_id, finals = new_id("chatcmpl"), []
        for i in range(req.n):
            yield chat_chunk(request_id, self.model_name, {"role": "assistant", "content": ""}, None, i)
        reasoning = [req.thinking()] * req.n
        async with contextlib.aclosing(deltas):
            async for i, delta in deltas:
                parts = {}
                text = delta.text
                if reasoning[i]:
                    thought, closed, text = text.partition(THINK_CLOSE)
                    if thought.replace(THINK_OPEN, ""):
                        parts["reasoning_content"] = thought.replace(THINK_OPEN, "")
                    reasoning[i] = not closed
                if text and not reasoning[i]:
                    parts["content"] = text
                done = delta.completion
                if parts or done is not None:
                    yield chat_chunk(request_id, self.model_name, parts, done and done.finish_reason, i)
                if done is not None:
                    finals.append((i, done))
        if req.stream_options is not None and req.stream_options.include_usage:
            ordered = [done for _, done in sorted(finals, key=lambda f: f[0])]
            yield usage_chunk(request_id, self.model_name, "chat.completion.chunk", *_usage(ordered, req.n))
