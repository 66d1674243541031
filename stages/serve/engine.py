"""The serving engine: a loaded model + tokenizer that turns one prompt into one completion.

    engine = Engine.load("out/qckpt", "out/qckpt/tokenizer/tokenizer.json")
    result = engine.complete(engine.encode("2+3="), max_tokens=8, temperature=0.0)

One prefill, then one decode step per token with the KV cache (the loop of
`ernie.generation.generate`, token by token so that stop strings end it early). A lock
makes the engine safe to share between a replica's request threads: requests run one at a
time (batching and PD disaggregation are later work). `stream` yields the text as it is decoded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ernie.cache import KVCache
from ernie.chat_template import SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN
from ernie.generation import sample_next, without_vision_tokens
from ernie.quant import is_quantized_dir, load_model


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


class Engine:
    def __init__(self, model, tokenizer, model_dir: str = "", image_settings: dict | None = None) -> None:
        from .images import RequestImages  # images builds on this module's RequestError

        self.model, self.tokenizer, self.model_dir = model.eval(), tokenizer, model_dir
        self.config = model.config
        self.quantized = bool(model_dir) and is_quantized_dir(model_dir)
        self._lock = threading.Lock()
        self._drop = [t for t in SPECIAL_TOKENS if t not in (THINK_OPEN, THINK_CLOSE)]
        self.images = RequestImages(self.config, image_settings)
        """Request images -> widened prompt ids and vision inputs (resize bounds `image_settings`)."""

    @classmethod
    def load(cls, model_dir: str | Path, tokenizer_path: str | Path) -> Engine:
        """The model of `model_dir` and the tokenizer; image bounds from the model's artifact, else from
        the artifact the tokenizer came from (the dataset: <artifact>/tokenizer/tokenizer.json)."""
        from tokenizers import Tokenizer

        from .images import find_image_settings

        settings = find_image_settings(Path(model_dir), Path(tokenizer_path).resolve().parents[1])
        return cls(load_model(model_dir), Tokenizer.from_file(str(tokenizer_path)), str(model_dir), settings)

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

    def complete(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        vision: dict[str, torch.Tensor] | None = None,
    ) -> Completion:
        """The whole completion; `vision`: pixel_values / image_grid_thw of the images in `prompt_ids`."""
        deltas = self.stream(prompt_ids, max_tokens, temperature, top_p, seed, stop, vision)
        with contextlib.closing(deltas):  # the stream holds the engine's lock until it is closed
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
    ) -> Iterator[Delta]:
        """The completion as text deltas, the last carrying the `Completion`. Text that could still
        turn out to begin a stop string, or an unfinished UTF-8 character, is held back until it
        cannot, so the deltas always add up to the final text."""
        self.check(prompt_ids, max_tokens)
        stop = [s for s in (stop or []) if s]
        eos = self.config.eos_token_id
        sent = 0
        with self._lock, torch.no_grad():
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            cache = KVCache(self.config.num_layers)
            logits = self.model(torch.tensor([prompt_ids]), cache=cache, logits_to_keep=1, **(vision or {})).logits
            new: list[int] = []
            for _ in range(max_tokens):
                step_logits = without_vision_tokens(logits[:, -1], self.config)
                token = int(sample_next(step_logits, temperature, top_p, generator)[0])
                new.append(token)
                if token == eos:
                    text = self.decode(new[:-1])
                    yield Delta(text[sent:], Completion(text, len(prompt_ids), len(new), "stop"))
                    return
                text = self.decode(new)
                cut = min((text.find(s) for s in stop if s in text), default=-1)
                if cut >= 0:
                    yield Delta(text[sent:cut], Completion(text[:cut], len(prompt_ids), len(new), "stop"))
                    return
                ready = len(text) - _held_back(text, stop)
                if ready > sent:
                    yield Delta(text[sent:ready], None)
                    sent = ready
                logits = self.model(torch.tensor([[token]]), cache=cache).logits
        text = self.decode(new)
        yield Delta(text[sent:], Completion(text, len(prompt_ids), len(new), "length"))


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
