"""Pack tokenized documents into fixed-length rows with document masking metadata.

Rules (what the pretrain stage and `ernie.losses` rely on):
  * A document that fits in a row is never split: it goes into the first open row with
    room (first-fit over a small window of open rows, so little is wasted on padding).
  * A document longer than `seq_len` fills whole rows by itself, in order; its tail
    (shorter than a row) is then packed like a short document. A document therefore has
    at most one piece per row, and its pieces appear in row order.
  * `document_ids` are global document indices (distinct within a row by construction).
    Padding has document id -1, token id 0 (pad) and label -100.
  * `position_ids` restart at 0 at every change of document id, exactly what
    `ernie.positions.document_positions` computes (the padding run counts 0, 1, ...).
  * `labels` = input_ids, except -100 on padding and on the first token of every piece:
    the model shifts labels inside, so that token would be predicted from the previous
    document (or, for a tail piece, from context that is in another row).
  * `modality_ids` are 0 (text).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

IGNORE_INDEX = -100
PAD_DOCUMENT_ID = -1
OPEN_ROWS = 8
"""Rows kept open for first-fit; more barely helps, fewer wastes more padding."""


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    document_ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of exactly `seq_len` tokens; `document_ids[i]` labels `documents[i]` (default: i)."""
    ids = range(len(documents)) if document_ids is None else document_ids
    open_rows: list[list[tuple[int, Sequence[int]]]] = []  # each row: [(doc id, tokens), ...]
    free: list[int] = []
    for doc_id, tokens in zip(ids, documents, strict=True):
        whole = len(tokens) - len(tokens) % seq_len
        for start in range(0, whole, seq_len):  # long document: full rows of its own, in order
            yield _row([(doc_id, tokens[start : start + seq_len])], seq_len, pad_id)
        tail = tokens[whole:]
        if not len(tail):
            continue
        slot = next((i for i, room in enumerate(free) if room >= len(tail)), None)
        if slot is None:
            if len(open_rows) == OPEN_ROWS:  # close the fullest row to make space
                fullest = min(range(OPEN_ROWS), key=lambda i: free[i])
                yield _row(open_rows.pop(fullest), seq_len, pad_id)
                free.pop(fullest)
            open_rows.append([])
            free.append(seq_len)
            slot = len(open_rows) - 1
        open_rows[slot].append((doc_id, tail))
        free[slot] -= len(tail)
        if free[slot] == 0:
            yield _row(open_rows.pop(slot), seq_len, pad_id)
            free.pop(slot)
    for pieces in open_rows:
        yield _row(pieces, seq_len, pad_id)


def _row(pieces: list[tuple[int, Sequence[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    input_ids = np.full(seq_len, pad_id, dtype=np.int32)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
    document_ids = np.full(seq_len, PAD_DOCUMENT_ID, dtype=np.int32)
    position_ids = np.zeros(seq_len, dtype=np.int32)
    at = 0
    for doc_id, tokens in pieces:
        n = len(tokens)
        input_ids[at : at + n] = tokens
        labels[at + 1 : at + n] = input_ids[at + 1 : at + n]
        document_ids[at : at + n] = doc_id
        position_ids[at : at + n] = np.arange(n)
        at += n
    position_ids[at:] = np.arange(seq_len - at)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "document_ids": document_ids,
        "position_ids": position_ids,
        "modality_ids": np.zeros(seq_len, dtype=np.int8),
    }
