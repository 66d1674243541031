"""Activation recomputation changes memory, not results: same loss, gradients and router counts."""

from __future__ import annotations

import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.moe import Router


def step(model: ErnieForCausalLM, policy: str, ids: torch.Tensor, every: int = 1) -> tuple[float, dict, list, int]:
    """(loss, grads, router counts, bytes of activations saved for backward) of one training step."""
    model.zero_grad(set_to_none=True)
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.expert_load.zero_()
    model.recompute, model.recompute_every = policy, every
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loads = [r.expert_load.clone() for r in model.modules() if isinstance(r, Router)]
    return float(out.loss.detach()), grads, loads, saved[0]


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe", "tiny_vl"])
def test_recomputation_keeps_loss_gradients_and_router_counts_and_saves_less(preset):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset)).train()
    ids = torch.randint(11, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    reference = step(model, "none", ids)
    saved = {"none": reference[3]}
    for policy, every in (("layers", 1), ("mlp", 1), ("layers", 2)):
        loss, grads, loads, saved[policy, every] = step(model, policy, ids, every)
        assert loss == pytest.approx(reference[0], abs=1e-6)
        assert grads.keys() == reference[1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference[1][name], atol=1e-6, rtol=1e-5, msg=f"{policy}: {name}")
        for load, expected in zip(loads, reference[2], strict=True):  # counted once, not again in backward
            assert torch.equal(load, expected)
    assert saved["layers", 1] < saved["mlp", 1] < saved["none"], saved
    assert saved["layers", 1] < saved["layers", 2] < saved["none"], "every other layer saves part of it"


def test_an_unknown_policy_is_refused_by_name():
    model = ErnieForCausalLM(get_preset("tiny_dense")).train()
    model.recompute = "everything"
    with pytest.raises(ValueError, match="recompute='everything'"):
        model(torch.tensor([[1, 20, 30]]))
