"""Aux-loss-free balancing: the sign update of the routers' selection bias evens out expert load."""

from __future__ import annotations

import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.flops import peak_flops, training_flops_per_token
from ernie.moe import Router, update_router_biases


def skewed_router(experts: int = 8, hidden: int = 16) -> Router:
    router = Router(hidden, experts, top_k=2, norm_min=1e-12)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=torch.Generator().manual_seed(0)))
        router.weight[:2] += 0.5  # a shared direction for two experts: most (positive) tokens pick them
    return router.train()


def load_ratio(router: Router, x: torch.Tensor) -> float:
    counts = torch.bincount(router(x).topk_ids_TK.flatten(), minlength=router.weight.shape[0]).float()
    return float(counts.max() / counts.mean())


def test_the_bias_moves_by_rate_toward_under_used_experts_and_counts_restart():
    router = skewed_router()
    router.expert_load.copy_(torch.tensor([9.0, 7.0, 1.0, 1.0, 1.0, 1.0, 0.0, 4.0]))
    update_router_biases(router, rate=0.01)
    expected = 0.01 * torch.sign(torch.tensor(3.0) - torch.tensor([9.0, 7.0, 1.0, 1.0, 1.0, 1.0, 0.0, 4.0]))
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    assert router.expert_load.sum() == 0


def test_repeated_updates_balance_a_skewed_router_without_touching_its_weights():
    router = skewed_router()
    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(1)).abs()
    weight = router.weight.detach().clone()
    before = load_ratio(router, x)
    router.expert_load.zero_()
    for _ in range(300):
        router(x)
        update_router_biases(router, rate=5e-3)
    after = load_ratio(router, x)
    assert before > 3 and after < 1.5, (before, after)
    torch.testing.assert_close(router.weight, weight)


def test_the_update_reaches_every_router_of_a_model_text_and_vision_pools():
    model = ErnieForCausalLM(get_preset("tiny_vl")).train()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 2 * len(get_preset("tiny_vl").moe_layers)
    for r in routers:
        r.expert_load[0] = 5.0
    update_router_biases(model, rate=0.5)
    for r in routers:
        assert r.e_score_correction_bias[0] == -0.5 and (r.e_score_correction_bias[1:] == 0.5).all()


def test_flops_per_token_counts_active_experts_the_head_and_attention():
    cfg = get_preset("tiny_moe")
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    expected = (
        6 * (model.num_active_params() + cfg.vocab_size * cfg.hidden_size) + 6 * cfg.num_layers * cfg.hidden_size * 128
    )
    assert training_flops_per_token(model, 128) == expected
    assert model.num_active_params() < model.num_params()  # only the routed experts count
    assert peak_flops(torch.device("cpu")) is None
