"""Position ids: per-document restarts for packed rows and the 3D (t, h, w) positions of
VL sequences.

VL rule (HF `get_rope_index`, ERNIE_FACTS §1.3): text tokens get one position on all three
axes; an image / video placeholder block at offset p gets grid positions (t, h, w) + p after
spatial (and, for video, temporal) merging; after the block p advances by
max(h, w) / merge. Image start/end markers are text for positions (they are vision only
for expert routing).
"""

from __future__ import annotations

import torch

from .config import ErnieConfig


def document_positions(document_ids_BS: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document boundary inside a packed row."""
    B, S = document_ids_BS.shape
    idx = torch.arange(S, device=document_ids_BS.device).expand(B, S)
    boundary = torch.ones_like(document_ids_BS, dtype=torch.bool)
    boundary[:, 1:] = document_ids_BS[:, 1:] != document_ids_BS[:, :-1]
    doc_start = torch.where(boundary, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - doc_start


def vision_token_mask(input_ids: torch.Tensor, config: ErnieConfig) -> torch.Tensor:
    """True where a token is routed to the vision experts (placeholders and start/end markers)."""
    ids = torch.tensor(config.vision_token_ids, device=input_ids.device)
    return torch.isin(input_ids, ids)


def vl_position_ids(
    input_ids_BS: torch.Tensor,
    config: ErnieConfig,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    document_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """3D positions [3, B, S]; positions restart per document when `document_ids_BS` is given."""
    v = config.vision
    assert v is not None
    B, S = input_ids_BS.shape
    grids = {
        config.image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        config.video_token_id: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    out = torch.zeros(3, B, S, dtype=torch.long)
    ids_rows = input_ids_BS.tolist()
    doc_rows = document_ids_BS.tolist() if document_ids_BS is not None else [[0] * S for _ in range(B)]
    for b in range(B):
        pos, start = 0, 0
        while start < S:
            end = start + 1
            token = ids_rows[b][start]
            kind = token if token in grids else None
            if start > 0 and doc_rows[b][start] != doc_rows[b][start - 1]:
                pos = 0
            while end < S and doc_rows[b][end] == doc_rows[b][start] and _kind(ids_rows[b][end], grids) == kind:
                end += 1
            if kind is None:
                out[:, b, start:end] = torch.arange(pos, pos + end - start)
                pos += end - start
            else:
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(
                        f"more {'image' if kind == config.image_token_id else 'video'} blocks than grid_thw rows"
                    )
                t_merge = 1 if kind == config.image_token_id else v.temporal_merge_size
                block = _grid_positions(grid, t_merge, v.spatial_merge_size, pos)
                if block.shape[1] != end - start:
                    raise ValueError(
                        f"row {b}: {end - start} placeholder tokens at {start} "
                        f"but grid_thw {grid} needs {block.shape[1]}"
                    )
                out[:, b, start:end] = block
                pos += max(grid[1], grid[2]) // v.spatial_merge_size
            start = end
    return out.to(input_ids_BS.device)


def _kind(token: int, grids: dict) -> int | None:
    return token if token in grids else None


def _grid_positions(grid: list[int], t_merge: int, merge: int, offset: int) -> torch.Tensor:
    t, h, w = grid[0] // t_merge, grid[1] // merge, grid[2] // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + offset
