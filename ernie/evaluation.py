"""Validation loss of a model on packed rows: the one definition eval and quantize both report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .batching import collate
from .losses import shifted_targets


@torch.no_grad()
def val_loss(model, rows: Sequence[Mapping] | Mapping, batch_size: int = 8) -> tuple[float, int]:
    """(mean next-token loss, supervised tokens) on packed rows: row dicts, or stacked {field: [N, ...]}.

    Document-aware: attention and targets stay inside each packed document (document_ids),
    positions restart per document (position_ids), labels -100 carry no loss. The mean is
    over all supervised tokens of all rows, so batching does not change it.
    """
    if isinstance(rows, Mapping):
        rows = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["input_ids"]))]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size])
        images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
        logits = model(
            batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"], **images
        ).logits
        targets, weight = shifted_targets(batch["labels"], None, batch["document_ids"])
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
        total += float((ce * weight.flatten()).sum())
        count += int(weight.sum())
    if count == 0:
        raise ValueError("the validation rows have no supervised tokens (all labels are -100)")
    return total / count, count


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))
