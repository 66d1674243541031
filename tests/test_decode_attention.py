"""The decode-step attention path (one new token per row, grouped query heads folded into rows)
agrees with the general SDPA path, alone and inside greedy generation with the KV cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ernie import ErnieForCausalLM, get_preset
from ernie.attention import Attention, AttentionMask
from ernie.cache import KVCache
from ernie.generation import generate
from ernie.rope import frequency_axes, inv_frequencies, rope_cos_sin

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _layer(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> Attention:
    cfg = get_preset("tiny_dense").replace(
        hidden_size=num_heads * head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    return Attention(cfg, layer_idx=0).to(dtype)


def _left_padding_valid(batch: int, kv_len: int, generator: torch.Generator) -> torch.Tensor:
    """[B, kv_len] bool: row 0 sees only its newest key, the others a random amount of left padding."""
    pads = torch.randint(0, kv_len, (batch,), generator=generator)
    pads[0] = kv_len - 1
    return torch.arange(kv_len)[None, :] >= pads[:, None]


class _GeneralPathMask(AttentionMask):
    """A decode step's mask that `Attention.forward` takes through its general SDPA path."""

    @property
    def is_decode(self) -> bool:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_decode_step_equals_general_sdpa_path(groups, batch, dtype):
    """A whole Attention layer's decode step after a cached prefill: the decode path and the general
    path (SDPA with `enable_gqa` and the boolean mask) agree, with left padding, without a mask and
    with packed documents."""
    torch.manual_seed(groups * 10 + batch)
    gen = torch.Generator().manual_seed(batch)
    num_kv_heads, head_dim, past = 2, 16, 23
    layer = _layer(num_kv_heads * groups, num_kv_heads, head_dim, dtype)
    hidden = layer.q_proj.in_features
    x = torch.randn(batch, past + 1, hidden, dtype=dtype)
    inv_freq, axes = inv_frequencies(head_dim, 10000.0), frequency_axes(head_dim, None)
    positions = torch.arange(past + 1).expand(batch, -1)
    cos, sin = rope_cos_sin(positions, inv_freq, axes)
    # packed documents: the new token sees only its own document's keys
    documents = (torch.arange(past + 1)[None, :] >= torch.randint(1, past + 1, (batch, 1), generator=gen)).long()
    cases = [(_left_padding_valid(batch, past + 1, gen), None), (None, None), (None, documents)]
    for key_valid, docs in cases:
        outs = []
        for mask_type in (AttentionMask, _GeneralPathMask):
            cache = KVCache(1)
            prefix_valid = None if key_valid is None else key_valid[:, :past]
            prefix_docs = None if docs is None else docs[:, :past]
            prefix = mask_type(past=0, q_len=past, kv_len=past, key_valid=prefix_valid, document_ids=prefix_docs)
            step = mask_type(past=past, q_len=1, kv_len=past + 1, key_valid=key_valid, document_ids=docs)
            prefix, step = prefix.prepare(batch, x.device), step.prepare(batch, x.device)
            assert step.is_decode == (mask_type is AttentionMask)
            with torch.no_grad():
                layer(x[:, :past], (cos[:, :past], sin[:, :past]), prefix, cache)
                outs.append(layer(x[:, past:], (cos[:, past:], sin[:, past:]), step, cache))
        torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_decode_kernel_on_random_qkv_with_left_padding(groups, dtype):
    """The folded kernel alone on random q / k / v, rows seeing 1..kv_len keys (batch 1 and 5)."""
    torch.manual_seed(groups)
    gen = torch.Generator().manual_seed(groups)
    num_kv_heads, head_dim, kv_len = 2, 32, 40
    layer = _layer(num_kv_heads * groups, num_kv_heads, head_dim, dtype)
    for batch in (1, 5):
        q = torch.randn(batch, layer.num_heads, 1, head_dim, dtype=dtype)
        k = torch.randn(batch, num_kv_heads, kv_len, head_dim, dtype=dtype)
        v = torch.randn(batch, num_kv_heads, kv_len, head_dim, dtype=dtype)
        key_valid = _left_padding_valid(batch, kv_len, gen)
        mask = AttentionMask(past=kv_len - 1, q_len=1, kv_len=kv_len, key_valid=key_valid).prepare(batch, q.device)
        fast = layer._decode_attention(q, k, v, mask).view(batch, layer.num_heads, 1, head_dim)
        general = F.scaled_dot_product_attention(q, k, v, attn_mask=mask._prepared, enable_gqa=groups > 1)
        torch.testing.assert_close(fast.float(), general.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
        # a row that sees a single key returns that key's value exactly
        torch.testing.assert_close(fast[0, :, 0].float(), v[0, :, -1].repeat_interleave(groups, 0).float())


def test_decode_bias_is_made_once_per_forward_pass():
    valid = torch.tensor([[False, True, True], [True, True, True]])
    mask = AttentionMask(past=2, q_len=1, kv_len=3, key_valid=valid).prepare(2, torch.device("cpu"))
    bias = mask.decode_bias(torch.bfloat16)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.bfloat16
    assert mask.decode_bias(torch.bfloat16) is bias
    assert torch.equal(bias.isinf(), ~valid[:, None, None, :])
    unmasked = AttentionMask(past=2, q_len=1, kv_len=3).prepare(2, torch.device("cpu"))
    assert unmasked.decode_bias(torch.float32) is None


def test_prefill_and_training_steps_do_not_take_the_decode_path():
    assert not AttentionMask(past=0, q_len=1, kv_len=1).is_decode
    assert not AttentionMask(past=0, q_len=7, kv_len=7).is_decode
    assert not AttentionMask(past=4, q_len=3, kv_len=7).is_decode
    assert not AttentionMask(past=4, q_len=1, kv_len=5, impl="flex").is_decode


def test_cached_greedy_decode_matches_full_forward_argmax():
    """Greedy tokens through the KV cache (decode path) equal the argmax of a full, uncached forward
    pass over the prompt plus the tokens so far, for a left-padded batch."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_dense")).eval()
    pad = model.config.pad_token_id
    prompts = torch.randint(11, 500, (3, 9))
    attention_mask = torch.ones_like(prompts)
    prompts[1, :4], attention_mask[1, :4] = pad, 0
    prompts[2, :8], attention_mask[2, :8] = pad, 0  # a one-token prompt
    steps = 8
    tokens = generate(model, prompts, max_new_tokens=steps, attention_mask=attention_mask, eos_token_id=-1)
    ids, mask = prompts, attention_mask
    with torch.no_grad():
        for step in range(steps):
            expected = model(ids, attention_mask=mask).logits[:, -1].argmax(-1)
            assert torch.equal(tokens[:, step], expected), f"step {step}"
            ids = torch.cat([ids, expected[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(expected[:, None])], dim=1)
