"""ernie.packed_linear: linear layers over weights packed for oneDNN give nn.Linear's outputs, only large plain
linears of the decoder are packed, and an engine over a packed model serves the model's own greedy decode."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_requests import greedy_reference, greedy_requests, run_concurrently
from torch import nn

from ernie import ErnieForCausalLM, get_preset
from ernie.packed_linear import MIN_ELEMENTS, PackedLinear, can_pack, pack_decoder, pack_linears
from stages.data.tokenizer import train_tokenizer
from stages.serve.engine import Engine

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(0)), reason="this torch build has no oneDNN")

DTYPES = [d for d in (torch.float32, torch.bfloat16) if can_pack(torch.empty(0, dtype=d))]
ANY_SIZE = dict.fromkeys(DTYPES, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (2, 5, 96)])
def test_a_packed_linear_gives_the_linears_output(dtype, bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias, dtype=dtype)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        got, expected = PackedLinear(linear)(x), linear(x)
    assert got.shape == expected.shape == (*shape[:-1], 200)
    assert got.dtype == dtype
    # bf16: the same bits; fp32: another summation order
    tolerance = 0 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe", "tiny_vl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_packed_decoder_gives_the_models_logits_and_keeps_its_tied_embedding(preset, dtype):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset).replace(tie_word_embeddings=True)).to(dtype).eval()
    reference = copy.deepcopy(model)
    vision = [m for part in (model.vision_encoder, model.adapter) if part is not None for m in part.modules()]
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert pack_decoder(model, min_elements=ANY_SIZE) == len(linears) - sum(type(m) is nn.Linear for m in vision) > 0
    # every linear a token's decode step runs is packed, and only those
    assert sum(type(m) is nn.Linear for m in model.modules()) == sum(type(m) is nn.Linear for m in vision)
    assert type(model.lm_head) is PackedLinear
    # the embedding table stays a parameter (the LM head packed a copy of it)
    assert "model.embed_tokens.weight" in dict(model.named_parameters())
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.inference_mode():
        got, expected = model(ids).logits, reference(ids).logits
    tolerance = 0 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)


def test_only_plain_cpu_linears_of_a_packable_dtype_outside_skip_are_packed():
    layers = nn.ModuleDict(
        {
            "plain": nn.Linear(8, 8),
            "fp16": nn.Linear(8, 8).half(),
            "subclass": type("Special", (nn.Linear,), {})(8, 8),
            "nested": nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
            "skipped": nn.Sequential(nn.Linear(8, 8)),
        }
    )
    assert pack_linears(layers, skip=(layers["skipped"], None), min_elements=ANY_SIZE) == 2
    assert type(layers["plain"]) is PackedLinear and type(layers["nested"][0]) is PackedLinear
    assert type(layers["fp16"]) is nn.Linear  # fp16: not a dtype oneDNN's CPU linear is used for here
    assert type(layers["subclass"]) is not PackedLinear
    assert type(layers["skipped"][0]) is nn.Linear
    assert not can_pack(torch.empty(0, dtype=torch.float16))
    assert not can_pack(torch.empty(0, dtype=torch.int8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_under_the_minimum_stay_as_they_are(dtype):
    side = int(MIN_ELEMENTS[dtype] ** 0.5)
    layers = nn.Sequential(nn.Linear(side, side - 1), nn.Linear(side, side)).to(dtype)
    assert pack_linears(layers) == 1
    assert [type(m) for m in layers] == [nn.Linear, PackedLinear]
    tiny = ErnieForCausalLM(get_preset("tiny_dense")).to(dtype)
    assert pack_decoder(tiny) == 0  # a tiny model's layers would only lose


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_an_engine_over_a_packed_model_serves_the_unpacked_models_greedy_decode(preset):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset)).eval()
    packed = copy.deepcopy(model)
    assert pack_decoder(packed, min_elements=ANY_SIZE) > 0
    tokenizer = train_tokenizer(["how many red squares are there", "two", "three", "1+2=3"] * 30, 300)
    engine = Engine(packed, tokenizer, kv_cache_tokens=4096, max_batch=8)
    try:
        requests = greedy_requests([12, 5, 30, 9, 1, 20], seed=5)
        expected = [greedy_reference(model, p, params.max_tokens) for p, params in requests]
        assert run_concurrently(engine, requests) == expected
        assert engine.scheduler.stats.max_batch > 1
    finally:
        engine.close()


def test_a_packed_layer_holds_no_parameter_and_no_state():
    layer = PackedLinear(nn.Linear(16, 4, bias=True))
    assert list(layer.parameters()) == [] and layer.state_dict() == {}
