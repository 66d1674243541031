"""Rollouts: sampled completions of chat prompts with the model's KV-cache decoding.

`RolloutWorker` is the Ray actor RLVR and UPO sample from: it holds its own copy of the
policy, takes the learner's weights at the start of every rollout round and before every
evaluation (`load_weights`, tagged with the step so a stale copy is caught), answers `sample`
with G completions per prompt, all of its prompts decoded as one batch, and `evaluate` with the
validation answers. Each prompt's G samples are drawn from a generator seeded by the request, so
the same weights and seed give the same tokens on any actor and in any batch: a resumed run
samples what the uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ernie.generation import generate

from .chat import vision_inputs


@dataclass
class RolloutRequest:
    """One prompt to sample: its ids, its sampling seed and, for a VL prompt, its images' patches and grids."""

    ids: list[int]
    seed: int
    patches: list = field(default_factory=list)
    grids: list = field(default_factory=list)


def request_seed(seed: int, step: int, index: int) -> int:
    """A sampling seed for prompt `index` in the round starting at `step`, independent of which actor serves it."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def trim(row: list[int], eos_id: int) -> list[int]:
    """Generated ids up to and including the first end-of-sentence token (all of them if none came)."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


@torch.no_grad()
def complete(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | list[int] | None = None,
    vision: dict[str, torch.Tensor] | None = None,
) -> list[list[int]]:
    """One completion per prompt (left-padded into one batch), each trimmed after its end-of-sentence token;
    `seed`: one for the batch or one per prompt (see `ernie.generation.generate`)."""
    cfg = model.config
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), cfg.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    new = generate(
        model,
        input_ids.to(device),
        max_new_tokens=max_new_tokens,
        attention_mask=mask.to(device),
        temperature=temperature,
        top_p=top_p,
        eos_token_id=cfg.eos_token_id,
        seed=seed,
        **{k: v.to(device) for k, v in (vision or {}).items()},
    )
    return [trim(row, cfg.eos_token_id) for row in new.tolist()]


class RolloutWorker:
    """A Ray actor holding a copy of the policy for sampling (wrap with `ray.remote` to start one)."""

    def __init__(self, ckpt_dir: str, threads: int = 1) -> None:
        """`ckpt_dir`: a local directory, or a checkpoint URL (the actor may run on another node)."""
        from ernie.checkpoint import load_pretrained
        from stages.training.storage import local_checkpoint

        torch.set_num_threads(max(int(threads), 1))
        path, self._ckpt_copy = local_checkpoint(ckpt_dir)
        self.model = load_pretrained(path)
        self.model.eval()
        self.version = -1

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Take the learner's weights (model state dict, through the object store) for rollout round `version`."""
        self.model.load_state_dict(state)
        self.version = version
        return version

    def sample(
        self, requests: list, group: int, max_new_tokens: int, temperature: float, top_p: float
    ) -> tuple[int, list[list[list[int]]]]:
        """(weights version, for each request: `group` completions); a request is a `RolloutRequest` or its fields'
        tuple (prompt ids, seed[, patches, grids])."""
        # one batch for every request (the decode steps are then shared); each request's rows draw
        # from its own seeded generator, so it samples what it would alone
        rows_of = [r if isinstance(r, RolloutRequest) else RolloutRequest(*r) for r in requests for _ in range(group)]
        prompts, seeds = [r.ids for r in rows_of], [r.seed for r in rows_of]
        vision = vision_inputs(rows_of)
        rows = complete(self.model, prompts, max_new_tokens, temperature, top_p, seeds, vision)
        return self.version, [rows[i : i + group] for i in range(0, len(rows), group)]

    def evaluate(
        self, requests: list[RolloutRequest], max_new_tokens: int, temperature: float, top_p: float, samples: int
    ) -> tuple[int, list[list[int]], list[list[list[int]]]]:
        """(weights version, greedy answers of the requests decoded as one batch, `samples` completions of
        each request decoded on their own from its seed): validation as the learner would run it."""
        greedy = complete(self.model, [r.ids for r in requests], max_new_tokens, vision=vision_inputs(requests))
        sampled = [
            complete(
                self.model,
                [r.ids] * samples,
                max_new_tokens,
                temperature,
                top_p,
                r.seed,
                vision=vision_inputs([r] * samples),
            )
            if samples
            else []
            for r in requests
        ]
        return self.version, greedy, sampled
