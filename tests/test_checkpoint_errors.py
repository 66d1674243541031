"""Bad checkpoints and configs are refused with an error that names the bad thing.

Each test breaks one thing in a small valid checkpoint written by `save_pretrained` and
matches the message of the `CheckpointError` / `ConfigError` it raises. Also pinned:
pickled weights are never loaded, release-checkpoint `mtp*` tensors are skipped, and the
largest presets build on the meta device without allocating their weights.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, load_pretrained, save_pretrained
from ernie.config import ConfigError
from ernie.presets import PUBLISHED_PARAMS


# ---------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One valid checkpoint per family, written once; tests edit copies."""
    root = tmp_path_factory.mktemp("valid")
    out = {}
    for name in ("tiny_dense", "tiny_moe", "tiny_vl"):
        torch.manual_seed(0)
        out[name] = save_pretrained(ErnieForCausalLM(get_preset(name)).eval(), root / name)
    return out


def copy_of(saved: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[name], tmp_path / name))


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(directory / SINGLE_FILE)
    edit(tensors)
    save_file(tensors, directory / SINGLE_FILE, metadata={"format": "pt"})


def edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def names(*parts: str) -> str:
    """A regex that requires every part, literally, in order."""
    return ".*".join(re.escape(p) for p in parts)


# ---------------------------------------------------------------------- tensors
def test_valid_checkpoints_load(saved):
    for directory in saved.values():
        load_pretrained(directory)


def test_missing_tensor_is_named(saved, tmp_path):
    d = copy_of(saved, "tiny_moe", tmp_path)
    edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    with pytest.raises(
        CheckpointError, match=names(str(d), "missing tensors", "model.layers.0.self_attn.q_proj.weight")
    ):
        load_pretrained(d)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("tiny_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
        ("tiny_moe", "model.layers.2.mlp.gate.weight"),
        ("tiny_moe", "model.layers.1.mlp.moe_statics.e_score_correction_bias"),
        ("tiny_vl", "model.layers.2.mlp.experts.11.down_proj.weight"),  # a vision expert (E = 8)
        ("tiny_vl", "model.layers.1.mlp.gate.weight_1"),  # the vision router
        ("tiny_vl", "model.vision_model.blocks.0.attn.qkv.weight"),
        ("tiny_vl", "model.resampler_model.spatial_linear.0.weight"),
        ("tiny_dense", "model.layers.1.mlp.down_proj.weight"),
    ],
)
def test_missing_moe_and_vision_tensors_are_named_by_their_checkpoint_name(saved, tmp_path, name, tensor):
    d = copy_of(saved, name, tmp_path)
    assert tensor in load_file(d / SINGLE_FILE)
    edit_tensors(d, lambda t: t.pop(tensor))
    with pytest.raises(CheckpointError, match=names("missing tensors", f"'{tensor}'")):
        load_pretrained(d)


def test_missing_lm_head_of_untied_model_is_named(tmp_path):
    torch.manual_seed(0)
    d = save_pretrained(ErnieForCausalLM(get_preset("tiny_dense").replace(tie_word_embeddings=False)), tmp_path / "c")
    edit_tensors(d, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=names("missing tensors", "lm_head.weight")):
        load_pretrained(d)


@pytest.mark.parametrize(
    ("name", "tensor", "bad_shape", "good_shape"),
    [
        ("tiny_moe", "model.layers.0.self_attn.q_proj.weight", (3, 64), (64, 64)),
        ("tiny_moe", "model.embed_tokens.weight", (500, 64), (512, 64)),
        ("tiny_moe", "model.layers.1.mlp.experts.5.down_proj.weight", (64, 16), (64, 32)),
        ("tiny_moe", "model.layers.1.mlp.gate.weight", (64, 8), (8, 64)),  # text routers are [E, H]
        ("tiny_moe", "model.layers.1.mlp.moe_statics.e_score_correction_bias", (2, 8), (1, 8)),
        ("tiny_vl", "model.layers.1.mlp.gate.weight_1", (8, 64), (64, 8)),  # VL routers are [H, E]
        ("tiny_vl", "model.layers.1.mlp.experts.9.gate_proj.weight", (48, 64), (32, 64)),
    ],
)
def test_misshaped_tensor_is_named_with_both_shapes(saved, tmp_path, name, tensor, bad_shape, good_shape):
    d = copy_of(saved, name, tmp_path)
    edit_tensors(d, lambda t: t.__setitem__(tensor, torch.zeros(bad_shape)))
    with pytest.raises(CheckpointError, match=names("mis-shaped tensors", tensor, str(bad_shape), str(good_shape))):
        load_pretrained(d)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("tiny_dense", "model.layers.0.mlp.extra_proj.weight"),
        ("tiny_moe", "model.layers.1.mlp.experts.8.up_proj.weight"),  # one expert too many (E = 8)
        ("tiny_moe", "model.layers.1.mlp.gate.bias"),  # a stray tensor inside an MoE block
        ("tiny_vl", "model.layers.2.mlp.experts.16.gate_proj.weight"),  # beyond the 2E of a VL block
        ("tiny_vl", "model.vision_model.blocks.7.norm1.weight"),
    ],
)
def test_unexpected_tensor_is_named(saved, tmp_path, name, tensor):
    d = copy_of(saved, name, tmp_path)
    edit_tensors(d, lambda t: t.__setitem__(tensor, torch.zeros(4)))
    with pytest.raises(CheckpointError, match=names("unexpected tensors", f"'{tensor}'")):
        load_pretrained(d)


def test_all_problems_of_one_kind_are_listed_together(saved, tmp_path):
    d = copy_of(saved, "tiny_dense", tmp_path)

    def edit(t):
        t.pop("model.layers.0.self_attn.k_proj.weight")
        t.pop("model.layers.1.self_attn.v_proj.weight")
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(2, 2)
        t["model.foo.weight"] = torch.zeros(1)

    edit_tensors(d, edit)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(d)
    for part in ("k_proj", "v_proj", "o_proj", "model.foo.weight", "missing", "unexpected", "mis-shaped"):
        assert part in str(err.value)


def test_checkpoint_of_another_family_is_refused(saved, tmp_path):
    """MoE weights under a dense config.json: the MoE tensors are unexpected, the MLP missing."""
    d = copy_of(saved, "tiny_moe", tmp_path)
    dense = json.loads((saved["tiny_dense"] / "config.json").read_text())
    edit_config(d, lambda c: (c.clear(), c.update(dense, num_hidden_layers=3)))
    with pytest.raises(CheckpointError, match=names("missing tensors", "model.layers.1.mlp.gate_proj.weight")):
        load_pretrained(d)


# ---------------------------------------------------------------------- release checkpoints: mtp
def test_mtp_tensors_of_release_checkpoints_are_ignored(saved, tmp_path):
    d = copy_of(saved, "tiny_moe", tmp_path)
    mtp = {
        "model.mtp_block.0.self_attn.q_proj.weight": torch.ones(64, 64),
        "model.mtp_block.0.mlp.experts.0.up_proj.weight": torch.ones(32, 64),
        "model.mtp_emb_norm.0.weight": torch.ones(64),
        "model.mtp_hidden_norm.0.weight": torch.ones(64),
        "model.mtp_linear_proj.0.weight": torch.ones(64, 128),
        "mtp_block.0.input_layernorm.weight": torch.ones(64),
    }
    edit_tensors(d, lambda t: t.update(mtp))
    ids = torch.randint(3, 500, (1, 8))
    with torch.no_grad():
        ref = load_pretrained(saved["tiny_moe"])(ids).logits
        out = load_pretrained(d)(ids).logits
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------- files
def test_pickled_weights_are_refused_without_unpickling(saved, tmp_path, monkeypatch):
    d = tmp_path / "bin_only"
    d.mkdir()
    shutil.copy(saved["tiny_dense"] / "config.json", d / "config.json")
    sentinel = tmp_path / "unpickled"

    class Payload:  # unpickling this creates `sentinel`
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(CheckpointError, match=names("pytorch_model.bin", "safetensors")):
        load_pretrained(d)
    assert not sentinel.exists()


def test_directory_without_weights_is_refused(saved, tmp_path):
    d = tmp_path / "no_weights"
    d.mkdir()
    shutil.copy(saved["tiny_dense"] / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match=names(SINGLE_FILE, INDEX_FILE)):
        load_pretrained(d)


@pytest.fixture
def sharded(tmp_path) -> Path:
    torch.manual_seed(0)
    d = save_pretrained(ErnieForCausalLM(get_preset("tiny_moe")), tmp_path / "sharded", max_shard_bytes=64 * 1024)
    assert (d / INDEX_FILE).is_file()
    return d


def test_index_listing_a_missing_shard_is_refused(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=names("model-00099-of-00099.safetensors", "missing")):
        load_pretrained(sharded)


def test_deleted_shard_is_refused(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=names(shard.name, "listed in", INDEX_FILE, "missing")):
        load_pretrained(sharded)


@pytest.mark.parametrize("content", ["{not json", "[]", '{"metadata": {}}'])
def test_broken_index_is_refused(sharded, content):
    (sharded / INDEX_FILE).write_text(content)
    with pytest.raises(CheckpointError, match=names(INDEX_FILE, "not a safetensors index")):
        load_pretrained(sharded)


# ---------------------------------------------------------------------- config.json
def test_missing_config_json_is_refused(saved, tmp_path):
    d = copy_of(saved, "tiny_dense", tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_pretrained(d)


@pytest.mark.parametrize("content", ['{"architectures": ["Ernie4_5ForCausalLM"],', ""])
def test_invalid_json_config_is_refused(saved, tmp_path, content):
    d = copy_of(saved, "tiny_dense", tmp_path)
    (d / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=names("config.json", "is not valid JSON")):
        load_pretrained(d)


def test_config_json_that_is_not_an_object_is_refused(saved, tmp_path):
    d = copy_of(saved, "tiny_dense", tmp_path)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=names("config.json", "JSON list, not an object")):
        load_pretrained(d)


@pytest.mark.parametrize("architectures", [["LlamaForCausalLM"], ["Qwen2MoeForCausalLM"]])
def test_unknown_architecture_is_refused_by_name(saved, tmp_path, architectures):
    d = copy_of(saved, "tiny_dense", tmp_path)
    edit_config(d, lambda c: c.update(architectures=architectures))
    with pytest.raises(ConfigError, match=names(architectures[0], "is not an ERNIE 4.5 model", "Ernie4_5ForCausalLM")):
        load_pretrained(d)


def test_config_without_architectures_is_refused(saved, tmp_path):
    d = copy_of(saved, "tiny_moe", tmp_path)
    edit_config(d, lambda c: c.pop("architectures"))
    with pytest.raises(ConfigError, match=names("architectures=[]", "is not an ERNIE 4.5 model")):
        load_pretrained(d)


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("tiny_dense", "num_hidden_layers"),
        ("tiny_dense", "vocab_size"),
        ("tiny_moe", "moe_num_experts"),
        ("tiny_moe", "moe_k"),
        ("tiny_vl", "text_config"),
        ("tiny_vl", "vision_config"),
    ],
)
def test_missing_required_field_is_named(saved, tmp_path, name, field):
    d = copy_of(saved, name, tmp_path)
    edit_config(d, lambda c: c.pop(field))
    with pytest.raises(ConfigError, match=names("config.json lacks the field", f"'{field}'")):
        load_pretrained(d)


def test_missing_required_field_of_vl_text_config_is_named(saved, tmp_path):
    d = copy_of(saved, "tiny_vl", tmp_path)
    edit_config(d, lambda c: c["text_config"].pop("hidden_size"))
    with pytest.raises(ConfigError, match=names("lacks the field", "'hidden_size'")):
        load_pretrained(d)


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("tiny_dense", {"num_key_value_heads": 3}, "model.num_kv_heads=3 must divide num_heads=4"),
        ("tiny_dense", {"vocab_size": 0}, "model.vocab_size=0 must be positive"),
        ("tiny_moe", {"moe_k": 9}, "model.moe.top_k=9 must not exceed moe.num_experts=8"),
    ],
)
def test_inconsistent_config_values_are_named(saved, tmp_path, name, edit, message):
    d = copy_of(saved, name, tmp_path)
    edit_config(d, lambda c: c.update(edit))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_pretrained(d)


# ---------------------------------------------------------------------- large configs on meta
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("preset", ["ernie_21b", "ernie_300b", "ernie_vl_424b"])
def test_large_preset_builds_on_meta_without_memory(preset):
    cfg = get_preset(preset)
    rss = _rss_bytes()
    start = time.perf_counter()
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"building {preset} on meta took {elapsed:.1f}s"
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert _rss_bytes() - rss < 256 * 2**20  # the bf16 weights alone would be 40-850 GB
    total = model.num_params()
    published = PUBLISHED_PARAMS[preset][0]
    assert abs(total - published) / published < 0.05, (
        f"{preset}: {total / 1e9:.1f}B vs published {published / 1e9:.0f}B"
    )
