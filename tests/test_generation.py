"""Greedy generation with our KV cache produces HF transformers' `generate` tokens."""

from __future__ import annotations

import pytest
import torch
from hf_reference import load_hf

from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import save_pretrained
from ernie.generation import generate, sample_next


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_greedy_generation_matches_hf_generate(preset, tmp_path):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset)).eval()
    save_pretrained(model, tmp_path)
    hf, _ = load_hf(tmp_path)
    prompt = torch.randint(11, model.config.vocab_size, (2, 7))
    ours = generate(model, prompt, max_new_tokens=12, eos_token_id=-1)
    theirs = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs[:, prompt.shape[1] :])


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe")).eval()
    long = torch.randint(11, 500, (1, 9))
    short = torch.randint(11, 500, (1, 5))
    pad = model.config.pad_token_id
    batch = torch.cat([long, torch.cat([torch.full((1, 4), pad), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = generate(model, batch, max_new_tokens=6, attention_mask=mask, eos_token_id=-1)
    assert torch.equal(together[0], generate(model, long, max_new_tokens=6, eos_token_id=-1)[0])
    assert torch.equal(together[1], generate(model, short, max_new_tokens=6, eos_token_id=-1)[0])


def test_rows_stop_at_eos_and_are_padded():
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_dense")).eval()
    prompt = torch.randint(11, 500, (1, 4))
    free = generate(model, prompt, max_new_tokens=5, eos_token_id=-1)[0]
    stop_at = int(free[1])  # pretend the second generated token is the end of sentence
    stopped = generate(model, prompt, max_new_tokens=5, eos_token_id=stop_at)[0]
    first_eos = int((free == stop_at).nonzero()[0])
    assert torch.equal(stopped[: first_eos + 1], free[: first_eos + 1])
    assert (stopped[first_eos + 1 :] == model.config.pad_token_id).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)) for _ in range(200)}
    assert draws == {0, 1}


def test_a_vl_model_never_generates_image_or_video_tokens():
    """Placeholders and their markers need pixels: even when they would win, another token is drawn."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_vl")).eval()
    with torch.no_grad():
        model.lm_head.weight[list(model.config.vision_token_ids)] *= 1000.0
    prompt = torch.randint(20, model.config.vocab_size, (2, 6))
    out = model(prompt).logits[:, -1]
    assert int(out.argmax(-1)[0]) in model.config.vision_token_ids, "the test makes a vision token the favourite"
    for temperature in (0.0, 1.0):
        new = generate(model, prompt, max_new_tokens=8, temperature=temperature, seed=0)
        assert not torch.isin(new, torch.tensor(model.config.vision_token_ids)).any()
