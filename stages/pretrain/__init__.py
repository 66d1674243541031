"""Pretraining: the packed rows of a dataset artifact -> an HF-layout checkpoint.

    python -m pipeline run conf=tiny until=pretrain pretrain.steps=300

Ray Train `TorchTrainer` runs `num_workers` data-parallel ranks (DDP; gloo on CPU, NCCL on
GPU), each streaming its own shards of the dataset's train split (see data.py; text or VL rows).
AdamW with warmup + cosine decay, gradient clipping, LM + router losses; validation loss every
`eval_every` steps. Every `checkpoint_every` steps the workers write the resumable train state
(sharded, torch.distributed.checkpoint) to `<state_uri>/train_state/` (an fsspec URL under a
remote artifact root, e.g. s3://bucket/prefix/.work/pretrain/KEY/train_state) or, under a
local root, `<work_dir>/train_state/`; a rerun with the same cache key resumes from it exactly
(step, LR, RNG, optimizer, data cursor), and so does a worker group that Ray Train restarts
after a worker died. Under a remote root every node reaches what the workers read and write:
they stream the dataset's shards from the artifact's URL, and Ray Train's own storage (the final
checkpoint on its way to this process) is `<state_uri>/ray/`. Under a local root (one node: the
orchestrator refuses a local root on a cluster of several) they use this node's copies.

Output (ckpt): config.json, model.safetensors, generation_config.json, tokenizer/ (copied
from the dataset), train_state/ (the final train state and its metric history).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ernie.lazy import lazy_getattr

_EXPORTS = {"Config": "config", "INPUTS": "stage", "OUTPUT_KIND": "stage", "run": "stage"}
__all__ = ["INPUTS", "OUTPUT_KIND", "Config", "run"]

if TYPE_CHECKING:
    from .config import Config
    from .stage import INPUTS, OUTPUT_KIND, run


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS, fallback="stage")
"""The stage's names load on first use: the CLI reads `Config` without importing torch."""
