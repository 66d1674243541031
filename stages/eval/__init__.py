"""eval: what a model-producing stage did to the model, measured on the dataset's held-out data.

    python -m pipeline run conf=tiny                     # runs eval after every model stage
    python -m pipeline run conf=tiny eval.max_items=0    # every task item, not a sample

Inputs: `model` (a ckpt, or a qckpt: detected by its quant_config.json) and `dataset`.
Metrics: `val_loss` / `val_ppl` over the dataset's val rows (document-aware, labels -100
ignored), `task_accuracy/<task>` on tasks/val.jsonl (chat prompt with the generation prompt,
greedy answer, text before the end-of-sentence token, stripped, exact match) and the overall
`task_accuracy`. Writes `eval.json` (metrics, counts, a few predictions) to its output dir.
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
