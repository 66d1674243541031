"""GPTQ's algorithm pinned by its properties: it is RTN when inputs are uncorrelated, it beats RTN
on the layer's output when they are correlated, and its codes are `ernie.quant`'s format."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie.quant import QuantizedLinear, dequantize
from stages.quantize.gptq import HessianAccumulator, gptq_quantize
from stages.quantize.rtn import rtn_quantize


def correlated_inputs(seed: int, tokens: int = 512, dim: int = 64) -> torch.Tensor:
    """Activations with a few strong shared directions and uneven scales, like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mixing = torch.randn(8, dim, generator=g)
    scales = torch.rand(dim, generator=g) * 3 + 0.1
    return (latent @ mixing + 0.1 * torch.randn(tokens, dim, generator=g)) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def output_error(x, weight, codes, scales, zeros, group_size) -> float:
    approx = dequantize(codes, scales, zeros, group_size)
    return float((x @ (weight - approx).T).pow(2).mean())


def test_the_accumulated_hessian_is_twice_the_input_covariance_whatever_the_chunks():
    x = correlated_inputs(0, tokens=96, dim=16)
    acc = HessianAccumulator(16)
    for chunk in (x[:10], x[10:50].reshape(2, 20, 16), x[50:]):
        acc.add(chunk)
    assert acc.tokens == 96
    assert torch.allclose(acc.hessian(), (2 * x.double().T @ x.double() / 96).float(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(4).hessian()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(4, 16, False), (2, 8, True), (4, 64, True)])
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(bits, group_size, symmetric, act_order):
    """H proportional to I: no error has anywhere to go, so every code is RTN's."""
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    rtn = rtn_quantize(weight, bits, group_size, symmetric, torch.float32)
    gptq = gptq_quantize(
        weight,
        3.0 * torch.eye(64),
        bits,
        group_size,
        symmetric,
        act_order=act_order,
        scale_dtype=torch.float32,
        block_size=16,
    )
    for ours, theirs in zip(gptq, rtn, strict=True):
        assert torch.equal(ours, theirs)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.sampled_from([2, 3, 4]), act_order=st.booleans())
def test_with_correlated_inputs_gptq_has_a_smaller_output_error_than_rtn(seed, bits, act_order):
    x = correlated_inputs(seed)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 1))
    rtn = output_error(x, weight, *rtn_quantize(weight, bits, 16, False, torch.float32), 16)
    codes = gptq_quantize(
        weight, hessian_of(x), bits, 16, act_order=act_order, block_size=24, scale_dtype=torch.float32
    )
    gptq = output_error(x, weight, *codes, 16)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_block_size_changes_nothing_but_the_order_of_the_same_updates():
    x = correlated_inputs(3)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    H = hessian_of(x)
    a = gptq_quantize(weight, H, 4, 16, block_size=64, scale_dtype=torch.float32)
    b = gptq_quantize(weight, H, 4, 16, block_size=7, scale_dtype=torch.float32)
    assert int((a[0] != b[0]).sum()) <= 0.01 * weight.numel()  # float summation order only
    assert torch.allclose(a[1], b[1], rtol=1e-4)


def test_an_input_never_seen_gets_zero_weight_and_the_rest_stays_finite():
    x = correlated_inputs(5, dim=32)
    x[:, 7] = 0.0
    weight = torch.randn(8, 32)
    codes, scales, zeros = gptq_quantize(weight, hessian_of(x), 4, 8, scale_dtype=torch.float32)
    approx = dequantize(codes, scales, zeros, 8)
    assert torch.isfinite(approx).all()
    assert torch.equal(approx[:, 7], torch.zeros(8))


def test_codes_run_in_the_packed_linear_layer():
    x = correlated_inputs(6, dim=32)
    weight = torch.randn(12, 32)
    codes, scales, zeros = gptq_quantize(weight, hessian_of(x), 4, 16)
    layer = QuantizedLinear.from_codes(codes, scales, zeros, 16, 4, None)
    assert torch.allclose(layer(x), x @ dequantize(codes, scales, zeros, 16).T, atol=1e-4)


def test_bad_arguments_are_named():
    weight, H = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="group_size=12 does not divide the input dim 32"):
        gptq_quantize(weight, H, 4, 12)
    with pytest.raises(ValueError, match=r"Hessian is \(16, 16\)"):
        gptq_quantize(weight, torch.eye(16), 4, 16)
    with pytest.raises(ValueError, match="damp=1.5"):
        gptq_quantize(weight, H, 4, 16, damp=1.5)


# ---------------------------------------------------------------------- calibration statistics
def test_calibration_gives_each_linear_its_inputs_hessian_and_each_expert_its_routed_tokens():
    from ernie import ErnieForCausalLM, get_preset
    from ernie.moe import count_per_expert
    from stages.quantize.calibration import collect
    from stages.quantize.rtn import quantization_targets

    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe"))
    targets = quantization_targets(model, ["lm_head"])
    ids = torch.randint(3, model.config.vocab_size, (2, 24))
    seen = {}
    linear, pool = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.text.experts"
    hook = targets[linear].register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].detach()))
    calibration = collect(model, targets, [{"input_ids": ids}])
    hook.remove()
    assert set(calibration.linear) | set(calibration.experts) == set(targets)
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    assert torch.allclose(calibration.linear[linear].hessian(), (2 * x.T @ x / len(x)).float(), atol=1e-5)

    with torch.no_grad():
        routing = model(ids).routing[0][0]  # layer 1 (the first MoE layer), text pool
    E = model.config.moe.num_experts
    routed = count_per_expert(routing.topk_ids_TK, E)  # top-k ids are distinct per token
    assert calibration.experts[pool].tokens == routed.tolist()
    busiest = int(routed.argmax())
    own, source = calibration.expert_hessian(pool, "gate_up", busiest, min_tokens=1)
    assert source == "own" and own.shape == (model.config.hidden_size,) * 2
    pooled, source = calibration.expert_hessian(pool, "down", busiest, min_tokens=10**6)
    assert source == "pooled" and pooled.shape == (model.config.moe.intermediate_size,) * 2
