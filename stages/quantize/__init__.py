"""quantize: weight-only post-training quantization of a checkpoint, with a measured quality report.

    python -m pipeline run conf=tiny stages=[quantize]
    python -m pipeline run conf=tiny stages=[quantize] quantize.group_size=64 quantize.symmetric=true
    python -m pipeline run conf=tiny stages=[quantize] quantize.method=tcq quantize.bits=2

Inputs: `ckpt` (HF layout + tokenizer/) and `dataset` (its val rows measure perplexity, its
tasks/val.jsonl task accuracy, its train rows calibrate gptq / tcq).
The checkpoint is quantized one decoder layer at a time (stages/quantize/stream.py): memory holds
the embeddings, head and vision parts, one decoder layer and the rows' hidden states, never the
whole model. Output (qckpt): the packed model (`ernie.quant.QuantizedWriter`: config.json,
quant_config.json, one safetensors shard per decoder layer and their index), a copy of the
tokenizer, `quant_report.json` (bits, group size, method, bytes before / after, size ratio, bits
per weight counting every stored byte, validation perplexity before / after and its delta, task
accuracy before / after overall and per task, per-module weight reconstruction error, per-layer
hidden-state drift) and `quant_error.png`; with `quantize.export=[gptq]` (the pipeline presets) or
`[compressed-tensors]`, the same weights in a layout vLLM loads, under `export-<format>/`
(stages/quantize/export.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ernie.lazy import lazy_getattr

_EXPORTS = {"Config": "config", "validate": "config", "INPUTS": "stage", "OUTPUT_KIND": "stage", "run": "stage"}
__all__ = ["INPUTS", "OUTPUT_KIND", "Config", "run", "validate"]

if TYPE_CHECKING:
    from .config import Config, validate
    from .stage import INPUTS, OUTPUT_KIND, run


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS, fallback="stage")
"""The stage's names load on first use: the CLI reads and checks `Config` without importing torch."""
