"""The OpenAI API subset we serve: request schemas (validated by pydantic) and response objects.

Field names, defaults and response shapes follow the OpenAI API (and vLLM's server):
completions and chat completions, `usage` token counts, `finish_reason` "stop" | "length",
errors as {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False
    """A last chunk with no choices and the request's `usage`, as OpenAI sends it."""


class _Request(BaseModel):
    # unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as vLLM does
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    """Sample among the k most likely tokens (vLLM's field); 0 or -1: off."""
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    """Choices per prompt, decoded concurrently (the batch takes them together); at most `serve.max_n`.
    With a `seed`, choice j samples with seed + j: repeatable, yet the choices differ from each other
    (greedy ones, temperature 0, are all the same)."""
    stream: bool = False
    """Server-sent events: one chunk per piece of decoded text, then `data: [DONE]`."""
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def choice_seed(self, j: int) -> int | None:
        """The seed of choice j of a prompt (see `n`)."""
        return None if self.seed is None else self.seed + j


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(..., min_length=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None
    """OpenAI's detail hint; images are resized as in training whatever it says."""


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    def template_message(self, index: int, images: list[tuple[str, str]]) -> dict:
        """The message as `ernie.chat_template` takes it; each image part's (data URL, where) is appended
        to `images` and stands in the message as a ref the template renders as one placeholder."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        parts = []
        for j, part in enumerate(self.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
            else:
                where = f"messages[{index}].content[{j}].image_url"
                images.append((part.image_url.url, where))
                parts.append({"type": "image", "image": where})
        return {"role": self.role, "content": parts}


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    enable_thinking: bool | None = None
    """ERNIE's thinking mode: the generation prompt opens a <think> block."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM's spelling: {"enable_thinking": true}."""

    def thinking(self) -> bool:
        if self.enable_thinking is not None:
            return self.enable_thinking
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """`cached_tokens`: prompt tokens served from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_response(
    model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_choice(index: int, content: str, reasoning: str | None, finish_reason: str) -> dict:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def chat_response(
    model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict:
    """`choices`: `chat_choice`s in index order."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def models_response(model: str, root: str) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": int(time.time()), "owned_by": "ernie-pipeline", "root": root}
        ],
    }


def completion_chunk(request_id: str, model: str, index: int, text: str, finish_reason: str | None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None, index: int = 0) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(
    request_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict:
    """The closing chunk of a stream asked for `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
