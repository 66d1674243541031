"""Images of chat requests -> the model's vision inputs, made as training makes them.

A chat's image parts arrive as OpenAI `image_url` parts with the image inline as a `data:` URL
(base64); the server reaches no network and reads no file a client names. Each image is decoded
and resized with the bounds the model was trained with (`images/settings.json` of the dataset
artifact, found beside the served model or its tokenizer) by the same code as the data stage and
post-training (`stages.imaging`), and the template's one placeholder per image is widened to the
image's token count.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import numpy as np
import torch

from ernie.batching import normalize_pixels
from pipeline.formats import IMAGE_SETTINGS

from .engine import RequestError


def find_image_settings(*artifact_dirs: Path) -> dict | None:
    """min_pixels / max_pixels of the first artifact that holds `images/settings.json`, else None."""
    from stages.imaging import read_resize_bounds

    return next((b for b in map(read_resize_bounds, artifact_dirs) if b is not None), None)


def image_bytes(url: str, where: str) -> bytes:
    """The encoded image inside a `data:image/...;base64,` URL; anything else is a `RequestError`."""
    if not url.startswith("data:"):
        raise RequestError(
            f"{where}: this server does not fetch image URLs; send the image inline as a data: URL "
            "(data:image/png;base64,...)",
            where,
        )
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header.startswith("data:image/"):
        raise RequestError(f"{where}: expected a base64 data:image/... URL, got {header[:40]!r}", where)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data URL's payload is not valid base64", where) from None


class RequestImages:
    """Turns a request's images into widened prompt ids and vision inputs for one model."""

    def __init__(self, config, settings: dict | None) -> None:
        self.config, self.settings = config, settings

    def apply(
        self, prompt_ids: list[int], images: list[tuple[bytes, str]]
    ) -> tuple[list[int], dict[str, torch.Tensor]]:
        """(`prompt_ids` with each image placeholder widened to its image's tokens, pixel_values and
        image_grid_thw); `images` holds (encoded bytes, where in the request) in placeholder order."""
        if not images:
            return prompt_ids, {}
        vision = self.config.vision
        if vision is None:
            raise RequestError(f"{images[0][1]}: the served model has no vision encoder; send text only", "messages")
        if self.settings is None:
            raise RequestError(
                f"{images[0][1]}: the served model's image settings ({IMAGE_SETTINGS}) were not found beside it or "
                "its tokenizer, so images cannot be resized as in training",
                "messages",
            )
        from stages.imaging import ImageError, decode_image, image_to_patches, image_token_count

        patches, grids = [], []
        for data, where in images:
            try:
                image = decode_image(data, where)
                image_patches, grid = image_to_patches(image, vision, **self.settings)
            except ImageError as err:
                raise RequestError(str(err), where) from None
            patches.append(image_patches)
            grids.append(grid)
        placeholder = self.config.image_token_id
        if prompt_ids.count(placeholder) != len(images):
            raise RequestError(
                f"the prompt holds {prompt_ids.count(placeholder)} image placeholders for {len(images)} images",
                "messages",
            )
        counts = iter(image_token_count(grid, vision) for grid in grids)
        widened = [t for token in prompt_ids for t in ([token] * next(counts) if token == placeholder else [token])]
        inputs = {
            "pixel_values": normalize_pixels(torch.from_numpy(np.concatenate(patches))),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }
        return widened, inputs
