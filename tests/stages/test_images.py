"""Image -> patches matches HF's ERNIE 4.5-VL image processor and feeds the tiny VL model;
bad image bytes fail at decode time with the file's name."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ernie.batching import PIXEL_MEAN as IMAGE_MEAN
from ernie.batching import PIXEL_STD as IMAGE_STD
from ernie.batching import normalize_pixels as normalize_patches
from ernie.config import VisionConfig
from ernie.model import ErnieForCausalLM
from ernie.presets import tiny_vl
from ernie.vision import patch_positions
from stages.imaging import ImageError, decode_image, fit_resolution, image_to_patches, image_token_count

VISION = VisionConfig()
HF_MIN_PIXELS, HF_MAX_PIXELS = 56 * 56, 28 * 28 * 6177  # the processor's default `size`
SMALL_MAX_PIXELS = 28 * 28 * 16


@pytest.fixture(scope="module")
def hf_module():
    return pytest.importorskip("transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe")


def noise_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Noise plus a smooth gradient, so resampling filters that differ would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = (yy * 255 // max(height - 1, 1) + xx * 128 // max(width - 1, 1)) % 256
    channels = 4 if mode == "RGBA" else 3
    pixels = (rng.integers(0, 96, (height, width, channels)) + gradient[..., None]) % 256
    if mode == "RGBA":
        pixels[..., 3] = rng.choice([0, 128, 255], (height, width))
    image = Image.fromarray(pixels.astype(np.uint8), "RGBA" if mode == "RGBA" else "RGB")
    return image if mode in ("RGB", "RGBA") else image.convert(mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# ---------------------------------------------------------------------- HF parity
@pytest.mark.parametrize(
    "height, width, mode, max_pixels",
    [
        (37, 91, "RGB", HF_MAX_PIXELS),  # upscaled to reach min_pixels
        (123, 45, "RGB", HF_MAX_PIXELS),
        (211, 333, "RGB", HF_MAX_PIXELS),  # rounded to multiples of 28
        (500, 29, "RGB", SMALL_MAX_PIXELS),  # thin and downscaled to max_pixels
        (300, 260, "RGBA", SMALL_MAX_PIXELS),  # transparency composited onto white
        (64, 99, "L", HF_MAX_PIXELS),
        (56, 84, "RGB", HF_MAX_PIXELS),  # already a multiple of 28: not resampled
    ],
)
def test_patches_match_hf_processor(hf_module, height, width, mode, max_pixels):
    image = noise_image(height, width, seed=height * width, mode=mode)
    processor = hf_module.Ernie4_5_VLMoeImageProcessorPil(
        size={"shortest_edge": HF_MIN_PIXELS, "longest_edge": max_pixels}
    )
    expected = processor(images=[image], return_tensors="np")

    patches, grid = image_to_patches(image, VISION, HF_MIN_PIXELS, max_pixels)

    assert patches.dtype == np.uint8 and patches.shape == (grid[1] * grid[2], VISION.patch_dim)
    assert [list(grid)] == expected["image_grid_thw"].tolist()
    assert (grid[1] * 14, grid[2] * 14) == hf_module.smart_resize(height, width, 28, HF_MIN_PIXELS, max_pixels)
    # both resize the same uint8 pixels with Pillow's BICUBIC and rescale in float64 before the
    # float32 mean/std step, so the only room for difference is float32 rounding
    torch.testing.assert_close(
        normalize_patches(patches), torch.from_numpy(expected["pixel_values"]), atol=1e-6, rtol=0
    )


def test_patch_order_is_block_major_as_the_vision_encoder_expects():
    image = noise_image(84, 112, seed=1)
    patches, grid = image_to_patches(image, VISION, HF_MIN_PIXELS, HF_MAX_PIXELS)
    pixels_HWC = np.asarray(image)
    positions = patch_positions(torch.tensor([grid]), VISION.spatial_merge_size).tolist()
    P = VISION.patch_size
    for index, (row, col) in enumerate(positions):
        crop_CPP = pixels_HWC[row * P : (row + 1) * P, col * P : (col + 1) * P].transpose(2, 0, 1)
        np.testing.assert_array_equal(patches[index], crop_CPP.reshape(-1), err_msg=f"patch {index}")


def test_normalize_patches_is_per_channel_clip_normalisation():
    patches = np.zeros((2, VISION.patch_dim), dtype=np.uint8)
    per_channel = VISION.patch_size**2
    patches[0, :per_channel] = 255  # red channel of the first patch
    out = normalize_patches(patches)
    assert out.dtype == torch.float32 and out.shape == patches.shape
    assert out[0, 0].item() == pytest.approx((1 - IMAGE_MEAN[0]) / IMAGE_STD[0], abs=1e-6)
    for c in range(3):
        assert out[1, c * per_channel].item() == pytest.approx(-IMAGE_MEAN[c] / IMAGE_STD[c], abs=1e-6)
    torch.testing.assert_close(normalize_patches(torch.from_numpy(patches)), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((2, 588), np.float32), "uint8"),
        (np.zeros((2, 587), np.uint8), "shape"),
        (np.zeros(588, np.uint8), "shape"),
    ],
)
def test_normalize_patches_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        normalize_patches(bad)


# ---------------------------------------------------------------------- model
def placeholder_block(grid, config) -> list[int]:
    n = image_token_count(grid, config.vision)
    return [config.image_start_token_id] + [config.image_token_id] * n + [config.image_end_token_id]


def test_tiny_vl_model_runs_on_the_patches():
    torch.manual_seed(0)
    config = tiny_vl()
    model = ErnieForCausalLM(config).eval()
    images = [noise_image(50, 120, seed=2), noise_image(90, 70, seed=3)]
    items = [image_to_patches(image, config.vision, HF_MIN_PIXELS, SMALL_MAX_PIXELS) for image in images]
    text = [20, 21, 22]
    ids = text + placeholder_block(items[0][1], config) + text + placeholder_block(items[1][1], config) + text
    input_ids = torch.tensor([ids])
    grid_thw = torch.tensor([grid for _, grid in items])

    def logits_for(patch_arrays):
        pixel_values = torch.cat([normalize_patches(p) for p in patch_arrays])
        with torch.no_grad():
            return model(input_ids, pixel_values=pixel_values, image_grid_thw=grid_thw).logits

    logits = logits_for([p for p, _ in items])
    assert logits.shape == (1, len(ids), config.vocab_size) and torch.isfinite(logits).all()

    # the pixels reach the language model: changing the second image changes only what follows it
    second_start = ids.index(config.image_start_token_id, len(text) + 1)
    changed = logits_for([items[0][0], 255 - items[1][0]])
    torch.testing.assert_close(changed[:, :second_start], logits[:, :second_start])
    assert not torch.allclose(changed[:, second_start:], logits[:, second_start:])


def test_image_token_count():
    assert image_token_count((1, 4, 8), VISION) == 8
    assert image_token_count((1, 2, 2), VISION) == 1
    for bad in [(2, 4, 4), (1, 3, 4), (1, 0, 4)]:
        with pytest.raises(ValueError, match=str(bad[1])):
            image_token_count(bad, VISION)


# ---------------------------------------------------------------------- fit_resolution
def assert_valid_resolution(height, width, factor, min_pixels, max_pixels, resized):
    h, w = resized
    assert h % factor == 0 and w % factor == 0 and h > 0 and w > 0
    assert min_pixels <= h * w <= max_pixels
    # aspect kept: one common scale s puts each side within one factor step of s * side
    low = max((h - factor) / height, (w - factor) / width)
    high = min((h + factor) / height, (w + factor) / width)
    assert low < high, f"{height}x{width} -> {h}x{w} distorts the aspect ratio"


@settings(max_examples=400, deadline=None)
@given(
    height=st.integers(1, 6000),
    width=st.integers(1, 6000),
    factor=st.sampled_from([14, 28, 32]),
    min_tokens=st.integers(1, 64),
    extra_tokens=st.integers(0, 4000),
)
def test_fit_resolution_properties_and_hf_agreement(hf_module, height, width, factor, min_tokens, extra_tokens):
    min_pixels, max_pixels = min_tokens * factor**2, (min_tokens + extra_tokens) * factor**2
    try:
        hf = hf_module.smart_resize(height, width, factor, min_pixels, max_pixels)
    except ValueError:
        hf = None
    try:
        resized = fit_resolution(height, width, factor, min_pixels, max_pixels)
    except ImageError as error:
        assert f"{height}x{width}" in str(error)
        # we refuse only what HF refuses or where HF's answer breaks the bounds it promises
        assert hf is None or not min_pixels <= hf[0] * hf[1] <= max_pixels
        return
    assert resized == hf
    assert_valid_resolution(height, width, factor, min_pixels, max_pixels, resized)


def test_fit_resolution_keeps_ordinary_photos_close_to_their_shape():
    h, w = fit_resolution(3024, 4032, 28, HF_MIN_PIXELS, 28 * 28 * 1280)
    assert math.isclose(h / w, 3 / 4, rel_tol=0.03) and h * w <= 28 * 28 * 1280


@pytest.mark.parametrize(
    "height, width, match",
    [(0, 50, "0x50"), (50, -1, "50x-1"), (10, 2500, "aspect ratio 250"), (20, 3900, "20x3900")],
)
def test_fit_resolution_rejects_degenerate_sizes(height, width, match):
    with pytest.raises(ImageError, match=match):
        fit_resolution(height, width, 28, HF_MIN_PIXELS, 28 * 28 * 4)


def test_fit_resolution_rejects_bad_bounds():
    with pytest.raises(ImageError, match="min_pixels=100, max_pixels=50"):
        fit_resolution(56, 56, 28, 100, 50)


# ---------------------------------------------------------------------- decoding
def test_decode_image_gives_rgb_for_formats_and_modes():
    rgb = decode_image(encode(noise_image(40, 60, seed=4), "JPEG", quality=90), "photo.jpg")
    assert rgb.mode == "RGB" and rgb.size == (60, 40)
    grey = decode_image(encode(noise_image(30, 20, seed=5, mode="L"), "PNG"), "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((0, 0))[0] == grey.getpixel((0, 0))[1]
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert decode_image(encode(clear, "PNG"), "clear.png").getpixel((3, 3)) == (255, 255, 255)


def test_decode_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = encode(noise_image(40, 60, seed=6), "JPEG", exif=exif)
    assert decode_image(data, "sideways.jpg").size == (40, 60)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "name, data",
    [
        ("cut.jpg", truncated(encode(noise_image(64, 64, seed=7), "JPEG", quality=95))),
        ("cut.png", truncated(encode(noise_image(64, 64, seed=8), "PNG"))),
        ("noise.bin", np.random.default_rng(9).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
        ("empty.jpg", b""),
        ("text.png", b"\x89PNG\r\n\x1a\nnot really a png"),
    ],
)
def test_decode_image_rejects_corrupt_bytes_naming_the_file(name, data):
    with pytest.raises(ImageError, match=name.replace(".", r"\.")):
        decode_image(data, name)
