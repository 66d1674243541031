"""Typed configuration for the ERNIE 4.5 family.

One `ErnieConfig` describes all three families: dense (no `moe`), text MoE (`moe` set) and
multimodal heterogeneous MoE (`moe` with vision experts, plus `vision`). Every config is
checked by `validate()`; a violation raises `ConfigError` naming the field and the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

RECOMPUTE_POLICIES = ("none", "layers", "mlp")
"""Activation recomputation in training (`ernie.recompute`): nothing, whole decoder layers, or the MLPs only."""
LORA_TARGETS = ("attention", "mlp", "experts")
"""Weights LoRA adapters can go on (`ernie.lora`): attention (q/k/v/o projections), mlp (dense SwiGLU layers and
shared experts), experts (every routed expert's gate/up and down weights)."""

Family = Literal["dense", "moe", "vl_moe"]


class ConfigError(ValueError):
    """An inconsistent model configuration; the message names the offending field."""


@dataclass
class MoEConfig:
    """Routed experts of the MoE layers (text pool; vision pool for VL models)."""

    num_experts: int = 64
    """Routed text experts per MoE layer."""
    top_k: int = 6
    """Experts each token is sent to (inside its modality's pool)."""
    intermediate_size: int = 1536
    """SwiGLU width of one routed text expert."""
    num_shared_experts: int = 2
    """Shared experts, fused into one MLP of width `intermediate_size * num_shared_experts`."""
    layer_start: int = 1
    """First layer index that may be MoE."""
    layer_end: int = -1
    """Last layer index that may be MoE; -1 means the last layer."""
    layer_interval: int = 1
    """Layer `l` is MoE iff `(l + 1) % layer_interval == 0` and start <= l <= end."""
    norm_min: float = 1e-12
    """Floor of the top-k weight sum when renormalising (ERNIEKit `moe_norm_min`)."""
    vision_num_experts: int = 0
    """Routed vision experts per MoE layer (VL models only; 0 for text models)."""
    vision_intermediate_size: int = 0
    """SwiGLU width of one routed vision expert."""


@dataclass
class VisionConfig:
    """The ViT over variable-resolution patches and the adapter into the language model."""

    depth: int = 32
    """Transformer blocks of the vision encoder."""
    hidden_size: int = 1280
    """Width of the vision encoder."""
    num_heads: int = 16
    """Attention heads of the vision encoder."""
    intermediate_size: int = 5120
    """Width of the vision encoder's MLPs."""
    patch_size: int = 14
    """Side of a square pixel patch, in pixels."""
    in_channels: int = 3
    """Colour channels of the pixels (RGB)."""
    spatial_merge_size: int = 2
    """2x2 neighbouring patches become one language-model token."""
    temporal_merge_size: int = 2
    """Two frames become one token; a still image is duplicated into two frames."""
    layer_norm_eps: float = 1e-6
    """Epsilon of the vision encoder's LayerNorms."""
    rope_theta: float = 10000.0
    """Base of the vision encoder's 2D rotary frequencies."""
    hidden_act: str = "quick_gelu"
    """Activation of the vision encoder's MLPs."""

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size * self.patch_size


@dataclass
class LossConfig:
    """Weights of the named loss components (see `ernie.losses`)."""

    aux_loss_weight: float = 1e-2
    """Router load-balance loss (ERNIEKit default 1e-2; published pre-training configs 1e-5)."""
    z_loss_weight: float = 1e-4
    """Router z-loss, mean squared logsumexp of the router logits."""
    orthogonal_loss_weight: float = 1e-3
    """Router orthogonal loss ||W W^T - I||^2 / E^2 on the row-normalised gate."""
    token_balanced: bool = True
    """Multimodal token-balanced LM loss: gradient uses a constant denominator (all slots)."""


@dataclass
class ErnieConfig:
    """Architecture of one ERNIE 4.5 model (text tower; `vision` for the VL models)."""

    name: str = "custom"
    """The architecture's name (a preset's: ernie_0_3b, ernie_21b...); shown in plans and errors."""
    vocab_size: int = 103424
    """Token embeddings and output logits (the data stage's tokenizer must match it)."""
    hidden_size: int = 1024
    """Width of the residual stream."""
    num_layers: int = 18
    """Decoder layers."""
    num_heads: int = 16
    """Query heads of attention."""
    num_kv_heads: int = 2
    """Key / value heads (grouped-query attention: num_heads is a multiple)."""
    head_dim: int = 128
    """Width of one attention head."""
    intermediate_size: int = 3072
    """Width of the dense SwiGLU MLP (non-MoE layers)."""
    rope_theta: float = 500000.0
    """Base of the rotary position frequencies."""
    max_position_embeddings: int = 131072
    """Longest context the model serves (prompt plus completion)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of the RMSNorms."""
    tie_word_embeddings: bool = True
    """The output projection shares the input embedding's weights."""
    initializer_range: float = 0.02
    """Standard deviation of the initial weights of a model trained from scratch."""
    pad_token_id: int = 0
    """Padding token (never a training target)."""
    bos_token_id: int = 1
    """Beginning-of-sequence token."""
    eos_token_id: int = 2
    """End-of-sequence token: generation stops at it."""
    moe: MoEConfig | None = None
    vision: VisionConfig | None = None
    mrope_section: tuple[int, int, int] = (22, 22, 20)
    """Frequency pairs given to (height, width, time) by the 3D RoPE of VL models."""
    image_token_id: int = 100295
    """Placeholder token replaced by an image's merged patch embeddings (VL models)."""
    image_start_token_id: int = 101304
    """Token before an image's placeholders."""
    image_end_token_id: int = 101305
    """Token after an image's placeholders."""
    video_token_id: int = 103367
    """Placeholder token of a video's merged patches (VL models; videos are not served yet)."""
    video_start_token_id: int = 101306
    """Token before a video's placeholders."""
    video_end_token_id: int = 101307
    """Token after a video's placeholders."""
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.loss, dict):
            self.loss = LossConfig(**self.loss)
        self.mrope_section = tuple(self.mrope_section)

    # ---------------------------------------------------------------- derived facts
    @property
    def family(self) -> Family:
        if self.vision is not None:
            return "vl_moe"
        return "moe" if self.moe is not None else "dense"

    @property
    def num_kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def moe_layer_end(self) -> int:
        assert self.moe is not None
        return self.num_layers - 1 if self.moe.layer_end == -1 else self.moe.layer_end

    def is_moe_layer(self, layer: int) -> bool:
        """The MoE layer rule shared by HF, vLLM and ERNIEKit."""
        if self.moe is None:
            return False
        m = self.moe
        return (layer + 1) % m.layer_interval == 0 and m.layer_start <= layer <= self.moe_layer_end

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Tokens routed to vision experts: placeholders and the image/video start/end markers."""
        return (
            self.image_token_id,
            self.image_start_token_id,
            self.image_end_token_id,
            self.video_token_id,
            self.video_start_token_id,
            self.video_end_token_id,
        )

    def replace(self, **changes) -> ErnieConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------- validation
    def validate(self) -> ErnieConfig:
        """Raise `ConfigError` naming the first inconsistent field; return self when sound."""
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"]
        for key in positive:
            _require(getattr(self, key) > 0, key, getattr(self, key), "must be positive")
        if self.family == "dense" or any(not self.is_moe_layer(i) for i in range(self.num_layers)):
            _require(self.intermediate_size > 0, "intermediate_size", self.intermediate_size, "must be positive")
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            self.num_kv_heads,
            f"must divide num_heads={self.num_heads}",
        )
        _require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even for RoPE")
        _require(
            self.hidden_size % self.num_heads == 0,
            "num_heads",
            self.num_heads,
            f"must divide hidden_size={self.hidden_size}",
        )
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            _require(0 <= value < self.vocab_size, key, value, f"must lie in [0, vocab_size={self.vocab_size})")
        if self.moe is not None:
            self._validate_moe(self.moe)
        if self.vision is not None:
            self._validate_vision(self.vision)
        return self

    def _validate_moe(self, m: MoEConfig) -> None:
        _require(m.num_experts > 0, "moe.num_experts", m.num_experts, "must be positive")
        _require(m.top_k > 0, "moe.top_k", m.top_k, "must be positive")
        _require(m.top_k <= m.num_experts, "moe.top_k", m.top_k, f"must not exceed moe.num_experts={m.num_experts}")
        _require(m.intermediate_size > 0, "moe.intermediate_size", m.intermediate_size, "must be positive")
        _require(m.num_shared_experts >= 0, "moe.num_shared_experts", m.num_shared_experts, "must be >= 0")
        _require(m.layer_interval > 0, "moe.layer_interval", m.layer_interval, "must be positive")
        _require(
            0 <= m.layer_start < self.num_layers,
            "moe.layer_start",
            m.layer_start,
            f"must lie in [0, num_layers={self.num_layers})",
        )
        _require(
            m.layer_end == -1 or m.layer_start <= m.layer_end,
            "moe.layer_end",
            m.layer_end,
            f"must be -1 or >= moe.layer_start={m.layer_start}",
        )
        _require(bool(self.moe_layers), "moe.layer_start", m.layer_start, "selects no MoE layer")
        if self.vision is not None:
            # The published checkpoint layout keeps both pools in one expert index space and
            # one [2, E] bias, so HF transformers and vLLM need the pools equally large.
            _require(
                m.vision_num_experts == m.num_experts,
                "moe.vision_num_experts",
                m.vision_num_experts,
                f"must equal moe.num_experts={m.num_experts} for a VL model",
            )
            _require(
                m.vision_intermediate_size > 0,
                "moe.vision_intermediate_size",
                m.vision_intermediate_size,
                "must be positive for a VL model",
            )
        else:
            _require(
                m.vision_num_experts == 0,
                "moe.vision_num_experts",
                m.vision_num_experts,
                "needs a `vision` config (only VL models have vision experts)",
            )

    def _validate_vision(self, v: VisionConfig) -> None:
        _require(self.moe is not None, "moe", None, "a VL model needs MoE layers with vision experts")
        sizes = ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "in_channels")
        for key in (*sizes, "spatial_merge_size"):
            _require(getattr(v, key) > 0, f"vision.{key}", getattr(v, key), "must be positive")
        _require(
            v.hidden_size % v.num_heads == 0,
            "vision.num_heads",
            v.num_heads,
            f"must divide vision.hidden_size={v.hidden_size}",
        )
        _require(
            (v.hidden_size // v.num_heads) % 4 == 0,
            "vision.hidden_size",
            v.hidden_size,
            "per-head width must be a multiple of 4 for the 2D RoPE",
        )
        _require(v.temporal_merge_size == 2, "vision.temporal_merge_size", v.temporal_merge_size, "must be 2")
        h, w, t = self.mrope_section
        _require(
            h == w and h + w + t == self.head_dim // 2,
            "mrope_section",
            list(self.mrope_section),
            f"needs h == w and h + w + t == head_dim/2 = {self.head_dim // 2}",
        )


def _require(ok: bool, key: str, value, why: str) -> None:
    if not ok:
        raise ConfigError(f"model.{key}={value!r} {why}")
