"""The DPO stage's per-pair losses against hand-computed values, and their settings' checks."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.contract import UserError
from stages.posttrain import dpo
from stages.posttrain.config import LOSS_TYPES

# policy and reference summed answer log-probs of two pairs
CHOSEN, REJECTED = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
REF_CHOSEN, REF_REJECTED = torch.tensor([-10.5, -12.0]), torch.tensor([-10.5, -11.5])
# h = (pi_c - ref_c) - (pi_r - ref_r): pair 0 -> 0.5 - (-0.5) = 1.0, pair 1 -> 0 - 0.5 = -0.5
H = [1.0, -0.5]


def loss(**kwargs) -> list[float]:
    return dpo.preference_loss(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, **kwargs).tolist()


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_sigmoid_loss_by_hand():
    beta = 0.1
    assert loss(beta=beta) == pytest.approx([-log_sigmoid(beta * h) for h in H], rel=1e-6)
    assert loss(beta=beta)[0] < math.log(2) < loss(beta=beta)[1], "a pair ranked right costs less than log 2"


def test_label_smoothing_mixes_in_the_flipped_label():
    beta, eps = 0.5, 0.2
    expected = [-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H]
    assert loss(beta=beta, label_smoothing=eps) == pytest.approx(expected, rel=1e-6)
    # smoothing keeps the loss from vanishing on a pair the policy already ranks far apart
    far = dpo.preference_loss(
        torch.tensor([0.0]), torch.tensor([-100.0]), torch.zeros(1), torch.zeros(1), 1.0, "sigmoid", eps
    )
    assert far.item() == pytest.approx(eps * 100, rel=1e-3)


def test_ipo_loss_by_hand_and_its_minimum_at_the_target_margin():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    assert loss(beta=beta, loss_type="ipo") == pytest.approx([(h - 2.0) ** 2 for h in H], rel=1e-6)
    at_target = dpo.preference_loss(torch.tensor([2.0]), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta, "ipo")
    assert at_target.item() == 0.0


def test_gradients_push_chosen_up_and_rejected_down():
    for loss_type in LOSS_TYPES:
        chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
        dpo.preference_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, 0.1, loss_type).sum().backward()
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all(), loss_type


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_type": "hinge"}, "loss_type='hinge' must be one of"),
        ({"label_smoothing": 0.5}, "label_smoothing=0.5 must lie in"),
        ({"label_smoothing": -0.1}, "label_smoothing=-0.1 must lie in"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to loss_type=sigmoid only"),
    ],
)
def test_bad_settings_name_the_setting(overrides, message):
    with pytest.raises(UserError, match=message):
        dpo.Config(**overrides).validate("dpo")
