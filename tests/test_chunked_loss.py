"""`chunked_lm_loss` is `lm_loss(hidden @ W.T, ...)` in value and gradients, without the full logits."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import ernie.chunked_loss as chunked_module
import ernie.model
from ernie import ErnieForCausalLM, KVCache, get_preset
from ernie.chunked_loss import chunked_lm_loss
from ernie.losses import IGNORE_INDEX, lm_loss

FAST = settings(max_examples=40, deadline=None)
ATOL = 1e-5  # fp32: same math, other order of operations
BF16_ATOL = 5e-3  # bf16 logits carry ~2^-8 relative error; losses here are ~9, grads <= 0.2 (seen: <= 2.6e-3)


def make_batch(B: int, S: int, H: int, V: int, seed: int, ignore: float, mask: bool, docs: bool, dtype=torch.float32):
    """Random hidden states, projection, labels with ignored slots, optional loss mask and packed documents."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, S, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < ignore] = IGNORE_INDEX
    loss_mask = (torch.rand(B, S, generator=g) < 0.7).long() if mask else None
    document_ids = torch.randint(0, 3, (B, S), generator=g).sort(dim=1).values if docs else None
    return hidden, weight, labels, loss_mask, document_ids


def loss_and_grads(fn, hidden, weight, *args):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    loss = fn(hidden, weight, *args)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


def reference(hidden, weight, labels, loss_mask, document_ids, token_balanced):
    return lm_loss(hidden @ weight.T, labels, loss_mask, document_ids, token_balanced)


def chunked(chunk_tokens: int):
    def fn(hidden, weight, labels, loss_mask, document_ids, token_balanced):
        return chunked_lm_loss(hidden, weight, labels, loss_mask, document_ids, token_balanced, chunk_tokens)

    return fn


def assert_all_close(actual, expected, atol: float) -> None:
    for name, a, e in zip(("loss", "grad hidden", "grad weight"), actual, expected, strict=True):
        assert a.dtype == e.dtype, f"{name}: {a.dtype} != {e.dtype}"
        diff = (a.float() - e.float()).abs().max().item()
        assert diff < atol, f"{name}: max |diff| = {diff:.3g} >= {atol}"


# ================================================================ equal to lm_loss
@FAST
@given(
    B=st.integers(1, 3),
    S=st.integers(1, 12),
    V=st.integers(2, 40),
    chunk=st.integers(1, 40),
    seed=st.integers(0, 10_000),
    ignore=st.sampled_from([0.0, 0.3, 1.0]),
    mask=st.booleans(),
    docs=st.booleans(),
    token_balanced=st.booleans(),
)
def test_value_and_gradients_equal_lm_loss(B, S, V, chunk, seed, ignore, mask, docs, token_balanced):
    if token_balanced and S == 1:
        S = 2  # lm_loss divides by zero prediction slots (NaN) there; chunked returns 0
    args = make_batch(B, S, 8, V, seed, ignore, mask, docs)
    expected = loss_and_grads(reference, *args, token_balanced)
    assert_all_close(loss_and_grads(chunked(chunk), *args, token_balanced), expected, ATOL)


@pytest.mark.parametrize("token_balanced", [False, True], ids=["mean", "token_balanced"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 48, 64, 1000], ids=lambda c: f"chunk{c}")
def test_chunk_sizes_that_divide_and_do_not_divide_the_tokens(chunk, token_balanced):
    args = make_batch(4, 16, 12, 50, seed=3, ignore=0.2, mask=True, docs=True)  # 64 tokens
    expected = loss_and_grads(reference, *args, token_balanced)
    assert_all_close(loss_and_grads(chunked(chunk), *args, token_balanced), expected, ATOL)


def test_token_balanced_has_the_mean_value_and_the_gradient_over_prediction_slots():
    hidden, weight, labels, loss_mask, docs = make_batch(2, 9, 8, 30, seed=5, ignore=0.4, mask=True, docs=False)
    mean = loss_and_grads(chunked(5), hidden, weight, labels, loss_mask, docs, False)
    balanced = loss_and_grads(chunked(5), hidden, weight, labels, loss_mask, docs, True)
    supervised = ((labels[:, 1:] != IGNORE_INDEX) & (loss_mask[:, 1:] == 1)).sum().item()
    slots = 2 * 8
    assert 0 < supervised < slots
    assert torch.equal(mean[0], balanced[0])
    torch.testing.assert_close(balanced[1], mean[1] * supervised / slots, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(balanced[2], mean[2] * supervised / slots, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("token_balanced", [False, True], ids=["mean", "token_balanced"])
def test_no_supervised_tokens_give_zero_loss_and_zero_gradients(token_balanced):
    hidden, weight, labels, _, _ = make_batch(2, 6, 8, 20, seed=1, ignore=1.0, mask=False, docs=False)
    loss, grad_hidden, grad_weight = loss_and_grads(chunked(4), hidden, weight, labels, None, None, token_balanced)
    assert loss.item() == 0.0
    assert not grad_hidden.any() and not grad_weight.any()
    assert torch.isfinite(grad_hidden).all() and torch.isfinite(grad_weight).all()
    loss_masked, *_ = loss_and_grads(chunked(4), hidden, weight, labels.clamp(min=0), torch.zeros(2, 6), None, False)
    assert loss_masked.item() == 0.0


def test_only_hidden_or_only_weight_needs_a_gradient():
    hidden, weight, labels, _, _ = make_batch(2, 6, 8, 20, seed=2, ignore=0.0, mask=False, docs=False)
    _, grad_hidden, grad_weight = loss_and_grads(reference, hidden, weight, labels, None, None, False)
    h = hidden.clone().requires_grad_()
    (only_hidden,) = torch.autograd.grad(chunked_lm_loss(h, weight, labels, chunk_tokens=5), (h,))
    w = weight.clone().requires_grad_()
    (only_weight,) = torch.autograd.grad(chunked_lm_loss(hidden, w, labels, chunk_tokens=5), (w,))
    torch.testing.assert_close(only_hidden, grad_hidden, atol=ATOL, rtol=0)
    torch.testing.assert_close(only_weight, grad_weight, atol=ATOL, rtol=0)


def test_chunk_tokens_must_be_positive():
    hidden, weight, labels, _, _ = make_batch(1, 4, 8, 10, seed=0, ignore=0.0, mask=False, docs=False)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(hidden, weight, labels, chunk_tokens=0)


# ================================================================ bf16
@pytest.mark.parametrize("token_balanced", [False, True], ids=["mean", "token_balanced"])
def test_bf16_inputs_accumulate_in_fp32_and_return_bf16_gradients(token_balanced):
    args = make_batch(2, 24, 32, 300, seed=4, ignore=0.2, mask=True, docs=True, dtype=torch.bfloat16)
    hidden, weight, *rest = args
    result = loss_and_grads(chunked(10), *args, token_balanced)
    assert result[0].dtype == torch.float32
    assert result[1].dtype == result[2].dtype == torch.bfloat16
    # the same bf16 logits through lm_loss (logits materialised in bf16, then upcast)
    assert_all_close(result, loss_and_grads(reference, *args, token_balanced), BF16_ATOL)
    # an fp32 reference on the same (bf16-representable) values
    fp32 = loss_and_grads(reference, hidden.float(), weight.float(), *rest, token_balanced)
    assert_all_close(result, (fp32[0], fp32[1].bfloat16(), fp32[2].bfloat16()), BF16_ATOL)


def test_autocast_runs_the_projection_like_nn_linear_under_autocast():
    hidden, weight, labels, loss_mask, docs = make_batch(2, 10, 16, 100, seed=6, ignore=0.1, mask=True, docs=True)

    def linear(h, w, *args):
        return lm_loss(F.linear(h, w), *args)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(linear, hidden, weight, labels, loss_mask, docs, False)
        result = loss_and_grads(chunked(6), hidden, weight, labels, loss_mask, docs, False)
    assert result[1].dtype == result[2].dtype == torch.float32  # grads flow back through the casts
    assert_all_close(result, expected, BF16_ATOL)
    fp32 = loss_and_grads(reference, hidden, weight, labels, loss_mask, docs, False)
    assert abs(result[0].item() - fp32[0].item()) > 1e-6  # the projection really ran in bf16


# ================================================================ memory bound
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor(fn, *args) -> int:
    hidden, weight, *rest = args
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with LargestTensor() as spy:
        fn(hidden, weight, *rest).backward()
    return spy.largest


def test_no_tensor_larger_than_a_chunk_of_logits_exists(monkeypatch):
    B, S, H, V, chunk = 4, 32, 8, 1000, 24  # 128 tokens; hidden, weight and their grads are all < chunk x V
    args = make_batch(B, S, H, V, seed=7, ignore=0.1, mask=True, docs=True)
    rows: list[int] = []
    original = chunked_module._chunk_logits

    def spy_chunk_logits(hidden_CH, weight_VH):
        rows.append(hidden_CH.shape[0])
        return original(hidden_CH, weight_VH)

    monkeypatch.setattr(chunked_module, "_chunk_logits", spy_chunk_logits)
    assert largest_tensor(chunked(chunk), *args, True) <= chunk * V
    assert max(rows) <= chunk
    assert len(rows) == 2 * math.ceil(B * S / chunk)  # every chunk once in forward, once in backward
    assert largest_tensor(reference, *args, True) >= B * (S - 1) * V  # the spy sees the full logits


# ================================================================ in the model
def make_model(name: str, token_balanced: bool = False) -> ErnieForCausalLM:
    cfg = get_preset(name)
    cfg.initializer_range = 0.1
    cfg.loss.token_balanced = token_balanced
    model = ErnieForCausalLM(cfg)
    model.init_weights(0)
    return model.train()


def model_loss_and_grads(model: ErnieForCausalLM, loss_impl: str, batch: dict):
    model.loss_impl = loss_impl
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("token_balanced", [False, True], ids=["mean", "token_balanced"])
@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_model_with_chunked_loss_equals_the_default(name, token_balanced, monkeypatch):
    # 40 tokens in chunks of 7 (the model's default 4096 would be one chunk here)
    monkeypatch.setattr(ernie.model, "chunked_lm_loss", functools.partial(chunked_lm_loss, chunk_tokens=7))
    model = make_model(name, token_balanced)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(11, 400, (2, 20), generator=g)
    loss_mask = (torch.rand(2, 20, generator=g) < 0.8).long()
    document_ids = torch.tensor([[0] * 12 + [1] * 8, [0] * 5 + [1] * 15])
    batch = dict(input_ids=ids, labels=ids, loss_mask=loss_mask, document_ids=document_ids)
    default, grads_default = model_loss_and_grads(model, "logits", batch)
    chunk, grads_chunk = model_loss_and_grads(model, "chunked", batch)
    assert chunk.logits is None and default.logits is not None
    assert chunk.losses.keys() == default.losses.keys()
    for key in default.losses:
        torch.testing.assert_close(chunk.losses[key], default.losses[key], atol=ATOL, rtol=0)
    torch.testing.assert_close(chunk.loss, default.loss, atol=ATOL, rtol=0)
    assert grads_chunk.keys() == grads_default.keys()
    assert "lm_head.weight" in grads_chunk or model.config.tie_word_embeddings
    for key in grads_default:
        torch.testing.assert_close(grads_chunk[key], grads_default[key], atol=ATOL, rtol=1e-4, msg=key)


def test_model_keeps_logits_without_labels_or_with_a_cache():
    model = make_model("tiny_dense").eval()
    model.loss_impl = "chunked"
    ids = torch.randint(11, 400, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 8, model.config.vocab_size)
        cached = model(ids, labels=ids, cache=KVCache(model.config.num_layers))
        assert cached.logits.shape == (1, 8, model.config.vocab_size) and torch.isfinite(cached.loss)
        out = model(ids, labels=ids)
    assert out.logits is None and torch.isfinite(out.loss)
