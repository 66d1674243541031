"""Images -> ViT patches, exactly as the ERNIE 4.5-VL image processor makes them (shared by the data
stage, which packs images into rows, and post-training, which reads the images of chats).

Reference: transformers 5.23 `Ernie4_5_VLMoeImageProcessorPil` (the backend used without
torchvision): RGB (transparency composited onto white), `smart_resize` to multiples of
patch * merge = 28 with Pillow BICUBIC on uint8 pixels, rescale by 1/255, CLIP mean / std,
then patches flattened block-major with each patch's pixels in (C, P, P) order. For a still
image the processor's temporal patch size is 1 (a patch is C*P*P values); the model's adapter
pairs the single frame with itself.

Shards store the resized pixels as uint8 patches (4x smaller than float32); normalisation
turns them into the processor's float output when a batch is loaded
(`ernie.batching.normalize_pixels`, the model's input contract).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ernie.config import VisionConfig
from pipeline.formats import IMAGE_SETTINGS

RGB_CHANNELS = 3
MAX_ASPECT_RATIO = 200
"""smart_resize refuses images whose long side is more than 200 times the short side."""


class ImageError(ValueError):
    """An image that cannot be decoded or resized; the message names the image or its numbers."""


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent pixels become white, as the processor's `convert_to_rgb` does."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes to an upright RGB image, or raise `ImageError` naming `name`.

    `load()` forces the full decode here, so a truncated file fails now and not inside a
    data-loader worker later. EXIF orientation is applied like transformers' `load_image`.
    """
    if not data:
        raise ImageError(f"image {name!r} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            _check_size(opened, name, len(data))
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"image {name!r} ({len(data)} bytes) cannot be decoded: {e}") from e


def _check_size(image: Image.Image, name: str, size: int) -> None:
    """Refuse, before decoding, more pixels than Pillow's decompression-bomb limit: Pillow only warns
    up to twice that, so a PNG of a few hundred KB would decode to ~0.5 GB of pixels, per copy (every
    image is resized to at most `max_pixels` anyway)."""
    if image.width * image.height > Image.MAX_IMAGE_PIXELS:
        raise ImageError(
            f"image {name!r} ({size} bytes) declares {image.width}x{image.height} pixels, more than "
            f"{Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?)"
        )


def fit_resolution(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) to resize to: multiples of `factor`, min_pixels <= h*w <= max_pixels, aspect kept.

    The arithmetic is Qwen2-VL's `smart_resize` as the ERNIE-VL processor uses it (banker's
    `round` included), so token counts agree with HF. Where smart_resize would break its own
    bounds (very thin images get a side clamped up to `factor`) this raises instead.
    """
    if factor <= 0 or not 0 <= min_pixels <= max_pixels:
        raise ImageError(f"bad resize bounds: factor={factor}, min_pixels={min_pixels}, max_pixels={max_pixels}")
    if height <= 0 or width <= 0:
        raise ImageError(f"image size {height}x{width} (height x width) has a zero or negative side")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ImageError(f"image size {height}x{width} has aspect ratio {aspect:.1f} > {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar == 0 or w_bar == 0 or not min_pixels <= h_bar * w_bar <= max_pixels:
        raise ImageError(
            f"image size {height}x{width} has no resize to multiples of {factor} with "
            f"{min_pixels} <= pixels <= {max_pixels} (smart_resize gives {h_bar}x{w_bar})"
        )
    return h_bar, w_bar


def image_to_patches(
    image: Image.Image, vision: VisionConfig, min_pixels: int, max_pixels: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resized uint8 patches [n_patches, C*P*P] in the model's block-major order, and grid (1, h, w) in patches."""
    if vision.in_channels != RGB_CHANNELS:
        raise ValueError(f"images are RGB but the vision config has in_channels={vision.in_channels}")
    P, merge = vision.patch_size, vision.spatial_merge_size
    height, width = fit_resolution(image.height, image.width, P * merge, min_pixels, max_pixels)
    rgb = to_rgb(image)
    if (rgb.height, rgb.width) != (height, width):
        rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels_CHW = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    grid_h, grid_w = height // P, width // P
    C = vision.in_channels
    blocks = pixels_CHW.reshape(C, grid_h // merge, merge, P, grid_w // merge, merge, P)
    # (block row, block col, row in block, col in block, C, P, P): a merge x merge block is consecutive
    patches = blocks.transpose(1, 4, 2, 5, 0, 3, 6).reshape(grid_h * grid_w, C * P * P)
    return np.ascontiguousarray(patches), (1, grid_h, grid_w)


def image_token_count(grid: tuple[int, int, int], vision: VisionConfig) -> int:
    """Language-model placeholder tokens for one still image of `grid` (t, h, w) patches."""
    t, h, w = (int(x) for x in grid)
    merge = vision.spatial_merge_size
    if t != 1 or h <= 0 or w <= 0 or h % merge or w % merge:
        raise ValueError(f"image grid {tuple(grid)} must be (1, h, w) with h, w positive multiples of {merge}")
    return h * w // merge**2


def read_resize_bounds(artifact_dir: Path) -> dict[str, int] | None:
    """min_pixels / max_pixels an artifact's images were resized with (its `images/settings.json`, written
    by the data stage), or None when it has none: training and serving resize requests' images alike."""
    path = Path(artifact_dir) / IMAGE_SETTINGS
    if not path.is_file():
        return None
    bounds = json.loads(path.read_text())
    return {"min_pixels": int(bounds["min_pixels"]), "max_pixels": int(bounds["max_pixels"])}
