"""Gradient accumulation shared by pretraining and post-training: one optimizer step's gradients
from several forward + backward passes (micro-batches), each weighted by its share of the step.

    parts = [collate(rows) for rows in split_rows(worker_rows, micro_batch)]
    shares = lm_shares(parts, model.config.loss.token_balanced, layout)   # counted over the step's ranks
    kept = accumulate(layout, train_model, model, parts, forward)   # forward(part) -> (weighted loss, kept)

A loss that is a mean over some unit (supervised tokens, pairs, completion tokens, rows) splits
exactly: a micro-batch's mean weighed by its share of the step's units, counted over every rank of
the step (`Layout.over_ranks`), so the step does not depend on how many workers share it. `accumulate` runs the
backward passes the data-parallel layout needs (DDP all-reduces in the last micro-batch only) and
leaves the step's gradients on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ernie.losses import shifted_targets

from .parallel import Layout

LOSS_NAMES = ("loss", "lm", "aux", "z", "orthogonal")
"""The parts of a model's own loss (`ErnieOutput.loss` and `.losses`), in the order `weighted_lm_loss` returns them."""

Part = TypeVar("Part")


def split_rows(rows: Sequence[Part], micro_batch: int) -> list[Sequence[Part]]:
    """Consecutive micro-batches of `micro_batch` rows (0 = one of all rows). Rows, not collated
    tensors, are split: a VL batch's pixel_values hold per-image patches, not one entry per row."""
    size = micro_batch or len(rows)
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def accumulate(
    layout: Layout,
    train_model: torch.nn.Module,
    model: torch.nn.Module,
    parts: Sequence[Part],
    forward: Callable[[Part], tuple[torch.Tensor, Any]],
) -> list[Any]:
    """Forward + backward of every micro-batch in `parts`; returns what each `forward` kept.

    `forward(part)` returns the part's loss already weighted by its share of the step, and
    anything to keep (detached: metrics). After the last part the gradients on `model`, data- and
    expert-parallel reductions done, are those of the step's loss.
    """
    kept = []
    for i, part in enumerate(parts):
        with layout.no_sync(train_model, last=i == len(parts) - 1):
            loss, result = forward(part)
            loss.backward()
        kept.append(result)
        del loss  # this micro-batch's graph and logits must not live through the next one's forward
    layout.reduce_expert_grads(model)
    return kept


@dataclass(frozen=True)
class LMShare:
    """A micro-batch's weights in its step's loss, for a model's own LM + router loss."""

    rows: float
    """Its share of the step's rows: the router losses (means over tokens) and the loss total."""
    lm: float
    """Its share of the step's supervised tokens: the LM loss value (a mean over them)."""
    lm_grad: float
    """The weight of its LM gradient: `lm`, or under the token-balanced loss, whose gradient divides
    by the prediction slots (rows x (length - 1)), its slots over the step's slots at the step's
    padded length."""


def lm_shares(
    batches: Sequence[dict[str, torch.Tensor]], token_balanced: bool, layout: Layout | None = None
) -> list[LMShare]:
    """The shares of collated micro-batches (input_ids, labels, optional loss_mask and document_ids) in the
    step of all of `layout`'s ranks (None: this process alone).

    The step's supervised tokens, rows and padded length are counted over the ranks (`Layout.over_ranks`),
    and each share is multiplied by the number of ranks, which DDP / FSDP divide by when they average the
    gradients: a step on 2 workers is the step on 1 worker over the same rows."""
    supervised = torch.stack(
        [shifted_targets(b["labels"], b.get("loss_mask"), b.get("document_ids"))[1].sum() for b in batches]
    ).float()
    rows = [len(b["input_ids"]) for b in batches]
    length = max(b["input_ids"].shape[1] for b in batches)
    ranks = 1 if layout is None else layout.world
    counts = torch.tensor([float(supervised.sum()), float(sum(rows))])
    step_supervised, step_rows = (counts if layout is None else layout.over_ranks(counts)).tolist()
    if layout is not None and token_balanced:
        length = int(layout.over_ranks(torch.tensor([float(length)]), "max")[0])
    row_shares = [ranks * r / step_rows for r in rows]
    lm = [ranks * s / step_supervised for s in supervised.tolist()] if step_supervised > 0 else row_shares
    if token_balanced:
        whole = step_rows * (length - 1)
        grad = [ranks * r * (b["input_ids"].shape[1] - 1) / whole for r, b in zip(rows, batches, strict=True)]
    else:
        grad = lm
    return [LMShare(*shares) for shares in zip(row_shares, lm, grad, strict=True)]


def weighted_lm_loss(out, share: LMShare) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to backward, the LOSS_NAMES values) of one micro-batch's model output at its `share`:
    both sum over the step's micro-batches to the whole step's (the load-balance loss, a product of
    two means, only approximately)."""
    lm = out.losses["lm"]
    zero = torch.zeros((), device=lm.device)
    # the whole loss by the row share, the LM part moved to its own share (x1.0: one micro-batch)
    backward = out.loss * share.rows + (share.lm_grad - share.rows) * lm
    values = [out.loss * share.rows + (share.lm - share.rows) * lm, lm * share.lm]
    values += [out.losses.get(name, zero) * share.rows for name in LOSS_NAMES[2:]]
    return backward, torch.stack([v.detach().float() for v in values])
