"""Images in chat requests to a served VL model: OpenAI `image_url` parts (inline data: URLs) become
the same vision inputs training makes, the reply is the model's own greedy decode of them, and bad
images get OpenAI-style 400s naming the part."""

from __future__ import annotations

import base64
import json
import random
import socket

import openai
import pytest
import torch

import stages.serve as serve_stage
from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import render
from ernie.checkpoint import save_pretrained
from ernie.generation import generate
from pipeline.formats import IMAGE_SETTINGS
from stages.data.scenes import generate_scenes
from stages.data.tokenizer import train_tokenizer
from stages.imaging import image_token_count
from stages.serve.engine import Engine, RequestError
from stages.serve.images import RequestImages, image_bytes

MODEL = get_preset("tiny_vl")
BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}


@pytest.fixture(scope="module")
def vl_ckpt(tmp_path_factory):
    """A tiny VL checkpoint with its tokenizer and image settings, as the pipeline's artifacts hold them."""
    ckpt = tmp_path_factory.mktemp("vl_ckpt")
    torch.manual_seed(0)
    save_pretrained(ErnieForCausalLM(MODEL), ckpt)
    tokenizer = train_tokenizer(["how many red squares are there", "two", "three", "a blue circle"] * 30, 300)
    (ckpt / "tokenizer").mkdir()
    tokenizer.save(str(ckpt / "tokenizer" / "tokenizer.json"))
    (ckpt / "images").mkdir()
    (ckpt / IMAGE_SETTINGS).write_text(json.dumps(BOUNDS))
    return ckpt


@pytest.fixture(scope="module")
def scene_urls():
    scenes = generate_scenes(2, random.Random(0))
    return [f"data:image/png;base64,{base64.b64encode(scene.png).decode()}" for scene in scenes]


def _messages(urls: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "how many red squares"}]}]


def _greedy_reference(engine: Engine, urls: list[str], max_tokens: int) -> tuple[str, int]:
    """(text, prompt tokens) of the model's own greedy decode of the request, built from the template."""
    parts = [{"type": "image", "image": f"#{i}"} for i in range(len(urls))]
    text = render([{"role": "user", "content": [*parts, {"type": "text", "text": "how many red squares"}]}], True)
    images = [(image_bytes(url, f"#{i}"), f"#{i}") for i, url in enumerate(urls)]
    ids, vision = engine.images.apply(engine.encode(text), images)
    new = generate(engine.model, torch.tensor([ids]), max_tokens, **vision)[0].tolist()
    eos = engine.config.eos_token_id
    return engine.decode(new[: new.index(eos)] if eos in new else new).strip(), len(ids)


def test_request_images_widen_each_placeholder_to_its_tokens_with_its_patches(vl_ckpt, scene_urls):
    engine = Engine.load(vl_ckpt, vl_ckpt / "tokenizer" / "tokenizer.json")
    text = render([{"role": "user", "content": [{"type": "image", "image": "a"}, {"type": "image", "image": "b"}]}])
    ids = engine.encode(text)
    images = [(image_bytes(url, f"#{i}"), f"#{i}") for i, url in enumerate(scene_urls)]
    widened, vision = engine.images.apply(ids, images)
    tokens = [image_token_count(grid, MODEL.vision) for grid in vision["image_grid_thw"].tolist()]
    assert widened.count(MODEL.image_token_id) == sum(tokens) and len(widened) == len(ids) - 2 + sum(tokens)
    assert vision["pixel_values"].shape[0] == int(vision["image_grid_thw"].prod(-1).sum())


def test_bad_images_and_a_text_model_are_refused_by_name(scene_urls):
    with pytest.raises(RequestError, match="does not fetch image URLs"):
        image_bytes("https://example.com/cat.png", "messages[0].content[0].image_url")
    with pytest.raises(RequestError, match="not valid base64"):
        image_bytes("data:image/png;base64,@@@", "x")
    with pytest.raises(RequestError, match=r"image 'x' \(4 bytes\) cannot be decoded"):
        RequestImages(MODEL, BOUNDS).apply([MODEL.image_token_id], [(b"\x89PNx", "x")])
    with pytest.raises(RequestError, match="has no vision encoder"):
        RequestImages(get_preset("tiny_moe"), BOUNDS).apply([5], [(image_bytes(scene_urls[0], "x"), "x")])
    with pytest.raises(RequestError, match="image settings"):
        RequestImages(MODEL, None).apply([MODEL.image_token_id], [(image_bytes(scene_urls[0], "x"), "x")])


@pytest.fixture(scope="module")
def vl_endpoint(vl_ckpt):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = serve_stage.Config(port=port, model_name="ernie-vl-test", max_tokens=6)
    url = serve_stage.start(vl_ckpt, vl_ckpt / "tokenizer" / "tokenizer.json", cfg, cfg.model_name)
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    serve_stage.stop(cfg)
    if started:
        ray.shutdown()


def test_served_reply_to_an_image_chat_is_the_models_greedy_decode(vl_ckpt, vl_endpoint, scene_urls):
    engine = Engine.load(vl_ckpt, vl_ckpt / "tokenizer" / "tokenizer.json")
    for urls in (scene_urls[:1], scene_urls):
        reply = vl_endpoint.chat.completions.create(
            model="ernie-vl-test", messages=_messages(urls), max_tokens=6, temperature=0.0
        )
        expected, prompt_tokens = _greedy_reference(engine, urls, 6)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == prompt_tokens > 16 * len(urls)  # with the images' tokens


def test_served_bad_images_get_an_openai_400_naming_the_part(vl_endpoint, scene_urls):
    bad = _messages(["https://example.com/cat.png"])
    with pytest.raises(openai.BadRequestError) as caught:
        vl_endpoint.chat.completions.create(model="ernie-vl-test", messages=bad, max_tokens=2)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "messages[0].content[0].image_url"
    corrupt = _messages([f"data:image/png;base64,{base64.b64encode(b'not a png').decode()}"])
    with pytest.raises(openai.BadRequestError, match="cannot be decoded"):
        vl_endpoint.chat.completions.create(model="ernie-vl-test", messages=corrupt, max_tokens=2)
