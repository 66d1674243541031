"""Token generation with the KV cache: one prefill, then one decode step per new token.

    tokens = generate(model, prompt_ids, max_new_tokens=32)              # greedy
    tokens = generate(model, prompt_ids, max_new_tokens=32, temperature=0.7, top_p=0.9, seed=0)

Prompts of different lengths are left-padded with `attention_mask`; a row stops at
`eos_token_id` and is padded with `pad_token_id` afterwards. Serving and RL rollouts build
on this loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .cache import KVCache
from .model import ErnieForCausalLM


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Greedy at temperature 0; otherwise nucleus sampling over the softmax at `temperature`."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def without_vision_tokens(logits_BV: torch.Tensor, config) -> torch.Tensor:
    """The logits with image / video placeholders and markers ruled out: they are inputs that need
    pixels, so a VL model never generates them (a text model's logits pass unchanged)."""
    if config.vision is None:
        return logits_BV
    return logits_BV.index_fill(-1, _id_tensor(tuple(config.vision_token_ids), logits_BV.device), float("-inf"))


@functools.cache
def _id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Token ids as an index tensor, made once per device (it is used at every decode step)."""
    return torch.tensor(ids, device=device)


@torch.no_grad()
def generate(
    model: ErnieForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    **vision_inputs,
) -> torch.Tensor:
    """New tokens [B, max_new_tokens] (pad after a row's eos).

    `seed` seeds the sampling: one int for the batch, or one per row, where rows of the same seed
    draw from one generator in row order, exactly as a batch of those rows alone with that seed
    would (so batching several requests together keeps each request's samples)."""
    cfg = model.config
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    draw = _sampler(seed, input_ids.shape[0], input_ids.device, temperature, top_p)
    cache = KVCache(cfg.num_layers)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1, **vision_inputs).logits
    B = input_ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        token = draw(without_vision_tokens(logits[:, -1], cfg))
        token = torch.where(done, torch.full_like(token, cfg.pad_token_id), token)
        out.append(token)
        done |= token == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache).logits
    new = torch.stack(out, dim=1)
    if new.shape[1] < max_new_tokens:
        pad = torch.full((B, max_new_tokens - new.shape[1]), cfg.pad_token_id, dtype=new.dtype, device=new.device)
        new = torch.cat([new, pad], dim=1)
    return new


def _sampler(seed, batch: int, device, temperature: float, top_p: float):
    """logits [B, V] -> next tokens [B], with one generator per distinct seed of `seed`."""
    if seed is None or isinstance(seed, int):
        generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
        return lambda logits: sample_next(logits, temperature, top_p, generator)
    if len(seed) != batch:
        raise ValueError(f"{len(seed)} seeds for a batch of {batch} rows")
    groups = {}
    for row, s in enumerate(seed):
        groups.setdefault(int(s), []).append(row)
    generators = [
        (torch.Generator(device=device).manual_seed(s), torch.tensor(rows, device=device)) for s, rows in groups.items()
    ]

    def draw(logits: torch.Tensor) -> torch.Tensor:
        token = torch.empty(batch, dtype=torch.long, device=logits.device)
        for generator, rows in generators:
            token[rows] = sample_next(logits[rows], temperature, top_p, generator)
        return token

    return draw
