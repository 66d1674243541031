"""The packed weight-only format of `ernie.quant`: packing, the quantized modules, disk round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import save_pretrained
from ernie.moe import GroupedExperts
from ernie.quant import (
    QUANT_CONFIG_FILE,
    WEIGHTS_FILE,
    QuantFormatError,
    QuantizedGroupedExperts,
    QuantizedLinear,
    dequantize,
    load_model,
    load_quantized,
    pack,
    packed_length,
    quantized_modules,
    save_quantized,
    unpack,
)


@st.composite
def codes_and_bits(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    length = draw(st.integers(1, 37))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (*lead, length), generator=gen, dtype=torch.int64)
    return codes, bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_pack_unpack_round_trip_for_any_codes_and_shape(case):
    codes, bits = case
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], packed_length(codes.shape[-1], bits))
    assert torch.equal(unpack(packed, codes.shape[-1], bits).long(), codes)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=64))
def test_int4_extreme_and_listed_codes_round_trip(values):
    codes = torch.tensor([values])
    assert torch.equal(unpack(pack(codes), len(values)).long(), codes)


def test_int4_byte_layout_is_low_nibble_first():
    # code 2j in the low nibble of byte j, code 2j+1 in its high nibble; an odd tail pads with 0
    assert pack(torch.tensor([[1, 2, 15, 0, 7]])).tolist() == [[0x21, 0x0F, 0x07]]


def test_pack_rejects_codes_out_of_range_and_unpack_a_wrong_length():
    with pytest.raises(QuantFormatError, match=r"\[0, 15\]"):
        pack(torch.tensor([[16]]))
    with pytest.raises(QuantFormatError, match="cannot hold"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), length=8)
    with pytest.raises(QuantFormatError, match="bits=3"):
        pack(torch.tensor([[1]]), bits=3)


def test_dequantize_is_codes_minus_zero_times_scale_per_group():
    codes = torch.tensor([[0, 8, 15, 9]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]], dtype=torch.float16)
    zeros = torch.tensor([[8, 10]], dtype=torch.uint8)
    assert dequantize(codes, scales, zeros, group_size=2).tolist() == [[-4.0, 0.0, 10.0, -2.0]]


def _random_quantized(shape, bits=4, group_size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    *lead, out_f, in_f = shape
    codes = torch.randint(0, 2**bits, shape, generator=gen).to(torch.uint8)
    scales = (torch.rand(*lead, out_f, in_f // group_size, generator=gen) * 0.05 + 1e-3).half()
    zeros = torch.randint(0, 2**bits, (*lead, out_f, in_f // group_size), generator=gen).to(torch.uint8)
    return codes, scales, zeros


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6),
    st.sampled_from([8, 16, 32]),
    st.integers(1, 4),
    st.sampled_from([2, 4, 8]),
    st.booleans(),
    st.integers(0, 1000),
)
def test_quantized_linear_equals_linear_with_the_dequantized_weight(out_f, group, groups, bits, bias, seed):
    in_f = group * groups
    codes, scales, zeros = _random_quantized((out_f, in_f), bits, group, seed)
    b = torch.randn(out_f) if bias else None
    layer = QuantizedLinear.from_codes(codes, scales, zeros, group, bits, bias=b)
    x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed))
    reference = F.linear(x, dequantize(codes, scales, zeros, group), b)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=0)
    assert torch.equal(layer.weight, dequantize(codes, scales, zeros, group))


def test_quantized_linear_runs_in_the_activation_dtype():
    codes, scales, zeros = _random_quantized((4, 16))
    layer = QuantizedLinear.from_codes(codes, scales, zeros, group_size=8)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, dequantize(codes, scales, zeros, 8).bfloat16()))


@pytest.mark.parametrize("impl", ["loop", "grouped", "gather"])
def test_quantized_experts_equal_float_experts_holding_the_dequantized_weights(impl):
    E, H, inter = 4, 16, 8
    gu = _random_quantized((E, 2 * inter, H), group_size=8, seed=1)
    down = _random_quantized((E, H, inter), group_size=8, seed=2)
    q = QuantizedGroupedExperts(E, H, inter, bits=4, group_size=8)
    q.gate_up.fill(*gu)
    q.down.fill(*down)
    ref = GroupedExperts(E, H, inter)
    with torch.no_grad():
        ref.gate_up_proj.copy_(dequantize(*gu, 8))
        ref.down_proj.copy_(dequantize(*down, 8))
    x = torch.randn(10, H)
    ids = torch.randint(0, E, (10, 2))
    weights = torch.rand(10, 2)
    torch.testing.assert_close(q(x, ids, weights, impl), ref(x, ids, weights, impl), rtol=0, atol=0)


def _quantize_everything(model: ErnieForCausalLM, group_size: int = 16) -> None:
    """Random-code quantization of every decoder linear and expert pool (format tests only)."""
    for i, (name, module) in enumerate(list(model.named_modules())):
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            codes, scales, zeros = _random_quantized((module.out_features, module.in_features), 4, group_size, i)
            model.set_submodule(name, QuantizedLinear.from_codes(codes, scales, zeros, group_size))
        elif isinstance(module, GroupedExperts):
            E, two_i, H = module.gate_up_proj.shape
            q = QuantizedGroupedExperts(E, H, two_i // 2, 4, group_size)
            q.gate_up.fill(*_random_quantized((E, two_i, H), 4, group_size, i))
            q.down.fill(*_random_quantized((E, H, two_i // 2), 4, group_size, i + 1))
            model.set_submodule(name, q)


@pytest.mark.parametrize("tied", [False, True])
def test_saved_quantized_model_reloads_with_identical_logits(tmp_path, tied):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe").replace(tie_word_embeddings=tied)).eval()
    _quantize_everything(model)
    save_quantized(model, tmp_path, {"method": "test", "bits": 4, "group_size": 16})
    loaded = load_quantized(tmp_path)
    ids = torch.randint(3, 500, (2, 11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert set(quantized_modules(loaded)) == set(quantized_modules(model))
    qc = json.loads((tmp_path / QUANT_CONFIG_FILE).read_text())
    assert qc["method"] == "test" and qc["bits"] == 4
    assert qc["modules"]["model.layers.1.mlp.text.experts"]["kind"] == "experts"
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert isinstance(load_model(tmp_path).model.layers[0].self_attn.q_proj, QuantizedLinear)


def test_load_model_reads_a_plain_checkpoint_too(tmp_path):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_dense")).eval()
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(3, 500, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_quantized_checkpoint_that_does_not_fit_is_refused_with_names(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ErnieForCausalLM(get_preset("tiny_moe")).eval()
    _quantize_everything(model)
    save_quantized(model, tmp_path, {"method": "test"})
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    del tensors["model.layers.0.self_attn.q_proj.scales"]
    save_file(tensors, tmp_path / WEIGHTS_FILE)
    with pytest.raises(QuantFormatError, match="missing tensors.*q_proj.scales"):
        load_quantized(tmp_path)
    qc = json.loads((tmp_path / QUANT_CONFIG_FILE).read_text())
    (tmp_path / QUANT_CONFIG_FILE).write_text(json.dumps({**qc, "version": 99}))
    with pytest.raises(QuantFormatError, match="version 99"):
        load_quantized(tmp_path)


def test_save_quantized_refuses_a_model_without_quantized_modules(tmp_path):
    with pytest.raises(QuantFormatError, match="no quantized modules"):
        save_quantized(ErnieForCausalLM(get_preset("tiny_dense")), tmp_path, {})


@pytest.mark.parametrize("weights", ["../outside.safetensors", "/tmp/outside.safetensors", "a/../x.safetensors", 7, ""])
def test_a_qckpt_names_only_weight_files_inside_it(tmp_path, weights):
    """quant_config.json's "weights" (and the shards its index lists) are plain names of files of the qckpt."""
    from safetensors.torch import save_file

    qckpt = tmp_path / "qckpt"
    model = ErnieForCausalLM(get_preset("tiny_dense")).eval()
    _quantize_everything(model)
    save_quantized(model, qckpt, {"method": "test"})
    save_file({"w": torch.zeros(2)}, str(tmp_path / "outside.safetensors"))
    qc = json.loads((qckpt / QUANT_CONFIG_FILE).read_text())
    (qckpt / QUANT_CONFIG_FILE).write_text(json.dumps({**qc, "weights": weights}))
    with pytest.raises(QuantFormatError, match="names weight file"):
        load_quantized(qckpt)
    # through an index: its shard names are checked the same way, and a symlink out is refused too
    (qckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": weights}}))
    (qckpt / QUANT_CONFIG_FILE).write_text(json.dumps({**qc, "weights": "model.safetensors.index.json"}))
    with pytest.raises(QuantFormatError, match="names weight file"):
        load_quantized(qckpt)
    (qckpt / "linked.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (qckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "linked.safetensors"}}))
    with pytest.raises(QuantFormatError, match="resolves to"):
        load_quantized(qckpt)
