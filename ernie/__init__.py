"""ERNIE 4.5 in PyTorch: dense, text MoE and multimodal heterogeneous MoE models.

Importable with PyTorch and safetensors alone (no Ray, MLflow or Hydra), so the GPU
benchmarks and kernels run on machines that only have PyTorch. The names below load on
first use, so torch-free modules (`ernie.config`, `ernie.chat_template`) stay cheap to
import: the data stage's Ray workers use them and never need torch for text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr

_EXPORTS = {
    "ConfigError": "config",
    "ErnieConfig": "config",
    "LossConfig": "config",
    "MoEConfig": "config",
    "VisionConfig": "config",
    "KVCache": "cache",
    "ErnieForCausalLM": "model",
    "ErnieOutput": "model",
    "PRESETS": "presets",
    "get_preset": "presets",
    "shrink": "presets",
}
__all__ = [
    "PRESETS",
    "ConfigError",
    "ErnieConfig",
    "ErnieForCausalLM",
    "ErnieOutput",
    "KVCache",
    "LossConfig",
    "MoEConfig",
    "VisionConfig",
    "get_preset",
    "shrink",
]

if TYPE_CHECKING:
    from .cache import KVCache
    from .config import ConfigError, ErnieConfig, LossConfig, MoEConfig, VisionConfig
    from .model import ErnieForCausalLM, ErnieOutput
    from .presets import PRESETS, get_preset, shrink


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
