"""One collate turns stored rows (text or VL) into model inputs; val loss sees the images."""

from __future__ import annotations

import numpy as np
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.batching import collate, normalize_pixels
from ernie.evaluation import val_loss
from ernie.positions import vl_position_ids


def vl_row(cfg, seed: int, seq_len: int = 24) -> dict:
    rng = np.random.default_rng(seed)
    block = [cfg.image_start_token_id] + [cfg.image_token_id] * 4 + [cfg.image_end_token_id]
    ids = [1, *rng.integers(11, 400, 5).tolist(), *block, *rng.integers(11, 400, seq_len - 12).tolist(), 2]
    ids = np.array(ids[:seq_len], dtype=np.int32)
    grid = np.array([[1, 4, 4]], dtype=np.int32)
    positions = vl_position_ids(torch.from_numpy(ids)[None].long(), cfg, torch.from_numpy(grid)).squeeze(1).numpy()
    return {
        "input_ids": ids,
        "labels": np.where(ids == cfg.image_token_id, -100, ids).astype(np.int32),
        "document_ids": np.zeros(seq_len, dtype=np.int32),
        "position_ids": positions.astype(np.int32),
        "modality_ids": (ids == cfg.image_token_id).astype(np.int8),
        "pixel_values": rng.integers(0, 256, (16, cfg.vision.patch_dim), dtype=np.uint8),
        "image_grid_thw": grid,
    }


def test_collate_stacks_text_moves_3d_positions_and_concatenates_images():
    cfg = get_preset("tiny_vl")
    rows = [vl_row(cfg, 0), {**vl_row(cfg, 1), "pixel_values": np.zeros((0, 588), np.uint8), "image_grid_thw": []}]
    rows[1]["input_ids"] = np.where(rows[1]["input_ids"] == cfg.image_token_id, 20, rows[1]["input_ids"])
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, 24) and batch["position_ids"].shape == (3, 2, 24)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]
    torch.testing.assert_close(batch["pixel_values"], normalize_pixels(rows[0]["pixel_values"]))
    text_only = collate([{k: v for k, v in rows[1].items() if k not in ("pixel_values", "image_grid_thw")}])
    assert "pixel_values" not in text_only


def test_val_loss_on_vl_rows_depends_on_the_pixels():
    cfg = get_preset("tiny_vl")
    torch.manual_seed(0)
    model = ErnieForCausalLM(cfg)
    rows = [vl_row(cfg, 0), vl_row(cfg, 1)]
    loss, tokens = val_loss(model, rows, batch_size=2)
    other = [{**r, "pixel_values": 255 - r["pixel_values"]} for r in rows]
    assert abs(val_loss(model, other, batch_size=2)[0] - loss) > 1e-6
    assert tokens == sum(int((r["labels"][1:] != -100).sum()) for r in rows)
    stacked = {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "document_ids", "position_ids")}
    text_loss, _ = val_loss(model, stacked, batch_size=1)  # the stacked form still works (no images)
    assert np.isfinite(text_loss)
