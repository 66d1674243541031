"""`config.json` in the HF transformers format, both ways.

We write what transformers 5.x `save_pretrained` writes for `Ernie4_5ForCausalLM`,
`Ernie4_5_MoeForCausalLM` and `Ernie4_5_VLMoeForConditionalGeneration`, plus the flat
`rope_theta` older readers (transformers 4.x, vLLM) look for.
"""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ErnieConfig, MoEConfig, VisionConfig

ARCHITECTURES = {
    "dense": ("Ernie4_5ForCausalLM", "ernie4_5"),
    "moe": ("Ernie4_5_MoeForCausalLM", "ernie4_5_moe"),
    "vl_moe": ("Ernie4_5_VLMoeForConditionalGeneration", "ernie4_5_vl_moe"),
}
_FAMILY_OF_ARCH = {arch: family for family, (arch, _) in ARCHITECTURES.items()}
_FAMILY_OF_ARCH["Ernie4_5_VL_MoeForConditionalGeneration"] = "vl_moe"  # deprecated alias


def to_hf_config(cfg: ErnieConfig, dtype: str = "float32") -> dict[str, Any]:
    arch, model_type = ARCHITECTURES[cfg.family]
    text = _text_fields(cfg)
    if cfg.family != "vl_moe":
        return {"architectures": [arch], "model_type": model_type, "dtype": dtype, **text}
    m, v = cfg.moe, cfg.vision
    text.update(
        model_type="ernie4_5_vl_moe_text",
        moe_intermediate_size=[m.intermediate_size, m.vision_intermediate_size],
        mlp_layer_types=["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_layers)],
    )
    text["rope_parameters"]["mrope_section"] = list(cfg.mrope_section)
    for key in ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"):
        text.pop(key)
    vision = {
        "model_type": "ernie4_5_vl_moe_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "patch_size": v.patch_size,
        "in_channels": v.in_channels,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_merge_size": v.temporal_merge_size,
        "rms_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
        "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
    }
    tokens = {k: getattr(cfg, k) for k in _VL_TOKEN_KEYS}
    return {
        "architectures": [arch],
        "model_type": model_type,
        "dtype": dtype,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "text_config": text,
        "vision_config": vision,
        **tokens,
    }


_VL_TOKEN_KEYS = (
    "image_token_id",
    "image_start_token_id",
    "image_end_token_id",
    "video_token_id",
    "video_start_token_id",
    "video_end_token_id",
)


def _text_fields(cfg: ErnieConfig) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_bias": False,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
    }
    if cfg.moe is not None:
        m = cfg.moe
        fields.update(
            moe_num_experts=m.num_experts,
            moe_k=m.top_k,
            moe_intermediate_size=m.intermediate_size,
            moe_num_shared_experts=m.num_shared_experts,
            moe_layer_start_index=m.layer_start,
            moe_layer_end_index=cfg.moe_layer_end,
            moe_layer_interval=m.layer_interval,
            moe_norm_min=m.norm_min,
        )
    return fields


def from_hf_config(hf: dict[str, Any], name: str = "checkpoint") -> ErnieConfig:
    """Our config from a `config.json` dict; unknown architectures are refused by name."""
    archs = hf.get("architectures") or []
    family = next((_FAMILY_OF_ARCH[a] for a in archs if a in _FAMILY_OF_ARCH), None)
    if family is None:
        raise ConfigError(
            f"config.json architectures={archs!r} is not an ERNIE 4.5 model; expected one of {sorted(_FAMILY_OF_ARCH)}"
        )
    try:
        text = hf["text_config"] if family == "vl_moe" else hf
        cfg = _config_from_text(text, family, name)
        if family == "vl_moe":
            _add_vision(cfg, hf, text)
    except KeyError as missing:
        raise ConfigError(f"config.json lacks the field {missing} needed for {archs[0]}") from None
    return cfg.validate()


def _config_from_text(t: dict[str, Any], family: str, name: str) -> ErnieConfig:
    rope = t.get("rope_parameters") or {}
    theta = rope.get("rope_theta", t.get("rope_theta", 500000.0))
    heads = t["num_attention_heads"]
    cfg = ErnieConfig(
        name=name,
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        intermediate_size=t["intermediate_size"],
        rope_theta=float(theta),
        max_position_embeddings=t.get("max_position_embeddings", 131072),
        rms_norm_eps=t.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=t.get("tie_word_embeddings", True),
        initializer_range=t.get("initializer_range", 0.02),
        pad_token_id=_first(t.get("pad_token_id"), 0),
        bos_token_id=_first(t.get("bos_token_id"), 1),
        eos_token_id=_first(t.get("eos_token_id"), 2),
    )
    if family == "dense":
        return cfg
    experts = _pair(t["moe_num_experts"])
    widths = _pair(t["moe_intermediate_size"])
    moe = MoEConfig(
        num_experts=experts[0],
        top_k=_pair(t["moe_k"])[0],
        intermediate_size=widths[0],
        num_shared_experts=t.get("moe_num_shared_experts", 0),
        norm_min=t.get("moe_norm_min", 1e-12),
    )
    if family == "vl_moe":
        moe.vision_num_experts, moe.vision_intermediate_size = experts[-1], widths[-1]
        _layers_from_types(moe, t, cfg.num_layers)
    else:
        moe.layer_start = _pair(t.get("moe_layer_start_index", 1))[0]
        end = _pair(t.get("moe_layer_end_index", -1))[0]
        moe.layer_end = -1 if end in (-1, cfg.num_layers - 1) else end
        moe.layer_interval = t.get("moe_layer_interval", 1)
    cfg.moe = moe
    return cfg


def _layers_from_types(moe: MoEConfig, t: dict[str, Any], num_layers: int) -> None:
    """HF VL configs list each layer as dense / sparse; we need (start, end, interval)."""
    types = t.get("mlp_layer_types")
    if types is None:
        moe.layer_start = _pair(t.get("moe_layer_start_index", 1))[0]
        return
    sparse = [i for i, kind in enumerate(types) if kind == "sparse"]
    if not sparse:
        raise ConfigError("config.json text_config.mlp_layer_types has no 'sparse' layer")
    start, end = sparse[0], sparse[-1]
    interval = sparse[1] - sparse[0] if len(sparse) > 1 else 1
    expected = [i for i in range(num_layers) if (i + 1) % interval == 0 and start <= i <= end]
    if expected != sparse:
        raise ConfigError(f"config.json text_config.mlp_layer_types={types} is not a start/end/interval pattern")
    moe.layer_start, moe.layer_interval = start, interval
    moe.layer_end = -1 if end == num_layers - 1 else end


def _add_vision(cfg: ErnieConfig, hf: dict[str, Any], text: dict[str, Any]) -> None:
    v = hf["vision_config"]
    rope = v.get("rope_parameters") or {}
    cfg.vision = VisionConfig(
        depth=v["depth"],
        hidden_size=v.get("hidden_size", v.get("embed_dim")),
        num_heads=v["num_heads"],
        intermediate_size=v.get("intermediate_size", 4 * v.get("embed_dim", 1280)),
        patch_size=v.get("patch_size", 14),
        in_channels=v.get("in_channels", 3),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        temporal_merge_size=v.get("temporal_merge_size", 2),
        layer_norm_eps=v.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        hidden_act=v.get("hidden_act", "quick_gelu"),
    )
    section = (text.get("rope_parameters") or {}).get("mrope_section")
    if section is None:
        t = text.get("freq_allocation", 20)
        hw = (cfg.head_dim // 2 - t) // 2
        section = [hw, hw, t]
    cfg.mrope_section = tuple(section)
    for key in _VL_TOKEN_KEYS:
        if hf.get(key) is not None:
            setattr(cfg, key, hf[key])


def _pair(value):
    return value if isinstance(value, list) else [value]


def _first(value, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else value
