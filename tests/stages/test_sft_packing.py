"""Packed SFT batches: every chat once, inside one row, and the same assistant-token loss as padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie import ErnieForCausalLM, get_preset
from stages.posttrain.chat import PAD_DOCUMENT, Tokenised, pack_batch, pad_batch


def chats(lengths: list[int], vocab: int, seed: int = 0) -> list[Tokenised]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = max(1, n // 2)
        out.append(Tokenised(ids, [0] * prompt + [1] * (n - prompt)))
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=12), st.integers(32, 64))
def test_every_chat_lands_once_whole_and_in_order(lengths, max_length):
    examples = chats(lengths, 50)
    batch = pack_batch(examples, max_length, torch.device("cpu"))
    assert batch["input_ids"].shape[1] <= max_length
    found = []
    for r in range(batch["input_ids"].shape[0]):
        docs = batch["document_ids"][r]
        for d in docs.unique().tolist():
            if d == PAD_DOCUMENT:
                continue
            where = (docs == d).nonzero().squeeze(1)
            assert (where == torch.arange(where[0], where[-1] + 1)).all(), "a chat is contiguous"
            found.append((batch["input_ids"][r, where].tolist(), batch["loss_mask"][r, where].tolist()))
        padding = docs == PAD_DOCUMENT
        assert (batch["labels"][r, padding] == -100).all() and (batch["loss_mask"][r, padding] == 0).all()
    assert sorted(found) == sorted((e.ids, e.mask) for e in examples)


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_packed_loss_equals_the_padded_loss_on_fewer_rows(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = ErnieForCausalLM(cfg).eval()
    examples = chats([30, 7, 12, 25, 5, 18, 9], cfg.vocab_size)
    padded, packed = pad_batch(examples, torch.device("cpu")), pack_batch(examples, 40, torch.device("cpu"))
    assert packed["input_ids"].numel() < 0.6 * padded["input_ids"].numel(), "fewer padding tokens"
    with torch.no_grad():
        a, b = model(**padded).losses["lm"], model(**packed).losses["lm"]
    assert b.item() == pytest.approx(a.item(), abs=1e-5)
