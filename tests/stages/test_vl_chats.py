"""Chats with images inline: the template's image parts, their widened placeholder blocks with the
image's patches, truncation that never splits a block, and batches the VL model reads alike padded or packed."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import IMAGE_END, IMAGE_MARK, IMAGE_START, image_refs, render
from pipeline.formats import IMAGE_SETTINGS
from stages.data.scenes import generate_scenes
from stages.data.tokenizer import train_tokenizer
from stages.imaging import image_token_count
from stages.posttrain.chat import ChatImages, pack_batch, pad_batch, tokenise_chat

MODEL = get_preset("tiny_vl")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["how many red squares are there", "two", "three", "a blue circle"] * 30, 300)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    (root / "images").mkdir()
    for i, scene in enumerate(generate_scenes(3, random.Random(0))):
        (root / "images" / f"scene-{i}.png").write_bytes(scene.png)
    (root / IMAGE_SETTINGS).write_text(json.dumps({"min_pixels": 56 * 56, "max_pixels": 112 * 112}))
    return ChatImages(root, MODEL.vision, MODEL.image_token_id)


def chat(*refs: str, answer: str = "two") -> list[dict]:
    parts = [{"type": "image", "image": r} for r in refs] + [{"type": "text", "text": "how many red squares"}]
    return [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]


def test_image_parts_render_inline_as_one_marked_placeholder_in_order():
    messages = chat("images/scene-0.png", "images/scene-2.png")
    text = render(messages)
    assert text.count(IMAGE_MARK) == 2 and text.index(IMAGE_MARK) < text.index("how many")
    assert image_refs(messages) == ["images/scene-0.png", "images/scene-2.png"]
    with pytest.raises(ValueError, match=r"message 0 \(user\) has a content part \{'type': 'video'"):
        render([{"role": "user", "content": [{"type": "video", "video": "x"}]}])
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) content must be a string"):
        render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}])


def test_each_image_becomes_its_token_count_of_placeholders_with_its_patches(tokenizer, images):
    example = tokenise_chat(tokenizer, chat("images/scene-0.png", "images/scene-1.png"), 512, images)
    assert len(example.patches) == len(example.grids) == 2
    placeholders = [i for i, t in enumerate(example.ids) if t == MODEL.image_token_id]
    expected = sum(image_token_count(g, MODEL.vision) for g in example.grids)
    assert len(placeholders) == expected and not any(example.mask[i] for i in placeholders)
    assert sum(p.shape[0] for p in example.patches) == sum(t * h * w for t, h, w in example.grids)
    starts = [i for i, t in enumerate(example.ids) if t == tokenizer.token_to_id(IMAGE_START)]
    ends = [i for i, t in enumerate(example.ids) if t == tokenizer.token_to_id(IMAGE_END)]
    assert [e - s - 1 for s, e in zip(starts, ends, strict=True)] == [
        image_token_count(g, MODEL.vision) for g in example.grids
    ]
    assert example.supervised > 0


def test_truncation_stops_before_an_image_block_that_does_not_fit(tokenizer, images):
    whole = tokenise_chat(tokenizer, chat("images/scene-0.png", "images/scene-1.png"), 512, images)
    second_start = [i for i, t in enumerate(whole.ids) if t == tokenizer.token_to_id(IMAGE_START)][1]
    cut = tokenise_chat(tokenizer, chat("images/scene-0.png", "images/scene-1.png"), second_start + 3, images)
    assert cut.ids == whole.ids[:second_start] and len(cut.grids) == 1


def test_a_chat_with_images_needs_a_vl_model_and_images_inside_the_artifact(tokenizer, images):
    with pytest.raises(ValueError, match="the chat has images but the model has no vision encoder"):
        tokenise_chat(tokenizer, chat("images/scene-0.png"), 512, None)
    with pytest.raises(ValueError, match=r"image '../secret.png' is not a file inside the dataset artifact"):
        tokenise_chat(tokenizer, chat("../secret.png"), 512, images)


def test_padded_and_packed_batches_give_the_vl_model_the_same_loss(tokenizer, images):
    torch.manual_seed(0)
    model = ErnieForCausalLM(MODEL.replace(vocab_size=tokenizer.get_vocab_size())).eval()
    examples = [
        tokenise_chat(tokenizer, chat(*refs, answer=answer), 512, images)
        for refs, answer in (
            (["images/scene-0.png"], "two"),
            ([], "three"),
            (["images/scene-1.png", "images/scene-2.png"], "a blue circle"),
            (["images/scene-2.png"], "two"),
        )
    ]
    padded, packed = pad_batch(examples, torch.device("cpu")), pack_batch(examples, 200, torch.device("cpu"))
    assert padded["image_grid_thw"].shape[0] == packed["image_grid_thw"].shape[0] == 4
    assert packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        a, b = model(**padded).losses["lm"], model(**packed).losses["lm"]
    assert torch.isfinite(a) and b.item() == pytest.approx(a.item(), abs=1e-5)
