"""LoRA adapters: start equal to the base model, train only themselves, merge back exactly."""

from __future__ import annotations

import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.lora import add_lora, lora_parameters, merge_lora
from ernie.moe import GroupedExperts


def model_and_batch(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = get_preset(name)
    model = ErnieForCausalLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


@pytest.mark.parametrize(
    ("name", "targets"), [("tiny_dense", ("attention", "mlp")), ("tiny_moe", ("attention", "experts"))]
)
def test_adapters_start_at_the_base_model_train_alone_and_merge_exactly(name, targets):
    model, ids = model_and_batch(name)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(input_ids=ids, labels=ids)
    adapted = add_lora(model, rank=4, alpha=8, targets=targets)
    assert adapted and all(p.requires_grad for p in lora_parameters(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".A" in n or ".B" in n for n in trainable), "only the adapters train"
    start = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(start.logits, before.logits, atol=0, rtol=0)  # B = 0

    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids, labels=ids)
    assert tuned.loss < start.loss - 0.05, "the adapters learn"

    assert merge_lora(model) == len(adapted)
    merged_state = model.state_dict()
    assert merged_state.keys() == base_state.keys(), "merged names are the base model's"
    changed = {k for k in base_state if not torch.equal(merged_state[k], base_state[k])}
    assert changed and all(any(a.startswith(k.rsplit(".", 1)[0]) for a in adapted) for k in changed)
    with torch.no_grad():
        after = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(after.logits, tuned.logits, atol=1e-5, rtol=1e-5)
    assert merge_lora(model) == 0


def test_expert_adapters_are_per_expert():
    model, _ = model_and_batch("tiny_moe")
    add_lora(model, rank=2, alpha=2, targets=("experts",))
    experts = next(m for m in model.modules() if isinstance(m, GroupedExperts))
    delta = experts.parametrizations.gate_up_proj[0]
    E = model.config.moe.num_experts
    assert delta.A.shape[0] == E and delta.B.shape[0] == E


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank=0 must be at least 1"),
        ({"rank": 4, "targets": ("attn",)}, "each must be one of"),
        ({"rank": 4, "targets": ("experts",)}, "no weights for LoRA targets"),
    ],
)
def test_bad_lora_settings(kwargs, message):
    model, _ = model_and_batch("tiny_dense")
    with pytest.raises(ValueError, match=message):
        add_lora(model, alpha=8, **kwargs)
