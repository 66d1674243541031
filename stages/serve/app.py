"""The Ray Serve application: a FastAPI ingress serving the OpenAI API under /v1.

    GET  /v1/models             the one served model
    POST /v1/completions        prompt (str or list of str) -> text
    POST /v1/chat/completions   messages -> ERNIE chat template with the generation prompt -> reply
                                (VL models: image_url parts with base64 data: URLs, `stages.serve.images`)
    GET  /health                200 once the replica has its model

Bad requests get HTTP 400 (unknown model: 404) with an OpenAI-style error body.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models as real
# classes in the signatures of Ray Serve's class-based routes, not as strings.

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from ernie.chat_template import render

from .engine import Engine, RequestError, split_reasoning
from .images import image_bytes
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    error_body,
    models_response,
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


@serve.deployment
@serve.ingress(app)
class OpenAIServer:
    """One replica: the model (quantized or not) and tokenizer, loaded once."""

    def __init__(self, model_dir: str, tokenizer_path: str, model_name: str, default_max_tokens: int) -> None:
        self.engine = Engine.load(model_dir, tokenizer_path)
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
                prompt_ids, max_tokens, req.temperature, req.top_p, req.seed, req.stop_list(), vision
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
    def completions(self, req: CompletionRequest) -> dict:
        self._check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, prompt in enumerate(prompts):
            result = self._complete(self.engine.encode(prompt), req, req.max_tokens)
            choices.append({"index": i, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason})
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
        return completion_response(self.model_name, choices, prompt_tokens, completion_tokens)

    @app.post("/v1/chat/completions")
    def chat_completions(self, req: ChatCompletionRequest) -> dict:
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
        result = self._complete(prompt_ids, req, req.max_completion_tokens or req.max_tokens, vision)
        reasoning, content = split_reasoning(result.text) if req.thinking() else (None, result.text.strip())
        return chat_response(
            self.model_name, content, reasoning, result.finish_reason, result.prompt_tokens, result.completion_tokens
        )
