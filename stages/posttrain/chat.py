"""Chats -> token ids with the assistant mask, and padded batches.

Each piece of `ernie.chat_template.render_segments` is tokenised on its own, so a token
never straddles a prompt/answer boundary and the mask is exact: 1 on the tokens an
assistant wrote (its answer and the end-of-sentence token), 0 elsewhere. Tokenising the
prompt apart from the answer is also how generation sees it: the prompt is encoded, the
answer is sampled token by token after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ernie.chat_template import render_segments
from pipeline.contract import UserError
from pipeline.formats import read_jsonl

PAD_ID = 0
IGNORE_INDEX = -100
PAD_DOCUMENT = -1
"""document_ids of padding in a packed batch: a document of its own, never attended to by a chat."""


@dataclass
class Tokenised:
    """One chat: token ids and the 0/1 assistant mask, same length."""

    ids: list[int]
    mask: list[int]

    @property
    def supervised(self) -> int:
        return sum(self.mask)


def tokenise_chat(tokenizer, messages: list[dict], max_length: int) -> Tokenised:
    """The rendered chat, truncated to `max_length` tokens."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_assistant in render_segments(messages):
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [int(is_assistant)] * len(piece)
    return Tokenised(ids[:max_length], mask[:max_length])


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
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "loss_mask": loss_mask.to(device)}


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
    return {k: v.to(device) for k, v in batch.items()}
