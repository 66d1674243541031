"""Packed rows (as the data stage writes them) -> model inputs: one collate for training, eval and quantize.

Rows hold raw uint8 patches; the model takes them normalised the way ERNIE 4.5-VL's image
processor does (rescale by 1/255 in float64, cast to float32, then (x - mean) / std per channel,
OpenAI-CLIP constants), so the normalisation is part of the model's input contract and lives here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
TEXT_FIELDS = ("input_ids", "labels", "document_ids", "position_ids")


def normalize_pixels(patches_uint8) -> torch.Tensor:
    """float32 (x/255 - mean) / std per channel of uint8 patches [n, C*P*P] (channel-major inside a patch)."""
    patches = torch.as_tensor(patches_uint8)
    C = len(PIXEL_MEAN)
    if patches.dtype != torch.uint8:
        raise ValueError(f"patches must be uint8 raw pixels, got {patches.dtype}")
    if patches.dim() != 2 or patches.shape[1] % C:
        raise ValueError(f"patches must be [n_patches, {C}*P*P], got shape {tuple(patches.shape)}")
    scaled = (patches.to(torch.float64) * RESCALE_FACTOR).to(torch.float32).view(patches.shape[0], C, -1)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32).view(1, C, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float32).view(1, C, 1)
    return ((scaled - mean) / std).reshape(patches.shape)


def collate(rows: Sequence[Mapping[str, Any]], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Model keyword arguments for a batch of rows.

    input_ids / labels / document_ids [B, S]; position_ids [B, S], or [3, B, S] when rows store
    3D positions [3, S]; pixel_values (normalised, rows' patches in row order) and image_grid_thw
    only when some row has an image.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    batch = {name: torch.stack([torch.as_tensor(r[name]).long() for r in rows]) for name in TEXT_FIELDS}
    if batch["position_ids"].dim() == 3:  # [B, 3, S] -> [3, B, S]
        batch["position_ids"] = batch["position_ids"].transpose(0, 1).contiguous()
    grids = [torch.as_tensor(r["image_grid_thw"]) for r in rows if "image_grid_thw" in r and len(r["image_grid_thw"])]
    if grids:
        batch["image_grid_thw"] = torch.cat(grids).long()
        batch["pixel_values"] = normalize_pixels(torch.cat([torch.as_tensor(r["pixel_values"]) for r in rows]))
    return {name: value.to(device) for name, value in batch.items()} if device is not None else batch
