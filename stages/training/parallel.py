"""Data-parallel wrapping shared by pretraining and post-training."""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over `model` on `device`.

    No buffer sync per forward: the router bias is identical on every rank and the expert-load
    counters are per-rank statistics. A VL model looks for unused parameters: a batch without
    images (every post-training chat, some pretraining micro-batches) leaves the vision encoder,
    the adapter and the vision experts out of the graph, on some ranks only, and the ranks'
    gradient buckets would otherwise disagree.
    """
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=getattr(model.config, "vision", None) is not None,
    )
