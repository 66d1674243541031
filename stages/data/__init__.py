"""The `data` stage: sources (bundled corpus or files, local or s3://) -> packed multimodal shards + stats.

Entry point and run commands: `stages.data.stage`. Modules, one job each: `sources` (file
listing and per-file parsing into raw records), `bundled` (the on-machine corpus: `stdlib_corpus`
real text, `arithmetic` facts and post-training sets, `scenes` generated images with known
answers), `tokenizer` (bundled byte-level BPE) and
`tokenizer_dir` (ERNIE's own tokenizer from a directory), `encode` (documents -> tokens,
patches, 3D positions), `dataflow` (the Ray Data read/encode pipeline), `mixture` (source
weights -> interleaved stream), `packing` (best-fit-decreasing rows, micro-batch balance),
`stats` (stats.json, metrics, plots).

The stage's names load on first use, so a Ray Data task that imports `stages.data.encode` does
not import the whole stage (and torch with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ernie.lazy import lazy_getattr

_EXPORTS = {"Config": "config", "INPUTS": "stage", "OUTPUT_KIND": "stage", "run": "stage"}
__all__ = ["INPUTS", "OUTPUT_KIND", "Config", "run"]

if TYPE_CHECKING:
    from .config import Config
    from .stage import INPUTS, OUTPUT_KIND, run


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
