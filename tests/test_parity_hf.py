"""Parity with HF transformers' own ERNIE 4.5 models, both ways through the checkpoint.

    ours --save_pretrained--> dir --transformers.<arch>.from_pretrained--> same logits
    HF (random init) --save_pretrained--> dir --ernie.checkpoint.load_pretrained--> same logits

fp32 throughout, tolerance 1e-4 on the logits (observed ~3e-7). Routers get a non-zero
`e_score_correction_bias` so the bias-corrected top-k selection is exercised (and the
tests check that it changes the choice). The VL inputs hold two images of different sizes,
a video and a batch of 2 rows. Also pinned: the `config.json` architectures, the published
tensor names / shapes / dtypes (ERNIE_FACTS §3), sharded checkpoints, and fp32 routers in
bf16 checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("transformers")

from hf_reference import hf_model_from_config, load_hf  # noqa: E402

from ernie import ErnieForCausalLM, get_preset  # noqa: E402
from ernie.checkpoint import INDEX_FILE, SINGLE_FILE, load_pretrained, save_pretrained  # noqa: E402
from ernie.config import ErnieConfig  # noqa: E402
from ernie.moe import Router  # noqa: E402
from ernie.positions import vl_position_ids  # noqa: E402

ATOL = 1e-4
BIAS_STD = 0.05  # router probs are ~1/E = 0.125 +- 0.02 at init: a 0.05 bias reorders the top-k
PATCH_DIM = 3 * 14 * 14


# ---------------------------------------------------------------------- helpers
def tiny(name: str) -> ErnieConfig:
    if name == "tiny_dense_untied":
        return get_preset("tiny_dense").replace(tie_word_embeddings=False)
    return get_preset(name)


def ours_model(cfg: ErnieConfig, seed: int = 0) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    model = ErnieForCausalLM(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.copy_(torch.randn(module.e_score_correction_bias.shape) * BIAS_STD)
    return model


def hf_model(cfg: ErnieConfig, seed: int = 0):
    """HF's model with random init and a non-zero router bias on every MoE gate."""
    torch.manual_seed(seed)
    model = hf_model_from_config(cfg)
    biases = {n: p for n, p in model.named_parameters() if n.endswith("e_score_correction_bias")}
    if cfg.moe is not None:
        pools = ["mlp.text_moe.gate", "mlp.vision_moe.gate"] if cfg.vision is not None else ["mlp.gate"]
        prefix = "model.language_model.layers" if cfg.vision is not None else "model.layers"
        expected = {
            f"{prefix}.{i}.{pool}.moe_statics.e_score_correction_bias" for i in cfg.moe_layers for pool in pools
        }
        assert set(biases) == expected
    with torch.no_grad():
        for p in biases.values():
            p.copy_(torch.randn(p.shape) * BIAS_STD)
    return model


def assert_close(ours: torch.Tensor, ref: torch.Tensor, atol: float = ATOL) -> None:
    assert ours.shape == ref.shape
    assert ref.float().std() > 1e-2, "reference logits are trivially constant"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff < atol, f"max |ours - HF| = {diff:.3g} >= {atol}"


def assert_bias_changes_routing(out) -> None:
    """At least one token's expert set differs from the plain top-k of the probabilities."""
    changed = 0
    for layer in out.routing:
        for r in layer:
            plain = r.probs_TE.topk(r.topk_ids_TK.shape[1], dim=-1).indices.sort(-1).values
            changed += int((plain != r.topk_ids_TK.sort(-1).values).any(-1).sum())
    assert changed > 0, "the router bias never changed an expert choice; the test would not see it"


def assert_loaded_cleanly(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{key}: {info[key]}"


def text_ids(cfg: ErnieConfig, batch: int = 2, length: int = 12) -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(11, min(cfg.vocab_size, 500), (batch, length))  # tiny_vl ids 5..10 are vision tokens


def vl_inputs(cfg: ErnieConfig) -> dict[str, torch.Tensor]:
    """Row 0: text, a 4x6-patch image, text, a 2x2-patch image, text.
    Row 1: text, a 2x4-patch image, text, a 4-frame 4x4-patch video, text (padded to row 0's length).
    """
    g = torch.Generator().manual_seed(7)

    def text(n: int) -> list[int]:
        return torch.randint(11, 500, (n,), generator=g).tolist()

    def image(h: int, w: int) -> list[int]:
        return [cfg.image_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.image_end_token_id]

    def video(t: int, h: int, w: int) -> list[int]:
        return [cfg.video_start_token_id] + [cfg.video_token_id] * (t * h * w // 8) + [cfg.video_end_token_id]

    rows = [
        text(3) + image(4, 6) + text(2) + image(2, 2) + text(4),
        text(2) + image(2, 4) + text(1) + video(4, 4, 4) + text(2),
    ]
    length = max(map(len, rows))
    ids = torch.tensor([row + text(length - len(row)) for row in rows])
    image_grid = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 2, 4]])
    video_grid = torch.tensor([[4, 4, 4]])
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(int(image_grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "image_grid_thw": image_grid,
        "pixel_values_videos": torch.randn(int(video_grid.prod(-1).sum()), PATCH_DIM, generator=g),
        "video_grid_thw": video_grid,
    }


def hf_vl_kwargs(cfg: ErnieConfig, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF wants the modality of each token: 1 image / 2 video placeholders for the 3D positions,
    and placeholders plus start/end markers for the vision experts."""
    ids = inputs["input_ids"]
    mm = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    moe_mm = torch.isin(ids, torch.tensor(cfg.vision_token_ids)).int()
    return {**inputs, "mm_token_type_ids": mm, "moe_mm_token_type_ids": moe_mm}


@torch.no_grad()
def ours_forward(model: ErnieForCausalLM, inputs: dict[str, torch.Tensor]):
    return model(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})


@torch.no_grad()
def hf_logits(hf, cfg: ErnieConfig, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = hf_vl_kwargs(cfg, inputs) if cfg.vision is not None else inputs
    return hf(**kwargs, use_cache=False).logits


def model_inputs(cfg: ErnieConfig) -> dict[str, torch.Tensor]:
    return vl_inputs(cfg) if cfg.vision is not None else {"input_ids": text_ids(cfg)}


def tensor_meta(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    files = [SINGLE_FILE]
    if (directory / INDEX_FILE).is_file():
        files = sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
    meta = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                meta[name] = (tuple(t.shape), t.dtype)
    return meta


# ---------------------------------------------------------------------- parity, both directions
FAMILIES = ["tiny_dense", "tiny_dense_untied", "tiny_moe", "tiny_vl"]


@pytest.mark.parametrize("name", FAMILIES)
def test_ours_save_loads_in_hf_with_equal_logits(name, tmp_path):
    cfg = tiny(name)
    model = ours_model(cfg)
    inputs = model_inputs(cfg)
    out = ours_forward(model, inputs)
    if cfg.moe is not None:
        assert_bias_changes_routing(out)

    save_pretrained(model, tmp_path)
    hf, info = load_hf(tmp_path)
    assert_loaded_cleanly(info)
    assert_close(out.logits, hf_logits(hf, cfg, inputs))


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_save_loads_in_ours_with_equal_logits(name, tmp_path):
    cfg = tiny(name)
    hf = hf_model(cfg)
    inputs = model_inputs(cfg)
    ref = hf_logits(hf, cfg, inputs)

    hf.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path).eval()
    assert model.config.family == cfg.family
    out = ours_forward(model, inputs)
    if cfg.moe is not None:
        assert_bias_changes_routing(out)
    assert_close(out.logits, ref)


def test_vl_inputs_cover_images_video_and_both_expert_pools():
    """Guards the VL parity inputs: two image sizes, a video, 2 rows, text and vision routing."""
    cfg = tiny("tiny_vl")
    inputs = vl_inputs(cfg)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 2
    assert len({tuple(g) for g in inputs["image_grid_thw"][:, 1:].tolist()}) == 3
    assert int(inputs["video_grid_thw"][0, 0]) in (2, 4)
    assert int((ids == cfg.video_token_id).sum()) == int(inputs["video_grid_thw"].prod()) // 8
    out = ours_forward(ours_model(cfg), inputs)
    assert all({r.pool for r in layer} == {"text", "vision"} for layer in out.routing)


def test_vl_positions_match_hf_get_rope_index():
    cfg = tiny("tiny_vl")
    inputs = vl_inputs(cfg)
    hf = hf_model(cfg)
    kwargs = hf_vl_kwargs(cfg, inputs)
    ref, _ = hf.model.get_rope_index(
        kwargs["input_ids"],
        mm_token_type_ids=kwargs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        video_grid_thw=inputs["video_grid_thw"],
    )
    ours = vl_position_ids(inputs["input_ids"], cfg, inputs["image_grid_thw"], inputs["video_grid_thw"])
    assert ours.shape == (3, *inputs["input_ids"].shape)
    assert torch.equal(ours, ref)
    # truly 3D: the axes differ inside the image / video blocks
    assert not torch.equal(ours[1], ours[2]) and not torch.equal(ours[0], ours[1])


# ---------------------------------------------------------------------- sharded checkpoints
@pytest.mark.parametrize("name", ["tiny_moe", "tiny_vl"])
def test_sharded_checkpoint_loads_in_hf_and_ours(name, tmp_path):
    cfg = tiny(name)
    model = ours_model(cfg)
    inputs = model_inputs(cfg)
    ref = ours_forward(model, inputs).logits

    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 3
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    meta = tensor_meta(tmp_path)
    assert set(index["weight_map"]) == set(meta)
    for shard in shards:
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
    nbytes = sum(torch.Size(s).numel() * torch.tensor([], dtype=d).element_size() for s, d in meta.values())
    assert index["metadata"]["total_size"] == nbytes

    hf, info = load_hf(tmp_path)
    assert_loaded_cleanly(info)
    assert_close(ref, hf_logits(hf, cfg, inputs))
    assert_close(ours_forward(load_pretrained(tmp_path).eval(), inputs).logits, ref)


def test_resave_unsharded_removes_stale_index(tmp_path):
    model = ours_model(tiny("tiny_moe"))
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)
    save_pretrained(model, tmp_path)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    load_pretrained(tmp_path)


# ---------------------------------------------------------------------- layout of what we write
@pytest.mark.parametrize(
    ("name", "arch", "model_type"),
    [
        ("tiny_dense", "Ernie4_5ForCausalLM", "ernie4_5"),
        ("tiny_moe", "Ernie4_5_MoeForCausalLM", "ernie4_5_moe"),
        ("tiny_vl", "Ernie4_5_VLMoeForConditionalGeneration", "ernie4_5_vl_moe"),
    ],
)
def test_config_json_names_the_hf_architecture(name, arch, model_type, tmp_path):
    save_pretrained(ours_model(tiny(name)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [arch]
    assert config["model_type"] == model_type
    assert config["dtype"] == "float32"
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny(name).eos_token_id


def test_dense_tensor_layout(tmp_path):
    cfg = tiny("tiny_dense")
    save_pretrained(ours_model(cfg), tmp_path)
    meta = tensor_meta(tmp_path)
    H, inter, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    f32 = torch.float32
    assert meta["model.embed_tokens.weight"] == ((V, H), f32)
    assert meta["model.norm.weight"] == ((H,), f32)
    assert "lm_head.weight" not in meta  # tied
    for L in range(cfg.num_layers):
        p = f"model.layers.{L}"
        assert meta[f"{p}.self_attn.q_proj.weight"] == ((cfg.num_heads * D, H), f32)
        assert meta[f"{p}.self_attn.k_proj.weight"] == ((cfg.num_kv_heads * D, H), f32)
        assert meta[f"{p}.self_attn.v_proj.weight"] == ((cfg.num_kv_heads * D, H), f32)
        assert meta[f"{p}.self_attn.o_proj.weight"] == ((H, cfg.num_heads * D), f32)
        assert meta[f"{p}.mlp.gate_proj.weight"] == ((inter, H), f32)
        assert meta[f"{p}.mlp.up_proj.weight"] == ((inter, H), f32)
        assert meta[f"{p}.mlp.down_proj.weight"] == ((H, inter), f32)
        assert meta[f"{p}.input_layernorm.weight"] == ((H,), f32)
        assert meta[f"{p}.post_attention_layernorm.weight"] == ((H,), f32)
    assert len(meta) == 2 + 9 * cfg.num_layers


def test_untied_checkpoint_writes_lm_head(tmp_path):
    cfg = tiny("tiny_dense_untied")
    save_pretrained(ours_model(cfg), tmp_path)
    assert tensor_meta(tmp_path)["lm_head.weight"] == ((cfg.vocab_size, cfg.hidden_size), torch.float32)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False


def test_moe_tensor_layout(tmp_path):
    cfg = tiny("tiny_moe")
    save_pretrained(ours_model(cfg), tmp_path)
    meta = tensor_meta(tmp_path)
    H, E, inter, f32 = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.intermediate_size, torch.float32
    assert cfg.moe_layers == [1, 2]
    assert meta["model.layers.0.mlp.gate_proj.weight"] == ((cfg.intermediate_size, H), f32)  # dense layer 0
    assert not any(k.startswith("model.layers.0.mlp.") and ("experts" in k or ".gate." in k) for k in meta)
    for L in cfg.moe_layers:
        p = f"model.layers.{L}.mlp"
        assert meta[f"{p}.gate.weight"] == ((E, H), f32)
        assert meta[f"{p}.moe_statics.e_score_correction_bias"] == ((1, E), f32)
        S = inter * cfg.moe.num_shared_experts
        assert meta[f"{p}.shared_experts.gate_proj.weight"] == ((S, H), f32)
        assert meta[f"{p}.shared_experts.up_proj.weight"] == ((S, H), f32)
        assert meta[f"{p}.shared_experts.down_proj.weight"] == ((H, S), f32)
        for e in range(E):
            assert meta[f"{p}.experts.{e}.gate_proj.weight"] == ((inter, H), f32)
            assert meta[f"{p}.experts.{e}.up_proj.weight"] == ((inter, H), f32)
            assert meta[f"{p}.experts.{e}.down_proj.weight"] == ((H, inter), f32)
        assert f"{p}.experts.{E}.gate_proj.weight" not in meta
        assert not any(k.startswith(p) and (".text." in k or "gate_up_proj" in k) for k in meta)


def test_vl_tensor_layout(tmp_path):
    cfg = tiny("tiny_vl")
    model = ours_model(cfg)
    save_pretrained(model, tmp_path)
    meta = tensor_meta(tmp_path)
    m, H, f32 = cfg.moe, cfg.hidden_size, torch.float32
    E, I_text, I_vision = m.num_experts, m.intermediate_size, m.vision_intermediate_size
    for L in cfg.moe_layers:
        p = f"model.layers.{L}.mlp"
        assert meta[f"{p}.gate.weight"] == ((H, E), f32)  # text router, stored transposed
        assert meta[f"{p}.gate.weight_1"] == ((H, E), f32)  # vision router
        assert meta[f"{p}.moe_statics.e_score_correction_bias"] == ((2, E), f32)
        for e in range(E):  # text experts 0..E-1, vision experts E..2E-1
            assert meta[f"{p}.experts.{e}.gate_proj.weight"] == ((I_text, H), f32)
            assert meta[f"{p}.experts.{e}.down_proj.weight"] == ((H, I_text), f32)
            assert meta[f"{p}.experts.{E + e}.up_proj.weight"] == ((I_vision, H), f32)
            assert meta[f"{p}.experts.{E + e}.down_proj.weight"] == ((H, I_vision), f32)
        assert f"{p}.experts.{2 * E}.gate_proj.weight" not in meta
        # the rows / transposes hold the right routers
        layer = model.model.layers[L].mlp
        with safe_open(tmp_path / SINGLE_FILE, framework="pt") as f:
            assert torch.equal(f.get_tensor(f"{p}.gate.weight"), layer.text.gate.weight.T)
            assert torch.equal(f.get_tensor(f"{p}.gate.weight_1"), layer.vision.gate.weight.T)
            bias = f.get_tensor(f"{p}.moe_statics.e_score_correction_bias")
            assert torch.equal(bias[0], layer.text.gate.e_score_correction_bias)
            assert torch.equal(bias[1], layer.vision.gate.e_score_correction_bias)
            vision_gate_up = layer.vision.experts.gate_up_proj[3]
            assert torch.equal(f.get_tensor(f"{p}.experts.{E + 3}.gate_proj.weight"), vision_gate_up[:I_vision])
            assert torch.equal(f.get_tensor(f"{p}.experts.{E + 3}.up_proj.weight"), vision_gate_up[I_vision:])
    # ViT under `model.vision_model.`, adapter under `model.resampler_model.` (HF renames both on load)
    assert meta["model.vision_model.blocks.0.attn.qkv.weight"][0] == (
        3 * cfg.vision.hidden_size,
        cfg.vision.hidden_size,
    )
    for part in ("spatial_linear", "temporal_linear"):
        for idx in (0, 2, 3):
            assert f"model.resampler_model.{part}.{idx}.weight" in meta
    assert not any(re.match(r"(vision_encoder|adapter)\.", k) for k in meta)


# ---------------------------------------------------------------------- bf16
def test_bf16_checkpoint_keeps_router_in_fp32(tmp_path):
    cfg = tiny("tiny_moe")
    model = ours_model(cfg).to(torch.bfloat16)
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    meta = tensor_meta(tmp_path)
    for name, (_, dtype) in meta.items():
        router = name.endswith(".mlp.gate.weight") or name.endswith("e_score_correction_bias")
        assert dtype == (torch.float32 if router else torch.bfloat16), name

    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        if name.endswith(".gate.weight") or name.endswith("e_score_correction_bias"):
            assert tensor.dtype == torch.float32, name
        elif tensor.is_floating_point() and name not in ("rope_inv_freq",) and not name.endswith("expert_load"):
            assert tensor.dtype == torch.bfloat16, name
    for L in cfg.moe_layers:
        src, dst = model.model.layers[L].mlp.text.gate, loaded.model.layers[L].mlp.text.gate
        assert torch.equal(dst.weight, src.weight.float())
        assert torch.equal(dst.e_score_correction_bias, src.e_score_correction_bias.float())
    with torch.no_grad():
        logits = loaded(text_ids(cfg)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_fp32_checkpoint_loaded_as_bf16_keeps_router_in_fp32(tmp_path):
    cfg = tiny("tiny_vl")
    model = ours_model(cfg)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    for L in cfg.moe_layers:
        for pool in ("text", "vision"):
            src, dst = getattr(model.model.layers[L].mlp, pool).gate, getattr(loaded.model.layers[L].mlp, pool).gate
            assert dst.weight.dtype == dst.e_score_correction_bias.dtype == torch.float32
            assert torch.equal(dst.weight, src.weight) and torch.equal(
                dst.e_score_correction_bias, src.e_score_correction_bias
            )
        assert loaded.model.layers[L].mlp.text.experts.gate_up_proj.dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_bf16_smoke_parity(name, tmp_path):
    """bf16 on both sides, from the same bf16 checkpoint.

    bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), and the two implementations
    round at different points (sdpa vs eager attention, fused vs per-expert MoE), so
    exact agreement is not expected. A router near-tie could also flip one expert choice,
    so we compare with an error budget relative to the logit scale (2%, about 5 bf16 steps;
    observed 0.3-0.6%) and require that the greedy next token agrees on nearly every
    position (observed: all).
    """
    cfg = tiny(name)
    save_pretrained(ours_model(cfg).to(torch.bfloat16), tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    import transformers

    hf = getattr(transformers, json.loads((tmp_path / "config.json").read_text())["architectures"][0]).from_pretrained(
        tmp_path, dtype=torch.bfloat16, attn_implementation="eager"
    )
    ids = text_ids(cfg, batch=2, length=16)
    with torch.no_grad():
        a, b = ours(ids).logits.float(), hf(input_ids=ids, use_cache=False).logits.float()
    scale = b.abs().max().item()
    assert scale > 1e-2
    assert (a - b).abs().max().item() < 0.02 * scale
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
