"""The `data` stage: bundled corpus -> tokenizer -> packed shards + post-training sets.

Entry point and run commands: `stages.data.stage`. Modules, one job each: `stdlib_corpus`
(real text from the stdlib docs), `arithmetic` (generated facts, SFT, preferences, held-out
eval tasks), `corpus` (dedupe, shuffle, split), `tokenizer` (byte-level BPE), `packing`
(rows with document masking), `stats` (stats.json, metrics, plot).
"""

from .config import Config
from .stage import INPUTS, OUTPUT_KIND, run

__all__ = ["Config", "INPUTS", "OUTPUT_KIND", "run"]
