"""Chats -> token ids with the assistant mask, and padded batches.

Each piece of `ernie.chat_template.render_segments` is tokenised on its own, so a token
never straddles a prompt/answer boundary and the mask is exact: 1 on the tokens an
assistant wrote (its answer and the end-of-sentence token), 0 elsewhere. Tokenising the
prompt apart from the answer is also how generation sees it: the prompt is encoded, the
answer is sampled token by token after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ernie.batching import normalize_pixels
from ernie.chat_template import image_refs, render_segments
from pipeline.contract import UserError, contained
from pipeline.formats import IMAGE_SETTINGS, read_jsonl

PAD_ID = 0
IGNORE_INDEX = -100
PAD_DOCUMENT = -1
"""document_ids of padding in a packed batch: a document of its own, never attended to by a chat."""


@dataclass
class Tokenised:
    """One chat: token ids and the 0/1 assistant mask, same length; with images, their uint8 patches
    and (t, h, w) grids in the order their placeholder blocks appear."""

    ids: list[int]
    mask: list[int]
    patches: list[np.ndarray] = field(default_factory=list)
    grids: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def supervised(self) -> int:
        return sum(self.mask)


class ChatImages:
    """Images of chats, by ref relative to the dataset artifact, turned into the model's patches exactly
    as the data stage turns pretraining images (same resize bounds, from `images/settings.json`)."""

    def __init__(self, root: Path, vision, placeholder_id: int) -> None:
        from stages.imaging import read_resize_bounds

        self.root, self.vision, self.placeholder_id = Path(root), vision, placeholder_id
        bounds = read_resize_bounds(self.root)
        if bounds is None:
            raise UserError(f"the dataset artifact has chats with images but no {IMAGE_SETTINGS}; rerun the data stage")
        self.min_pixels, self.max_pixels = bounds["min_pixels"], bounds["max_pixels"]
        self._cache: dict[str, tuple[np.ndarray, tuple[int, int, int]]] = {}

    def token_count(self, grid: tuple[int, int, int]) -> int:
        from stages.imaging import image_token_count

        return image_token_count(grid, self.vision)

    def load(self, ref: str) -> tuple[np.ndarray, tuple[int, int, int]]:
        from stages.imaging import decode_image, image_to_patches

        if ref not in self._cache:
            path = contained(self.root, ref, f"image {ref!r} is not a file inside the dataset artifact")
            if not path.is_file():
                raise ValueError(f"image {ref!r} is not a file inside the dataset artifact")
            image = decode_image(path.read_bytes(), ref)
            self._cache[ref] = image_to_patches(image, self.vision, self.min_pixels, self.max_pixels)
        return self._cache[ref]


def tokenise_chat(
    tokenizer, messages: list[dict], max_length: int, images: ChatImages | None = None, **render_options
) -> Tokenised:
    """The rendered chat, truncated to `max_length` tokens (before any image block that would not fit
    whole). Each image's placeholder is widened to its token count; prompt options go to the template."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in render_segments(messages, **render_options):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return widen_images(Tokenised(ids, mask), image_refs(messages), images, max_length)


def widen_images(chat: Tokenised, refs: list[str], images: ChatImages | None, max_length: int) -> Tokenised:
    """`chat` (one placeholder per image, in `refs` order) with each placeholder widened to its image's
    token count and the image's patches attached, cut to `max_length` before a block that would not fit."""
    if refs and images is None:
        raise ValueError("the chat has images but the model has no vision encoder")
    if not refs:
        return Tokenised(chat.ids[:max_length], chat.mask[:max_length])
    out = Tokenised([], [])
    loaded = iter([images.load(ref) for ref in refs])
    for token, weight in zip(chat.ids, chat.mask, strict=True):
        count = 1
        if token == images.placeholder_id:
            image_patches, grid = next(loaded)
            count = images.token_count(grid)
            if len(out.ids) + count + 1 > max_length:  # the block and its end marker must fit
                cut = len(out.ids) - 1  # drop the start marker too
                return Tokenised(out.ids[:cut], out.mask[:cut], out.patches, out.grids)
            out.patches.append(image_patches)
            out.grids.append(grid)
        out.ids += [token] * count
        out.mask += [weight] * count
    return Tokenised(out.ids[:max_length], out.mask[:max_length], out.patches, out.grids)


def vision_inputs(examples: list[Tokenised]) -> dict[str, torch.Tensor]:
    """pixel_values (normalised) and image_grid_thw of the examples' images, in the given order."""
    patches = [p for e in examples for p in e.patches]
    if not patches:
        return {}
    grids = [g for e in examples for g in e.grids]
    return {
        "pixel_values": normalize_pixels(torch.from_numpy(np.concatenate(patches))),
        "image_grid_thw": torch.tensor(grids, dtype=torch.long),
    }


def read_records(path: Path, what: str) -> list[dict]:
    """The jsonl records of `path`; a missing, empty or malformed file is a `UserError`."""
    if not path.is_file():
        raise UserError(f"the dataset artifact has no {path.parent.name}/{path.name} ({what}); rerun the data stage")
    try:
        records = read_jsonl(path)
    except ValueError as err:
        raise UserError(f"{path} is not valid jsonl: {err}") from None
    if not records:
        raise UserError(f"{path} holds no records ({what})")
    return records


def pad_batch(examples: list[Tokenised], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (-100 on padding) and loss_mask (the assistant mask).

    Right padding needs no attention mask: causal attention never lets a real token see
    the padding after it.
    """
    length = max(len(e.ids) for e in examples)
    input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.ids)
        input_ids[row, :n] = torch.tensor(example.ids)
        labels[row, :n] = torch.tensor(example.ids)
        loss_mask[row, :n] = torch.tensor(example.mask)
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, **vision_inputs(examples)}
    return {k: v.to(device) for k, v in batch.items()}


def pack_batch(examples: list[Tokenised], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`pad_batch`'s tensors with the chats packed several to a row (first fit, longest first), plus
    document_ids: attention, positions and targets stay inside each chat, so the assistant-token
    loss equals the padded batch's, on fewer padding tokens."""
    rows: list[list[Tokenised]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.ids)):
        row = next((r for r, free in enumerate(room) if free >= len(example.ids)), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(example)
        room[row] -= len(example.ids)
    length = max(max_length - free for free in room)
    shape = (len(rows), length)
    input_ids = torch.full(shape, PAD_ID, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    loss_mask = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    placed = [example for chats in rows for example in chats]  # the order images meet the model in
    for r, chats in enumerate(rows):
        at = 0
        for d, example in enumerate(chats):
            n = len(example.ids)
            input_ids[r, at : at + n] = torch.tensor(example.ids)
            labels[r, at : at + n] = torch.tensor(example.ids)
            loss_mask[r, at : at + n] = torch.tensor(example.mask)
            document_ids[r, at : at + n] = d
            at += n
    batch = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "document_ids": document_ids}
    batch.update(vision_inputs(placed))
    return {k: v.to(device) for k, v in batch.items()}
