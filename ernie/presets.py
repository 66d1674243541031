"""The published ERNIE 4.5 architectures and tiny same-family presets for tests and dry runs.

Numbers come from the HF transformers configs, ERNIEKit model configs and the model cards
(see `shared/ERNIE_FACTS.md` §1). Two are not published in any source we could read and
are marked where they are set: the 300B / VL-424B `tie_word_embeddings`, and the VL-424B
vision-expert width, which is derived from the published 424B total.
"""

from __future__ import annotations

from .config import ConfigError, ErnieConfig, MoEConfig, VisionConfig

# The ViT of the VL models (HF `Ernie4_5_VLMoeVisionConfig` defaults, ERNIEKit `dfnrope`).
_VIT = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=5120, patch_size=14)


def ernie_0_3b() -> ErnieConfig:
    return ErnieConfig(
        name="ernie-4.5-0.3b",
        hidden_size=1024,
        num_layers=18,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
    )


def ernie_21b_a3b() -> ErnieConfig:
    return ErnieConfig(
        name="ernie-4.5-21b-a3b",
        hidden_size=2560,
        num_layers=28,
        num_heads=20,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=True,
        moe=MoEConfig(num_experts=64, top_k=6, intermediate_size=1536, num_shared_experts=2, layer_start=1),
    )


def ernie_300b_a47b() -> ErnieConfig:
    return ErnieConfig(
        name="ernie-4.5-300b-a47b",
        hidden_size=8192,
        num_layers=54,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=28672,
        # Unverified: sources disagree (MindIE test True, FastDeploy test False); untied is
        # the safe choice for loading (an lm_head tensor is read when present either way).
        tie_word_embeddings=False,
        moe=MoEConfig(num_experts=64, top_k=8, intermediate_size=3584, num_shared_experts=0, layer_start=3),
    )


def ernie_vl_28b_a3b() -> ErnieConfig:
    text = ernie_21b_a3b()
    return text.replace(
        name="ernie-4.5-vl-28b-a3b",
        moe=MoEConfig(
            num_experts=64,
            top_k=6,
            intermediate_size=1536,
            num_shared_experts=2,
            layer_start=1,
            vision_num_experts=64,
            vision_intermediate_size=512,
        ),
        vision=VisionConfig(**_VIT),
    )


def ernie_vl_424b_a47b() -> ErnieConfig:
    text = ernie_300b_a47b()
    return text.replace(
        name="ernie-4.5-vl-424b-a47b",
        moe=MoEConfig(
            num_experts=64,
            top_k=8,
            intermediate_size=3584,
            num_shared_experts=0,
            layer_start=3,
            vision_num_experts=64,
            # Unverified: derived, 424B total - 299.5B text tower - 0.8B ViT leaves 123B for
            # 51 layers x 64 vision experts x 3 x 8192 x I, which gives I = 1536.
            vision_intermediate_size=1536,
        ),
        vision=VisionConfig(**_VIT),
    )


def tiny_dense() -> ErnieConfig:
    return ErnieConfig(
        name="tiny-dense",
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=4096,
    )


def tiny_moe() -> ErnieConfig:
    return tiny_dense().replace(
        name="tiny-moe",
        num_layers=3,
        moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=32, num_shared_experts=1, layer_start=1),
    )


def tiny_vl() -> ErnieConfig:
    return tiny_dense().replace(
        name="tiny-vl",
        num_layers=3,
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            intermediate_size=32,
            num_shared_experts=1,
            layer_start=1,
            vision_num_experts=8,
            vision_intermediate_size=32,
        ),
        vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, patch_size=14),
        mrope_section=(3, 3, 2),
        # ids of the bundled tokenizer (`ernie.chat_template.SPECIAL_TOKENS` order)
        image_token_id=5,
        image_start_token_id=6,
        image_end_token_id=7,
        video_token_id=8,
        video_start_token_id=9,
        video_end_token_id=10,
    )


PRESETS = {
    "ernie_0_3b": ernie_0_3b,
    "ernie_21b": ernie_21b_a3b,
    "ernie_300b": ernie_300b_a47b,
    "ernie_vl_28b": ernie_vl_28b_a3b,
    "ernie_vl_424b": ernie_vl_424b_a47b,
    "tiny_dense": tiny_dense,
    "tiny_moe": tiny_moe,
    "tiny_vl": tiny_vl,
}

# Published (total, active) parameter counts, in parameters.
PUBLISHED_PARAMS: dict[str, tuple[float, float | None]] = {
    "ernie_0_3b": (0.36e9, None),  # a total only; no active figure is published for a dense model
    "ernie_21b": (21e9, 3e9),
    "ernie_300b": (300e9, 47e9),
    "ernie_vl_28b": (28e9, 3e9),
    "ernie_vl_424b": (424e9, 47e9),
}


def get_preset(name: str) -> ErnieConfig:
    """The named preset, validated; an unknown name lists the known ones."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
    return factory().validate()


def shrink(config: ErnieConfig) -> ErnieConfig:
    """A tiny model of the same family and topology, for dry runs of a real preset."""
    tiny = {"dense": tiny_dense, "moe": tiny_moe, "vl_moe": tiny_vl}[config.family]()
    tiny.name = f"{config.name}-dry-run"
    tiny.tie_word_embeddings = config.tie_word_embeddings
    if config.moe is not None and tiny.moe is not None:
        tiny.moe.num_shared_experts = min(config.moe.num_shared_experts, 1)
        # keep a dense prefix when the real model has one (300B: layers 0-2 dense)
        tiny.moe.layer_start = min(config.moe.layer_start, tiny.num_layers - 1)
    return tiny.validate()
