"""Trellis-coded quantization: the bit-shift format of `ernie.quant_tcq` and the Viterbi encoder of
`stages/quantize/tcq.py`, pinned by their properties."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from ernie.generation import generate
from ernie.moe import GroupedExperts
from ernie.quant import QUANT_CONFIG_FILE, QuantFormatError, QuantizedLinear, load_quantized, save_quantized
from ernie.quant_tcq import (
    TCQGroupedExperts,
    TCQLinear,
    _TCQWeight,
    lead_in,
    tcq_dequantize,
    trellis_values,
    windows,
)
from stages.quantize.calibration import collect
from stages.quantize.gptq import GPTQLog, HessianAccumulator, gptq_quantize
from stages.quantize.rtn import quantization_targets
from stages.quantize.tcq import TCQSettings, _Trellis, quantize_model_tcq, tcq_quantize, tcq_weight_quantizer


def correlated_inputs(seed: int, tokens: int = 512, dim: int = 64) -> torch.Tensor:
    """Activations with a few strong shared directions and uneven scales (as tests/stages/test_gptq.py)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mixing = torch.randn(8, dim, generator=g)
    scales = torch.rand(dim, generator=g) * 3 + 0.1
    return (latent @ mixing + 0.1 * torch.randn(tokens, dim, generator=g)) * scales


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian()


def _random_codes(lead: tuple[int, ...], out_f: int, in_f: int, bits: int, window_bits: int, group: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    stream = in_f + lead_in(bits, window_bits)
    codes = torch.randint(0, 2**bits, (*lead, out_f, stream), generator=gen).to(torch.uint8)
    scales = (torch.rand(*lead, out_f, in_f // group, generator=gen) * 0.05 + 1e-3).half()
    return codes, scales


# ---------------------------------------------------------------------- the format
def test_each_weight_reads_the_window_of_its_code_and_the_codes_before_it():
    # bits=2, window_bits=6: window_t = b_t << 4 | b_{t-1} << 2 | b_{t-2}, codes before the stream are 0
    codes = torch.tensor([[1, 2, 3, 0]])
    assert windows(codes, 2, 6).tolist() == [[0b010000, 0b100100, 0b111001, 0b001110]]
    # the lead-in (window_bits / bits - 1 = 2 codes) fills the first weight's window and is not a weight
    w = tcq_dequantize(codes, torch.ones(1, 1), 2, 2, 6)
    assert w.tolist() == [[float(trellis_values(6)[0b111001]), float(trellis_values(6)[0b001110])]]


def test_the_value_table_is_pinned_unit_rms_and_spread_like_a_normal():
    """The table is part of the on-disk format: a change would silently alter every saved tcq checkpoint."""
    values = trellis_values(10)
    assert values.shape == (1024,) and len(set(values.tolist())) == 1024
    assert float(values.pow(2).mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(values.abs().max()) == pytest.approx(3.2993, abs=1e-3)  # the normal quantile at 1023.5 / 1024
    assert [round(v, 4) for v in values[:4].tolist()] == [-3.2993, -0.1711, 0.9416, -0.4145]
    assert torch.equal(values, trellis_values(10))
    neighbours = torch.corrcoef(torch.stack([values[:-1], values[1:]]))[0, 1]
    assert abs(float(neighbours)) < 0.1  # windows that share bits get unrelated values


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=1),
    out_f=st.integers(1, 6),
    groups=st.integers(1, 3),
    group=st.sampled_from([4, 8, 16]),
    code=st.sampled_from([(2, 4), (2, 6), (2, 10), (4, 8)]),
    seed=st.integers(0, 10_000),
)
def test_packed_codes_round_trip_and_dequantize_as_the_formula_says(lead, out_f, groups, group, code, seed):
    bits, window_bits = code
    in_f = group * groups
    codes, scales = _random_codes(tuple(lead), out_f, in_f, bits, window_bits, group, seed)
    weight = _TCQWeight((*lead, out_f, in_f), bits, window_bits, group, torch.float16)
    weight.fill(codes, scales)
    assert torch.equal(weight.codes(), codes)
    table = trellis_values(window_bits)
    expected = table[windows(codes, bits, window_bits)[..., -in_f:]] * scales.float().repeat_interleave(group, -1)
    assert torch.equal(weight.dequantize(), expected)
    lead_bits = (window_bits - bits) * out_f * (lead[0] if lead else 1)
    assert weight.nbytes() * 8 >= bits * codes[..., -in_f:].numel() + lead_bits + 16 * scales.numel()


@settings(max_examples=15, deadline=None)
@given(out_f=st.integers(1, 5), groups=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 1000))
def test_the_linear_layer_is_dequantize_then_matmul(out_f, groups, bias, seed):
    in_f = 8 * groups
    codes, scales = _random_codes((), out_f, in_f, 2, 8, 8, seed)
    b = torch.randn(out_f) if bias else None
    layer = TCQLinear.from_codes(codes, scales, 8, 2, 8, b)
    x = torch.randn(2, 3, in_f, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(layer(x), F.linear(x, tcq_dequantize(codes, scales, 8, 2, 8), b), rtol=0, atol=0)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_tcq_experts_equal_float_experts_holding_the_dequantized_weights(impl):
    E, H, inter = 4, 16, 8
    q = TCQGroupedExperts(E, H, inter, bits=2, window_bits=8, group_size=8)
    gu = _random_codes((E,), 2 * inter, H, 2, 8, 8, seed=1)
    down = _random_codes((E,), H, inter, 2, 8, 8, seed=2)
    q.gate_up.fill(*gu)
    q.down.fill(*down)
    ref = GroupedExperts(E, H, inter)
    with torch.no_grad():
        ref.gate_up_proj.copy_(tcq_dequantize(*gu, 8, 2, 8))
        ref.down_proj.copy_(tcq_dequantize(*down, 8, 2, 8))
    x, ids, weights = torch.randn(10, H), torch.randint(0, E, (10, 2)), torch.rand(10, 2)
    torch.testing.assert_close(q(x, ids, weights, impl), ref(x, ids, weights, impl), rtol=0, atol=0)


def test_layouts_the_format_cannot_hold_are_refused_with_the_value_named():
    with pytest.raises(QuantFormatError, match="window_bits=7 must be a multiple of bits=2"):
        TCQLinear(16, 4, bits=2, window_bits=7)
    with pytest.raises(QuantFormatError, match="bits=3"):
        TCQLinear(16, 4, bits=3, window_bits=9)
    with pytest.raises(QuantFormatError, match="group_size=5 must divide the input dim 16"):
        TCQLinear(16, 4, group_size=5)
    with pytest.raises(QuantFormatError, match=r"codes \(4, 16\) should be \(4, 20\)"):
        TCQLinear(16, 4, group_size=8).fill(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2))


# ---------------------------------------------------------------------- the encoder
def test_the_viterbi_search_finds_the_cheapest_code_stream():
    """Without feedback (diagonal H) the path cost is separable and the search is exact: compare with every
    stream of a short row (a free start: the lead-in is searched too)."""
    bits, window_bits, n = 2, 6, 4
    trellis = _Trellis(bits, window_bits, "cpu")
    w = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    U = torch.diag(torch.tensor([1.0, 0.5, 2.0, 1.5]))  # column j's error weighs 1 / U_jj^2
    codes, values, states = trellis.search(w, torch.ones(3, n), U, None)
    table = trellis_values(window_bits)

    def cost(row: int, stream: tuple[int, ...]) -> float:
        v = table[windows(torch.tensor(stream), bits, window_bits)[lead_in(bits, window_bits) :]]
        return float((((w[row] - v) / torch.diagonal(U)) ** 2).sum())

    for row in range(3):
        streams = itertools.product(range(4), repeat=n + lead_in(bits, window_bits))
        best = min(cost(row, s) for s in streams)
        found = tuple(trellis.lead_in_codes(states[row : row + 1, 0])[0].tolist()) + tuple(codes[row].tolist())
        assert cost(row, found) == pytest.approx(best, rel=1e-5)
        assert torch.allclose(values[row], table[windows(torch.tensor(found), bits, window_bits)[2:]])


def test_with_unit_hessian_the_code_beats_any_2bit_scalar_grid_on_normal_weights():
    """Lloyd-Max, the best 2-bit scalar quantizer of a normal, leaves 11.75% of the variance; the trellis
    (2 bits a weight plus a scale per 32) leaves about 8%."""
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    codes, scales = tcq_quantize(weight, torch.eye(128), TCQSettings(window_bits=10))
    error = (weight - tcq_dequantize(codes, scales, 32, 2, 10)).pow(2).mean() / weight.pow(2).mean()
    assert float(error) < 0.095


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_with_correlated_inputs_tcq_has_a_smaller_output_error_than_gptq_at_fewer_bits(seed):
    x = correlated_inputs(seed)
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(seed + 1))
    H = hessian_of(x)
    gptq_codes = gptq_quantize(weight, H, 2, 16)
    gptq = QuantizedLinear.from_codes(*gptq_codes, 16, 2)
    tcq = TCQLinear.from_codes(*tcq_quantize(weight, H, TCQSettings(window_bits=8)), 32, 2, 8)
    bits_per_weight = {name: 8 * m.nbytes() / weight.numel() for name, m in (("gptq", gptq), ("tcq", tcq))}
    assert bits_per_weight["tcq"] < bits_per_weight["gptq"]  # 2.5 (codes, lead-in, fp16 scale / 32) < 3.5
    errors = {name: float((x @ (weight - m.weight).T).pow(2).mean()) for name, m in (("gptq", gptq), ("tcq", tcq))}
    assert errors["tcq"] < 0.5 * errors["gptq"], errors


def test_same_inputs_give_the_same_codes():
    x = correlated_inputs(2, dim=32)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    a = tcq_quantize(weight, hessian_of(x), TCQSettings(window_bits=8, group_size=16, block_size=16))
    b = tcq_quantize(weight.clone(), hessian_of(x), TCQSettings(window_bits=8, group_size=16, block_size=16))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_an_input_never_seen_gets_zero_weight_and_the_rest_stays_finite():
    x = correlated_inputs(5, dim=32)
    x[:, 7] = 0.0
    codes, scales = tcq_quantize(torch.randn(8, 32), hessian_of(x), TCQSettings(window_bits=6, group_size=8))
    approx = tcq_dequantize(codes, scales, 8, 2, 6)
    assert torch.isfinite(approx).all()
    assert float(approx[:, 7].abs().max()) < float(approx.abs().max())  # coded towards 0, not left to chance


def test_bad_settings_are_named():
    weight, H = torch.randn(4, 32), torch.eye(32)
    with pytest.raises(ValueError, match="block_size=24 must be a positive multiple of group_size=16"):
        tcq_quantize(weight, H, TCQSettings(group_size=16, block_size=24))
    with pytest.raises(ValueError, match="window_bits=16 gives 16384 trellis states"):
        tcq_quantize(weight, H, TCQSettings(window_bits=16))
    with pytest.raises(ValueError, match=r"Hessian is \(16, 16\)"):
        tcq_quantize(weight, torch.eye(16), TCQSettings())


# ---------------------------------------------------------------------- a whole model
def test_a_tcq_model_saves_loads_and_generates(tmp_path):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe")).eval()
    targets = quantization_targets(model, ["lm_head"])
    ids = torch.randint(3, model.config.vocab_size, (4, 32))
    calibration = collect(model, targets, [{"input_ids": ids}])
    tcq = TCQSettings(window_bits=6, group_size=16, block_size=16, scale_updates=0)
    log = GPTQLog()
    quantize = tcq_weight_quantizer(calibration, tcq, 1, torch.float16, log)
    stats = quantize_model_tcq(model, targets, quantize, tcq, torch.float16)
    assert len(stats) == len(targets) and all(0 < s.rel_error < 0.8 for s in stats)
    assert isinstance(model.model.layers[1].mlp.text.experts, TCQGroupedExperts)

    save_quantized(model, tmp_path, {"method": "tcq", "bits": 2, "window_bits": 6, "group_size": 16})
    qc = json.loads((tmp_path / QUANT_CONFIG_FILE).read_text())
    assert qc["modules"]["model.layers.0.self_attn.q_proj"]["kind"] == "tcq_linear"
    assert qc["modules"]["model.layers.1.mlp.text.experts"]["kind"] == "tcq_experts"
    loaded = load_quantized(tmp_path)
    prompt = ids[:2, :7]
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    assert torch.equal(generate(loaded, prompt, 5), generate(model, prompt, 5))
    half = load_quantized(tmp_path, dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16  # scales keep their dtype
    assert generate(half, prompt, 3).shape == (2, 3)
