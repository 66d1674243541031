"""ERNIE 4.5 in PyTorch: dense, text MoE and multimodal heterogeneous MoE models.

Importable with PyTorch and safetensors alone (no Ray, MLflow or Hydra), so the GPU
benchmarks and kernels run on machines that only have PyTorch.
"""

from .cache import KVCache
from .config import ConfigError, ErnieConfig, LossConfig, MoEConfig, VisionConfig
from .model import ErnieForCausalLM, ErnieOutput
from .presets import PRESETS, get_preset, shrink

__all__ = [
    "ConfigError",
    "ErnieConfig",
    "ErnieForCausalLM",
    "ErnieOutput",
    "KVCache",
    "LossConfig",
    "MoEConfig",
    "PRESETS",
    "VisionConfig",
    "get_preset",
    "shrink",
]
