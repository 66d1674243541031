"""The Ray Serve application: a FastAPI ingress serving the OpenAI API under /v1.

    GET  /v1/models             the one served model
    POST /v1/completions        prompt (str or list of str) -> text (`stream: true`: server-sent events)
    POST /v1/chat/completions   messages -> ERNIE chat template with the generation prompt -> reply
                                (VL models: image_url parts with base64 data: URLs, `stages.serve.images`)
    GET  /health                200 once the replica has its model

Bad requests get HTTP 400 (unknown model: 404) with an OpenAI-style error body.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as real
# classes in the signatures of Ray Serve's class-based routes, not as strings.

import json
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from ernie.chat_template import THINK_CLOSE, THINK_OPEN, render

from .engine import Engine, RequestError, split_reasoning
from .images import image_bytes
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    error_body,
    models_response,
    new_id,
    usage_chunk,
)

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


# defined before the deployment class: Serve serializes the class when it is decorated
def _sse(events: Iterator[dict]) -> StreamingResponse:
    """Server-sent events as OpenAI streams them: `data: <json>` per chunk, then `data: [DONE]`."""

    def body() -> Iterator[str]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


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
    ) -> None:
        """`scheduling`: the engine's kv_cache_tokens and max_batch (serve.Config)."""
        self.engine = Engine.load(model_dir, tokenizer_path, **(scheduling or {}))
        self.model_name, self.default_max_tokens = model_name, default_max_tokens

    def _check_model(self, requested: str | None) -> None:
        if requested not in (None, "", self.model_name):
            raise APIError(
                404,
                f"the model {requested!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _complete(self, prompt_ids: list[int], req, max_tokens: int | None, vision: dict | None = None):
        try:
            max_tokens = max_tokens or self.default_max_tokens
            return self.engine.complete(
                prompt_ids, max_tokens, req.temperature, req.top_p, req.seed, req.stop_list(), vision, req.top_k
            )
        except RequestError as err:
            raise APIError(400, str(err), param=err.param) from None

    @app.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.model_name}

    @app.get("/v1/models")
    def models(self) -> dict:
        return models_response(self.model_name, self.engine.model_dir)

    @app.post("/v1/completions")
    def completions(self, req: CompletionRequest):
        self._check_model(req.model)
        prompts = [self.engine.encode(p) for p in ([req.prompt] if isinstance(req.prompt, str) else req.prompt)]
        max_tokens = req.max_tokens or self.default_max_tokens
        if req.stream:
            self._check(prompts, max_tokens)
            return _sse(self._completion_chunks(prompts, req, max_tokens))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, prompt_ids in enumerate(prompts):
            result = self._complete(prompt_ids, req, max_tokens)
            choices.append({"index": i, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason})
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
        return completion_response(self.model_name, choices, prompt_tokens, completion_tokens)

    @app.post("/v1/chat/completions")
    def chat_completions(self, req: ChatCompletionRequest):
        self._check_model(req.model)
        image_urls: list[tuple[str, str]] = []
        messages = [m.template_message(i, image_urls) for i, m in enumerate(req.messages)]
        try:
            text = render(messages, add_generation_prompt=True, enable_thinking=req.thinking())
            images = [(image_bytes(url, where), where) for url, where in image_urls]
            prompt_ids, vision = self.engine.images.apply(self.engine.encode(text), images)
        except RequestError as err:
            raise APIError(400, str(err), param=err.param) from None
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        max_tokens = req.max_completion_tokens or req.max_tokens or self.default_max_tokens
        if req.stream:
            self._check([prompt_ids], max_tokens)
            return _sse(self._chat_chunks(prompt_ids, vision, req, max_tokens))
        result = self._complete(prompt_ids, req, max_tokens, vision)
        reasoning, content = split_reasoning(result.text) if req.thinking() else (None, result.text.strip())
        return chat_response(
            self.model_name, content, reasoning, result.finish_reason, result.prompt_tokens, result.completion_tokens
        )

    # ------------------------------------------------------------------ streaming
    def _check(self, prompts: list[list[int]], max_tokens: int) -> None:
        """Errors a stream would meet are raised before it starts, as HTTP errors, not mid-stream."""
        try:
            for prompt_ids in prompts:
                self.engine.check(prompt_ids, max_tokens)
        except RequestError as err:
            raise APIError(400, str(err), param=err.param) from None

    def _stream(self, prompt_ids: list[int], req, max_tokens: int, vision: dict | None = None):
        return self.engine.stream(
            prompt_ids, max_tokens, req.temperature, req.top_p, req.seed, req.stop_list(), vision, req.top_k
        )

    def _completion_chunks(self, prompts: list[list[int]], req, max_tokens: int) -> Iterator[dict]:
        request_id, used = new_id("cmpl"), [0, 0]
        for i, prompt_ids in enumerate(prompts):
            for delta in self._stream(prompt_ids, req, max_tokens):
                done = delta.completion
                if delta.text or done is not None:
                    yield completion_chunk(request_id, self.model_name, i, delta.text, done and done.finish_reason)
                if done is not None:
                    used[0] += done.prompt_tokens
                    used[1] += done.completion_tokens
        if req.stream_options is not None and req.stream_options.include_usage:
            yield usage_chunk(request_id, self.model_name, "text_completion", *used)

    def _chat_chunks(self, prompt_ids: list[int], vision: dict, req, max_tokens: int) -> Iterator[dict]:
        """Assistant deltas; in thinking mode the text before </think> goes out as `reasoning_content`."""
        request_id = new_id("chatcmpl")
        yield chat_chunk(request_id, self.model_name, {"role": "assistant", "content": ""}, None)
        reasoning = req.thinking()
        for delta in self._stream(prompt_ids, req, max_tokens, vision):
            parts = {}
            text = delta.text
            if reasoning:
                thought, closed, text = text.partition(THINK_CLOSE)
                if thought.replace(THINK_OPEN, ""):
                    parts["reasoning_content"] = thought.replace(THINK_OPEN, "")
                reasoning = not closed
            if text and not reasoning:
                parts["content"] = text
            done = delta.completion
            if parts or done is not None:
                yield chat_chunk(request_id, self.model_name, parts, done and done.finish_reason)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield usage_chunk(
                request_id, self.model_name, "chat.completion.chunk", done.prompt_tokens, done.completion_tokens
            )
