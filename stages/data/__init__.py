"""The `data` stage: sources (bundled corpus or files, local or s3://) -> packed multimodal shards + stats.

Entry point and run commands: `stages.data.stage`. Modules, one job each: `sources` (file
listing and per-file parsing into raw records), `bundled` (the on-machine corpus: `stdlib_corpus`
real text, `arithmetic` facts and post-training sets, `scenes` generated images with known
answers), `images` (Pillow -> ViT patches), `tokenizer` (bundled byte-level BPE) and
`tokenizer_dir` (ERNIE's own tokenizer from a directory), `encode` (documents -> tokens,
patches, 3D positions), `dataflow` (the Ray Data read/encode pipeline), `mixture` (source
weights -> interleaved stream), `packing` (best-fit-decreasing rows, micro-batch balance),
`stats` (stats.json, metrics, plots).
"""

from .config import Config
from .stage import INPUTS, OUTPUT_KIND, run

__all__ = ["Config", "INPUTS", "OUTPUT_KIND", "run"]
