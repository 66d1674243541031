"""Each loss of `ernie.losses` moves the way its definition says (ERNIE_FACTS §4)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from ernie.losses import (
    lm_loss,
    load_balance_loss,
    orthogonal_loss,
    router_losses,
    shifted_targets,
    weighted_router_loss,
    z_loss,
)
from ernie.moe import RouterOutput

FAST = settings(max_examples=40, deadline=None)


def routing_from(logits_TE: torch.Tensor, top_k: int, topk_ids_TK: torch.Tensor | None = None) -> RouterOutput:
    probs = logits_TE.float().softmax(-1)
    ids = torch.topk(probs, top_k, dim=-1).indices if topk_ids_TK is None else topk_ids_TK
    chosen = probs.gather(-1, ids)
    return RouterOutput(
        pool="text",
        logits_TE=logits_TE.float(),
        probs_TE=probs,
        topk_ids_TK=ids,
        topk_weights_TK=chosen / chosen.sum(-1, keepdim=True),
        orthogonal=orthogonal_loss(torch.randn(logits_TE.shape[1], 8)),
    )


# ================================================================ orthogonal loss
def orthonormal_rows(E: int, H: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(H, E, generator=g, dtype=torch.float64))
    return q.T.float()  # [E, H], orthonormal rows


def test_orthogonal_loss_is_zero_for_orthogonal_rows_at_any_scale():
    assert orthogonal_loss(torch.eye(6, 10)).item() == 0.0
    w = orthonormal_rows(8, 32)
    scales = torch.tensor([1e-3, 0.5, 1.0, 2.0, 7.0, 100.0, -3.0, 1e4])[:, None]
    assert orthogonal_loss(w) < 1e-10
    assert orthogonal_loss(w * scales) < 1e-10


def test_orthogonal_loss_is_larger_for_correlated_rows():
    E, H = 8, 32
    base = orthonormal_rows(E, H)
    shared = torch.randn(1, H, generator=torch.Generator().manual_seed(1))
    previous = orthogonal_loss(base)
    for mix in (0.1, 0.5, 1.0, 3.0):  # more of a shared direction in every row
        loss = orthogonal_loss(base + mix * shared)
        assert loss > previous + 1e-4
        previous = loss
    # identical rows: every cosine is 1, so the loss is (E^2 - E) / E^2 = 1 - 1/E
    same = shared.expand(E, H)
    assert orthogonal_loss(same).item() == pytest.approx(1 - 1 / E, abs=1e-6)


@FAST
@given(seed=st.integers(0, 2**16), log_scales=st.lists(st.floats(-4, 4), min_size=6, max_size=6))
def test_orthogonal_loss_is_scale_invariant_per_row(seed, log_scales):
    w = torch.randn(6, 12, generator=torch.Generator().manual_seed(seed))
    scales = torch.tensor(log_scales).exp()[:, None]
    assert orthogonal_loss(w * scales).item() == pytest.approx(orthogonal_loss(w).item(), abs=1e-5)


# ================================================================ load-balance loss
@pytest.mark.parametrize("E,K", [(8, 2), (6, 1), (16, 4)])
def test_load_balance_loss_equals_top_k_for_uniform_routing(E, K):
    T = 3 * E
    tokens = torch.arange(T)[:, None]
    ids = (tokens + torch.arange(K)) % E  # every expert gets exactly T*K/E slots
    routing = routing_from(torch.zeros(T, E), K, ids)  # uniform probabilities
    assert load_balance_loss(routing).item() == pytest.approx(K, rel=1e-6)


@pytest.mark.parametrize("E,K", [(8, 2), (16, 4)])
def test_load_balance_loss_is_larger_for_skewed_routing(E, K):
    T = 4 * E
    g = torch.Generator().manual_seed(0)
    uniform = load_balance_loss(routing_from(torch.zeros(T, E), K, (torch.arange(T)[:, None] + torch.arange(K)) % E))
    mild = torch.randn(T, E, generator=g) * 0.3
    skew = torch.zeros(T, E)
    skew[:, :K] = 4.0  # every token prefers the same K experts
    mild_loss = load_balance_loss(routing_from(mild + skew * 0.25, K))
    skewed_loss = load_balance_loss(routing_from(mild + skew, K))
    assert uniform < mild_loss < skewed_loss
    # at full collapse onto K experts the loss tends to E (all probability on the used experts)
    collapsed = load_balance_loss(routing_from(skew * 10, K))
    assert collapsed.item() == pytest.approx(E, rel=1e-3)


def test_load_balance_loss_gradient_flows_to_probabilities_only():
    logits = torch.randn(12, 6, requires_grad=True)
    load_balance_loss(routing_from(logits, 2)).backward()
    assert logits.grad is not None and logits.grad.abs().max() > 0


# ================================================================ z-loss
@pytest.mark.parametrize("E", [2, 8, 64])
def test_z_loss_of_zero_logits_is_log_e_squared(E):
    routing = routing_from(torch.zeros(5, E), 1)
    assert z_loss(routing).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


@FAST
@given(seed=st.integers(0, 2**16), E=st.integers(2, 16))
def test_z_loss_is_minimal_at_zero_among_zero_mean_logits_and_grows_with_scale(seed, E):
    # logsumexp(x) >= mean(x) + log E (Jensen), with equality iff all logits are equal, so among
    # zero-mean logits the all-zero row is the minimum, log(E)^2. (Among *all* equal-logit rows
    # c*1 the minimum would be at c = -log E, where z = 0.)
    x = torch.randn(4, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x - x.mean(-1, keepdim=True)
    values = [z_loss(routing_from(scale * x, 1)).item() for scale in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] == pytest.approx(math.log(E) ** 2)
    assert all(b > a for a, b in pairwise(values)), values


def test_z_loss_grows_with_logit_magnitude():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    values = [z_loss(routing_from(s * x, 2)).item() for s in (1.0, 3.0, 10.0)]
    assert values[0] < values[1] < values[2]


# ================================================================ LM loss, token balanced
def _lm_case(seed: int, B: int = 3, S: int = 9, V: int = 11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, S), generator=g)
    return logits, labels


def _grad(logits, labels, mask, balanced):
    logits.grad = None
    lm_loss(logits, labels, mask, token_balanced=balanced).backward()
    return logits.grad.clone()


def test_token_balanced_forward_value_is_the_plain_masked_mean():
    logits, labels = _lm_case(0)
    mask = torch.ones_like(labels)
    mask[0, :5] = 0
    mask[2, 3:] = 0
    targets, weight = shifted_targets(labels, mask, None)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), targets.reshape(-1), reduction="none")
    expected = (ce * weight.reshape(-1)).sum() / weight.sum()
    for balanced in (False, True):
        value = lm_loss(logits, labels, mask, token_balanced=balanced)
        assert value.item() == pytest.approx(expected.item(), rel=1e-6)


@FAST
@given(seed=st.integers(0, 2**16), data=st.data())
def test_token_balanced_gradient_per_token_is_constant(seed, data):
    """d loss / d logits of a supervised token is (softmax - onehot) / (B * (S - 1)) whatever
    the number of supervised tokens; the plain mean divides by that number instead."""
    B, S, V = 3, 9, 11
    logits, labels = _lm_case(seed, B, S, V)
    bits = data.draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))
    mask = torch.tensor(bits, dtype=torch.long).view(B, S)
    targets, weight = shifted_targets(labels, mask, None)
    n_supervised = int(weight.sum())
    probs = logits.detach()[:, :-1].softmax(-1)
    per_token = probs - torch.nn.functional.one_hot(targets, V).float()  # [B, S-1, V]

    grad = _grad(logits, labels, mask, balanced=True)
    expected = per_token * weight[..., None] / (B * (S - 1))
    torch.testing.assert_close(grad[:, :-1], expected, atol=1e-7, rtol=1e-5)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing

    plain = _grad(logits, labels, mask, balanced=False)
    expected_plain = per_token * weight[..., None] / max(n_supervised, 1)
    torch.testing.assert_close(plain[:, :-1], expected_plain, atol=1e-7, rtol=1e-5)


def test_token_balanced_gradient_does_not_depend_on_how_many_tokens_are_supervised():
    logits, labels = _lm_case(1)
    few = torch.zeros_like(labels)
    few[0, 1:3] = 1  # two supervised targets
    many = torch.ones_like(labels)  # every target supervised; includes the two above
    token = (0, 1)  # logits at (row 0, position 1) predict labels[0, 2], supervised in both
    balanced_few, balanced_many = _grad(logits, labels, few, True), _grad(logits, labels, many, True)
    plain_few, plain_many = _grad(logits, labels, few, False), _grad(logits, labels, many, False)
    torch.testing.assert_close(balanced_few[token], balanced_many[token], atol=0, rtol=0)
    ratio = plain_few[token].norm() / plain_many[token].norm()
    assert ratio.item() == pytest.approx(many[:, 1:].sum().item() / few[:, 1:].sum().item(), rel=1e-5)


def test_lm_loss_ignores_minus_100_and_document_boundaries():
    logits, labels = _lm_case(2, B=1, S=8)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    labels_ignored = labels.clone()
    labels_ignored[0, 5] = -100
    _, weight = shifted_targets(labels_ignored, None, docs)
    # target 3 (first token of doc 1) is predicted from doc 0: dropped; target 5 is -100: dropped
    assert weight.tolist() == [[1, 1, 0, 1, 0, 1, 1]]


# ================================================================ router loss averaging
def test_router_losses_average_over_layers_and_pools():
    g = torch.Generator().manual_seed(4)
    routings = [routing_from(torch.randn(10, 8, generator=g) * s, 2) for s in (0.5, 1.0, 3.0)]
    losses = router_losses(routings)
    assert set(losses) == {"aux", "z", "orthogonal"}
    for name, fn in (("aux", load_balance_loss), ("z", z_loss)):
        expected = sum(fn(r) for r in routings) / 3
        assert losses[name].item() == pytest.approx(expected.item(), rel=1e-6)
    expected = sum(r.orthogonal for r in routings) / 3
    assert losses["orthogonal"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert router_losses([]) == {}


# ================================================================ total loss in the model
def _model_out(name: str, **loss_changes):
    cfg = get_preset(name)
    for key, value in loss_changes.items():
        setattr(cfg.loss, key, value)
    cfg.initializer_range = 0.1
    model = ErnieForCausalLM(cfg)
    model.init_weights(0)
    ids = torch.randint(11, 400, (2, 12), generator=torch.Generator().manual_seed(5))
    return model(ids, labels=ids)


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_vl"])
def test_total_loss_is_lm_plus_weighted_components(name):
    out = _model_out(name)
    lc = get_preset(name).loss
    assert set(out.losses) == {"lm", "aux", "z", "orthogonal"}
    expected = (
        out.losses["lm"]
        + lc.aux_loss_weight * out.losses["aux"]
        + lc.z_loss_weight * out.losses["z"]
        + lc.orthogonal_loss_weight * out.losses["orthogonal"]
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.loss.item() > out.losses["lm"].item()  # the router terms are positive


@pytest.mark.parametrize("weight", ["aux_loss_weight", "z_loss_weight", "orthogonal_loss_weight"])
def test_zero_weight_removes_the_component_from_the_total(weight):
    component = {"aux_loss_weight": "aux", "z_loss_weight": "z", "orthogonal_loss_weight": "orthogonal"}[weight]
    heavy = _model_out("tiny_moe", **{weight: 1.0})
    off = _model_out("tiny_moe", **{weight: 0.0})
    # same weights and inputs, so every unweighted component is the same
    for name in heavy.losses:
        assert off.losses[name].item() == pytest.approx(heavy.losses[name].item(), rel=1e-6)
    assert component in off.losses  # still reported, just not in the total
    assert heavy.loss.item() - off.loss.item() == pytest.approx(off.losses[component].item(), rel=1e-4)


def test_dense_total_loss_is_the_lm_loss():
    out = _model_out("tiny_dense")
    assert set(out.losses) == {"lm"}
    assert out.loss.item() == out.losses["lm"].item()


@pytest.mark.parametrize("preset", ["tiny_moe", "tiny_dense"])
def test_weighted_router_loss_is_the_models_own_total_less_its_lm_term(preset):
    """Post-training objectives add the router losses exactly as the model weighs them in pretraining."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset))
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    routed = weighted_router_loss(out.routing, model.config.loss)
    assert torch.allclose(routed, out.loss - out.losses["lm"], atol=1e-7)
    assert (routed > 0) == (preset == "tiny_moe")
