"""vLLM exports of a quantized model (stages/quantize/export.py): read back by readers that do not
share the writer's code (the compressed-tensors library itself; a GPTQ reader written here from the
published layout) they give exactly the weights our engine runs."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tiny_artifacts
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import stages.quantize as quantize
from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import to_hub_state_dict
from ernie.quant import dequantize
from pipeline.contract import UserError
from stages.quantize.export import pack_rows, quantized_tensors, unpack_rows, write_export
from stages.quantize.rtn import by_bits, quantization_targets, quantize_model


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), words=st.integers(1, 4), seed=st.integers(0, 999))
def test_packed_rows_round_trip(bits, rows, words, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**bits, (rows, words * 32 // bits), generator=g)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_rows(packed, bits), values)


def _quantized_model(name: str, bits: int, symmetric: bool) -> ErnieForCausalLM:
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(name)).eval()
    quantize_model(model, bits, 16, symmetric, ["lm_head", "vision_encoder", "adapter"])
    return model


def _ours(model) -> dict[str, torch.Tensor]:
    """Published prefix -> the weight our engine runs (fp32)."""
    return {w.prefix: dequantize(w.codes, w.scales, w.zeros, w.group_size) for w in quantized_tensors(model)}


def _gptq_read(tensors: dict[str, torch.Tensor], prefix: str, bits: int, v2: bool) -> torch.Tensor:
    """GPTQ layout as published (AutoGPTQ / GPTQModel): qweight [in / f, out] with input row r*f + j
    at bits j*bits of word r; qzeros [groups, out / f] alike along the output; v1 zeros stored - 1."""
    f, mask = 32 // bits, (1 << bits) - 1
    qweight = tensors[f"{prefix}.qweight"].numpy().view(np.uint32)
    qzeros = tensors[f"{prefix}.qzeros"].numpy().view(np.uint32)
    scales = tensors[f"{prefix}.scales"].float().numpy()
    g_idx = tensors[f"{prefix}.g_idx"].numpy()
    codes = np.stack([(qweight >> (bits * j)) & mask for j in range(f)], axis=1).reshape(-1, qweight.shape[1])
    zeros = np.stack([(qzeros >> (bits * j)) & mask for j in range(f)], axis=2).reshape(qzeros.shape[0], -1)
    zeros = zeros.astype(np.float32) + (0 if v2 else 1)
    weight_in_out = (codes.astype(np.float32) - zeros[g_idx]) * scales[g_idx]
    return torch.from_numpy(weight_in_out.T.copy())


@pytest.mark.parametrize(
    ("name", "bits", "symmetric"), [("tiny_moe", 4, False), ("tiny_moe", 2, True), ("tiny_vl", 8, False)]
)
def test_gptq_export_reads_back_as_our_weights(tmp_path, name, bits, symmetric):
    model = _quantized_model(name, bits, symmetric)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out = write_export(model, "gptq", tmp_path / "gptq", tmp_path / "tok", symmetric)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq",
        bits,
        16,
        symmetric,
        False,
    )
    assert qc["checkpoint_format"] == ("gptq" if symmetric else "gptq_v2")
    tensors = load_file(out / "model.safetensors")
    ours = _ours(model)
    assert any(".experts." in prefix for prefix in ours), "the routed experts are exported"
    for prefix, weight in ours.items():
        read = _gptq_read(tensors, prefix, bits, qc["checkpoint_format"] == "gptq_v2")
        torch.testing.assert_close(read, weight, rtol=0, atol=0, msg=prefix)
    # every other published tensor is there, in bf16 (routers fp32), and the skipped layers are named
    published = to_hub_state_dict(ErnieForCausalLM(get_preset(name)))
    for key in published:
        prefix = key.rsplit(".", 1)[0]
        if prefix in ours:
            continue
        assert key in tensors, key
        assert tensors[key].dtype == (torch.float32 if ".gate." in key or "correction" in key else torch.bfloat16), key
    skipped = list(qc["dynamic"])
    if name == "tiny_vl":
        assert any("vision_model" in rule for rule in skipped) and all(rule.startswith("-:") for rule in skipped)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("symmetric", [False, True])
def test_compressed_tensors_export_is_decompressed_by_the_library_to_our_weights(tmp_path, symmetric):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _quantized_model("tiny_moe", 4, symmetric)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out = write_export(model, "compressed-tensors", tmp_path / "ct", tmp_path / "tok", symmetric)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    tensors = load_file(out / "model.safetensors")
    for prefix, weight in _ours(model).items():
        local = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        read = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        # the library multiplies in the scale's dtype (fp16); ours in fp32 from the same fp16 scale
        torch.testing.assert_close(read.float(), weight, rtol=1e-3, atol=1e-4, msg=prefix)
    assert "model.layers.0.self_attn.q_proj" not in qc.ignore


def test_exports_that_cannot_hold_the_weights_are_refused_before_any_work():
    with pytest.raises(UserError, match="compressed-tensors holds 4/8-bit weights, not 2-bit ones"):
        quantize.validate(quantize.Config(bits=2, export=["compressed-tensors"]))
    with pytest.raises(UserError, match="'awq' is not a known format"):
        quantize.validate(quantize.Config(export=["awq"]))
    with pytest.raises(UserError, match="compressed-tensors holds 4/8-bit weights, not 2-bit ones"):
        quantize.validate(quantize.Config(module_bits={"*.mlp": 2}, export=["compressed-tensors"]))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tiny_artifacts.build(tmp_path_factory.getbasetemp() / "tiny_artifacts")


def _gptq_bits(qc: dict, prefix: str) -> int:
    """A layer's width as vLLM resolves it: the first `dynamic` rule whose regex matches the prefix ("-:": not
    quantized, "+:": its overrides), else the config's bits."""
    for rule, override in qc["dynamic"].items():
        if re.match(rule[2:], prefix):
            return 0 if rule.startswith("-:") else override.get("bits", qc["bits"])
    return qc["bits"]


def test_the_stage_writes_the_gptq_export_of_the_weights_it_saved_at_their_own_widths(artifacts, tmp_path):
    from ernie.quant import load_quantized

    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    module_bits = {"*.self_attn": 8, "model.layers.0.mlp": 2}
    cfg = quantize.Config(group_size=16, export=["gptq"], eval_rows=8, module_bits=module_bits)
    quantize.run(tiny_artifacts.context("quantize", cfg, inputs, tmp_path))
    tensors = load_file(tmp_path / "export-gptq" / "model.safetensors")
    qc = json.loads((tmp_path / "export-gptq" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4
    saved = _ours(load_quantized(tmp_path))
    widths = {}
    for prefix, weight in saved.items():
        bits = widths[prefix] = _gptq_bits(qc, prefix)
        torch.testing.assert_close(_gptq_read(tensors, prefix, bits, v2=True), weight, rtol=0, atol=0, msg=prefix)
    assert widths["model.layers.0.self_attn.q_proj"] == widths["model.layers.1.self_attn.v_proj"] == 8
    assert widths["model.layers.0.mlp.up_proj"] == 2 and widths["model.layers.1.mlp.experts.0.down_proj"] == 4
    # vLLM fuses q/k/v and gate/up, and runs a block's experts as one layer: the rules name those layers too
    for fused, bits in [("model.layers.1.self_attn.qkv_proj", 8), ("model.layers.0.mlp.gate_up_proj", 2)]:
        assert _gptq_bits(qc, fused) == bits
    assert _gptq_bits(qc, "model.layers.1.mlp.experts") == 4
    assert (tmp_path / "export-gptq" / "tokenizer.json").is_file()


def test_compressed_tensors_holds_each_width_in_its_own_group_read_by_the_library(tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe")).eval()
    targets = quantization_targets(model, ["lm_head"])
    for bits, group in by_bits(targets, {"*.self_attn": 8}, 4).items():
        quantize_model(model, bits, 16, False, targets=group)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    out = write_export(model, "compressed-tensors", tmp_path / "ct", tmp_path / "tok", False)
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert [g.weights.num_bits for g in qc.config_groups.values()] == [4, 8]
    by_name = qc.config_groups["group_1"]
    tensors = load_file(out / "model.safetensors")
    for prefix, weight in _ours(model).items():
        named = any(re.fullmatch(t.removeprefix("re:"), prefix) for t in by_name.targets)
        assert named == (".self_attn." in prefix), prefix
        scheme = by_name if named else qc.config_groups["group_0"]
        local = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        read = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        torch.testing.assert_close(read.float(), weight, rtol=1e-3, atol=1e-4, msg=prefix)


def test_layers_vllm_fuses_at_different_widths_are_refused_with_the_layers_named(tmp_path):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe")).eval()
    targets = quantization_targets(model, ["lm_head"])
    for bits, group in by_bits(targets, {"model.layers.0.self_attn.q_proj": 8}, 4).items():
        quantize_model(model, bits, 16, False, targets=group)
    (tmp_path / "tok").mkdir()
    with pytest.raises(UserError, match=r"one layer model\.layers\.0\.self_attn\.qkv_proj.*q_proj: 8"):
        write_export(model, "gptq", tmp_path / "gptq", tmp_path / "tok", False)
