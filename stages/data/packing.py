"""Pack documents (text or image + text) into fixed-length rows with document-masking metadata.

Best-fit decreasing, window by window (`pack_windows`):
  1. Documents are read in stream order until the window holds `window_tokens` tokens. The window's
     rows come out together with the number of documents consumed so far: the point a stage can
     record and resume from. Memory stays bounded by one window.
  2. A document longer than `seq_len` is cut into pieces of at most `seq_len` tokens, each cut at the
     latest allowed position: never strictly inside an atomic range (an image block with its markers)
     or an image span, never just before an image placeholder, never where the three position axes
     differ. A piece therefore starts on a text token, whose (t, h, w) positions are equal.
  3. Pieces are taken longest first (ties: doc_id, then offset, so the result is deterministic) and
     each goes into the open row with the least room that still fits it, skipping rows that already
     hold a piece of the same document (document masking would join the two). A piece that fits no
     open row is cut at an allowed position so that its head fills the roomiest row with at least
     FILL_MIN_TOKENS of room, and its tail goes back in line; only then does a new row open.
  4. Rows come out in the order they were opened; pieces inside a row in the order they were placed.

Row format (what `ernie.positions`, `ernie.attention` and `ernie.losses` rely on):
  * input_ids [S] int32, pad_id on padding; document_ids [S] int32, the doc_id, -1 on padding.
  * labels [S] int32 = input_ids, except -100 on padding, on the first token of every piece (it
    would be predicted from another document or from context in another row) and on image
    placeholders (an image patch cannot be predicted).
  * position_ids restart at 0 on every piece: [S] for text packing (what
    `ernie.positions.document_positions` computes), [3, S] for VL packing, the document's own 3D
    positions minus their value at the piece start (what `ernie.positions.vl_position_ids` computes
    from input_ids, grids and document_ids). Padding counts 0, 1, 2, ... on every axis.
  * modality_ids [S] int8 (0 text, 1 image placeholder).
  * VL only: pixel_values [P, patch_dim] uint8, the patches of the row's images in token order, and
    image_grid_thw [n_images, 3] int32 (empty arrays of those widths when the row has no image).

Text or VL is chosen per call (`vl`), not inferred: every row of one stream must have one format,
and a stream cannot be looked at ahead of time. A text document in a VL stream gets equal positions
on the three axes.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
PAD_DOCUMENT_ID = -1
PLACEHOLDER = 1
"""modality_ids value of an image placeholder token."""
WINDOW_ROWS = 256
"""Default window, in rows of seq_len: each window loses about one row to its last, partly filled rows,
so 64 rows reach ~98.5% on lognormal length mixes and 256 rows >= 99%."""

FILL_MIN_TOKENS = 8
"""Gaps of at least this many tokens are filled with the head of a cut piece (each cut costs the
label of the tail's first token); smaller gaps stay padding."""

Row = dict[str, np.ndarray]


@dataclass
class PackImage:
    patches: np.ndarray
    """uint8 [t * h * w, patch_dim]: the image's patches before spatial merging."""
    grid_thw: tuple[int, int, int]
    """Patch grid (t, h, w), as the vision encoder and `ernie.positions` read it."""
    span: tuple[int, int]
    """[start, end) of the image's placeholder tokens within its document."""


@dataclass
class PackDocument:
    doc_id: int
    """Global id (>= 0), the document_ids value of its tokens; unique within a window."""
    tokens: np.ndarray
    """int32 [n], bos ... eos already added."""
    positions: np.ndarray | None = None
    """int32 [3, n] (t, h, w) positions of a VL document (text tokens: three equal values); None: text."""
    modality: np.ndarray | None = None
    """int8 [n], 1 on image placeholders, 0 elsewhere; None: all text."""
    images: list[PackImage] = field(default_factory=list)
    """In order of appearance."""
    atomic: list[tuple[int, int]] = field(default_factory=list)
    """[start, end) token ranges never cut (an image block with its start/end markers)."""
    source: str = ""


@dataclass(frozen=True, slots=True)
class Piece:
    """Tokens [start, end) of one document, placed in a row as a unit."""

    document: PackDocument
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RowFormat:
    seq_len: int
    vl: bool = False
    """3D position_ids plus pixel_values / image_grid_thw; text packing refuses images."""
    patch_dim: int = 0
    """Width of pixel_values (VL only), so rows without images still have the right shape."""
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.vl and self.patch_dim < 1:
            raise ValueError(f"VL packing needs patch_dim >= 1, got {self.patch_dim}")


@dataclass(frozen=True)
class PackedWindow:
    rows: list[Row]
    documents_consumed: int
    """Documents read from the stream so far, this window included: resume by skipping this many."""


# ---------------------------------------------------------------------- entry points
def pack_windows(
    documents: Iterable[PackDocument],
    seq_len: int,
    *,
    window_tokens: int | None = None,
    vl: bool = False,
    patch_dim: int = 0,
    pad_id: int = 0,
) -> Iterator[PackedWindow]:
    """Best-fit-decreasing rows, one `PackedWindow` per window of >= `window_tokens` tokens (the last may be less)."""
    fmt = RowFormat(seq_len, vl, patch_dim, pad_id)
    window_tokens = WINDOW_ROWS * seq_len if window_tokens is None else window_tokens
    if window_tokens < seq_len:
        raise ValueError(f"window_tokens={window_tokens} must be at least seq_len={seq_len}")
    consumed = 0
    stream = iter(documents)
    while window := _take_window(stream, window_tokens):
        consumed += len(window)
        yield PackedWindow(pack_window(window, fmt), consumed)


def pack_window(documents: Sequence[PackDocument], fmt: RowFormat) -> list[Row]:
    """Best-fit-decreasing rows of exactly these documents (one window)."""
    pieces = [piece for doc in documents for piece in split_document(doc, fmt)]
    return [build_row(row, fmt) for row in best_fit_rows(pieces, fmt.seq_len, _CutCache(fmt))]


def pack_best_fit(
    documents: Iterable[PackDocument],
    seq_len: int,
    *,
    window_tokens: int | None = None,
    vl: bool = False,
    patch_dim: int = 0,
    pad_id: int = 0,
) -> Iterator[Row]:
    """The rows of `pack_windows` as one stream (for callers that do not record resume points)."""
    windows = pack_windows(documents, seq_len, window_tokens=window_tokens, vl=vl, patch_dim=patch_dim, pad_id=pad_id)
    for window in windows:
        yield from window.rows


def pack_greedy(
    documents: Iterable[PackDocument], seq_len: int, *, vl: bool = False, patch_dim: int = 0, pad_id: int = 0
) -> Iterator[Row]:
    """Baseline: pieces appended in stream order; a piece that does not fit closes (pads) the row."""
    fmt = RowFormat(seq_len, vl, patch_dim, pad_id)
    row: list[Piece] = []
    room = seq_len
    for doc in documents:
        for piece in split_document(doc, fmt):
            if piece.length > room or (row and row[-1].document is doc):  # one piece of a document per row
                yield build_row(row, fmt)
                row, room = [], seq_len
            row.append(piece)
            room -= piece.length
    if row:
        yield build_row(row, fmt)


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    document_ids: Sequence[int] | None = None,
    pad_id: int = 0,
) -> Iterator[Row]:
    """Text token lists -> best-fit rows; `document_ids[i]` labels `documents[i]` (default: i)."""
    ids = range(len(documents)) if document_ids is None else document_ids
    if len(ids) != len(documents):
        raise ValueError(f"{len(ids)} document_ids for {len(documents)} documents")
    docs = (PackDocument(int(i), np.asarray(t, dtype=np.int32)) for i, t in zip(ids, documents, strict=True))
    return pack_best_fit(docs, seq_len, pad_id=pad_id)


def packing_efficiency(rows: Sequence[Row]) -> float:
    """Real tokens / row slots (0.0 for no rows)."""
    if not rows:
        return 0.0
    real = sum(int((r["document_ids"] != PAD_DOCUMENT_ID).sum()) for r in rows)
    return real / sum(r["document_ids"].shape[-1] for r in rows)


def _take_window(stream: Iterator[PackDocument], window_tokens: int) -> list[PackDocument]:
    window: list[PackDocument] = []
    tokens = 0
    for doc in stream:  # stops right after the document that fills the window; the rest stays unread
        window.append(doc)
        tokens += len(doc.tokens)
        if tokens >= window_tokens:
            break
    return window


# ---------------------------------------------------------------------- splitting
def split_document(doc: PackDocument, fmt: RowFormat) -> list[Piece]:
    """Pieces of at most `seq_len` tokens, cut at the latest allowed positions (see the module docstring)."""
    protected = _check_document(doc, fmt)
    n, seq_len = len(doc.tokens), fmt.seq_len
    if n <= seq_len:
        return [Piece(doc, 0, n)]
    cuts = _allowed_cuts(doc, protected)
    pieces, start = [], 0
    while n - start > seq_len:
        end = int(cuts[np.searchsorted(cuts, start + seq_len, side="right") - 1])
        if end <= start:  # only reachable through stray placeholders or unequal positions in text
            raise ValueError(
                f"document {doc.doc_id}: no allowed cut in tokens ({start}, {start + seq_len}] "
                f"(placeholders or 3D positions without an image span covering them)"
            )
        pieces.append(Piece(doc, start, end))
        start = end
    pieces.append(Piece(doc, start, n))
    return pieces


class _CutCache:
    """Allowed cuts per document of one window, computed when gap filling first asks."""

    def __init__(self, fmt: RowFormat) -> None:
        self.fmt, self.cuts = fmt, {}

    def __call__(self, doc: PackDocument) -> np.ndarray:
        if id(doc) not in self.cuts:
            self.cuts[id(doc)] = _allowed_cuts(doc, _check_document(doc, self.fmt))
        return self.cuts[id(doc)]


def _allowed_cuts(doc: PackDocument, protected: list[tuple[int, int]]) -> np.ndarray:
    """Sorted token offsets c in (0, n] where a piece may end (and the next begin)."""
    n = len(doc.tokens)
    inside = np.zeros(n + 2, dtype=np.int32)
    for start, end in protected:
        inside[start + 1] += 1
        inside[end] -= 1
    forbidden = np.cumsum(inside[: n + 1]) > 0
    forbidden[0] = True
    if doc.modality is not None:
        forbidden[:n] |= doc.modality == PLACEHOLDER
    if doc.positions is not None:
        forbidden[:n] |= (doc.positions != doc.positions[0]).any(axis=0)
    return np.flatnonzero(~forbidden)


def _check_document(doc: PackDocument, fmt: RowFormat) -> list[tuple[int, int]]:
    """Raise ValueError naming the document if it is malformed; returns its protected [start, end) ranges."""
    n = len(doc.tokens)
    name = f"document {doc.doc_id}"
    if doc.doc_id < 0:
        raise ValueError(f"{name}: doc_id must be >= 0 (-1 marks padding)")
    if doc.tokens.ndim != 1 or n == 0:
        raise ValueError(f"{name}: tokens must be a non-empty 1-D array, got shape {doc.tokens.shape}")
    if doc.positions is None and doc.modality is None and not doc.images and not doc.atomic:
        return []
    if not fmt.vl and (doc.positions is not None or doc.images):
        raise ValueError(f"{name} has images or 3D positions; pack it with vl=True")
    if doc.positions is not None and doc.positions.shape != (3, n):
        raise ValueError(f"{name}: positions have shape {doc.positions.shape}, expected (3, {n})")
    if doc.modality is not None and doc.modality.shape != (n,):
        raise ValueError(f"{name}: modality has shape {doc.modality.shape}, expected ({n},)")
    ranges = [tuple(r) for r in doc.atomic] + [img.span for img in doc.images]
    for start, end in ranges:
        if not 0 <= start < end <= n:
            raise ValueError(f"{name}: range [{start}, {end}) is not inside its {n} tokens")
    _check_images(doc, fmt, name)
    protected = _merge_ranges(ranges)
    for start, end in protected:
        if end - start > fmt.seq_len:
            raise ValueError(
                f"{name}: atomic range [{start}, {end}) of {end - start} tokens is longer than seq_len={fmt.seq_len}"
            )
    return protected


def _check_images(doc: PackDocument, fmt: RowFormat, name: str) -> None:
    previous_end = 0
    for i, image in enumerate(doc.images):
        start, end = image.span
        t, h, w = image.grid_thw
        if start < previous_end:
            raise ValueError(f"{name}: image {i} span {image.span} overlaps or precedes the previous image")
        if image.patches.shape != (t * h * w, fmt.patch_dim) or image.patches.dtype != np.uint8:
            raise ValueError(
                f"{name}: image {i} patches are {image.patches.dtype} {image.patches.shape}, "
                f"expected uint8 ({t * h * w}, {fmt.patch_dim}) for grid {image.grid_thw}"
            )
        if doc.modality is None or (doc.modality[start:end] != PLACEHOLDER).any():
            raise ValueError(f"{name}: image {i} span {image.span} is not all placeholder tokens (modality 1)")
        previous_end = end
    placeholders = 0 if doc.modality is None else int((doc.modality == PLACEHOLDER).sum())
    if placeholders != sum(img.span[1] - img.span[0] for img in doc.images):
        raise ValueError(f"{name}: {placeholders} placeholder tokens but its images span a different number")


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of overlapping [start, end) ranges; ranges that only touch stay apart (a cut between is allowed)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# ---------------------------------------------------------------------- placing and building
def best_fit_rows(
    pieces: Sequence[Piece], seq_len: int, cuts_of=None, fill_min: int = FILL_MIN_TOKENS
) -> list[list[Piece]]:
    """Pieces grouped into rows by best-fit decreasing (see the module docstring), rows in opening order.

    Gap filling: a piece that fits no open row would open a new one; if `cuts_of(document)` gives
    its allowed cuts, its head is cut to fill the roomiest open row with at least `fill_min` tokens
    of room instead (rows that already hold the document are skipped), and the tail goes on.
    """
    rows: list[list[Piece]] = []
    open_rooms: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the tightest fit
    rows_of_split_doc: dict[int, set[int]] = {}
    seen: set[tuple[int, int]] = set()
    queue = [(-p.length, p.document.doc_id, p.start, p) for p in pieces]
    heapq.heapify(queue)
    while queue:
        piece = heapq.heappop(queue)[3]
        doc_id = piece.document.doc_id
        if (doc_id, piece.start) in seen:
            raise ValueError(f"document {doc_id} appears twice in one window; doc_ids must be unique")
        seen.add((doc_id, piece.start))
        taken = rows_of_split_doc.get(doc_id, ()) if piece.length < len(piece.document.tokens) else ()
        slot = bisect_left(open_rooms, (piece.length, -1))
        while slot < len(open_rooms) and open_rooms[slot][1] in taken:
            slot += 1
        if slot == len(open_rooms) and cuts_of is not None:
            head = _fill_gap(piece, open_rooms, rows_of_split_doc.get(doc_id, ()), cuts_of, fill_min)
            if head is not None:
                slot, head_piece, tail = head
                heapq.heappush(queue, (-tail.length, doc_id, tail.start, tail))
                seen.discard((doc_id, piece.start))
                seen.add((doc_id, head_piece.start))
                piece = head_piece
        if slot == len(open_rooms):
            index, room = len(rows), seq_len
            rows.append([])
        else:
            room, index = open_rooms.pop(slot)
        rows[index].append(piece)
        if room > piece.length:
            insort(open_rooms, (room - piece.length, index))
        if piece.length < len(piece.document.tokens):
            rows_of_split_doc.setdefault(doc_id, set()).add(index)
    return rows


def _fill_gap(piece: Piece, open_rooms, holding, cuts_of, fill_min: int):
    """(slot, head, tail): the piece cut so its head fills the roomiest usable open row, or None."""
    cuts = cuts_of(piece.document)
    for slot in range(len(open_rooms) - 1, -1, -1):  # roomiest first
        room, index = open_rooms[slot]
        if room < fill_min:
            return None
        if index in holding:
            continue
        # the latest allowed cut that fits the room, leaving a head of >= fill_min and a non-empty tail
        at = np.searchsorted(cuts, piece.start + room, side="right") - 1
        if at < 0:
            return None
        end = int(cuts[at])
        if end - piece.start < fill_min or end >= piece.end:
            return None
        return slot, Piece(piece.document, piece.start, end), Piece(piece.document, end, piece.end)
    return None


def build_row(pieces: Sequence[Piece], fmt: RowFormat) -> Row:
    """The row arrays of `pieces` laid out in order, then padding (see the module docstring)."""
    S = fmt.seq_len
    if sum(p.length for p in pieces) > S:
        raise ValueError(f"pieces of {sum(p.length for p in pieces)} tokens do not fit a row of {S}")
    count = np.arange(S, dtype=np.int32)
    input_ids = np.full(S, fmt.pad_id, dtype=np.int32)
    labels = np.full(S, IGNORE_INDEX, dtype=np.int32)
    document_ids = np.full(S, PAD_DOCUMENT_ID, dtype=np.int32)
    modality_ids = np.zeros(S, dtype=np.int8)
    position_ids = np.zeros((3, S) if fmt.vl else S, dtype=np.int32)
    images: list[PackImage] = []
    at = 0
    for piece in pieces:
        doc, a, b, n = piece.document, piece.start, piece.end, piece.length
        input_ids[at : at + n] = doc.tokens[a:b]
        labels[at + 1 : at + n] = doc.tokens[a + 1 : b]
        document_ids[at : at + n] = doc.doc_id
        if doc.modality is not None:
            modality_ids[at : at + n] = doc.modality[a:b]
        if doc.positions is not None:
            position_ids[:, at : at + n] = doc.positions[:, a:b] - doc.positions[0, a]
        else:
            position_ids[..., at : at + n] = count[:n]
        images += [img for img in doc.images if a <= img.span[0] and img.span[1] <= b]
        at += n
    labels[modality_ids == PLACEHOLDER] = IGNORE_INDEX
    position_ids[..., at:] = count[: S - at]
    row = {
        "input_ids": input_ids,
        "labels": labels,
        "document_ids": document_ids,
        "position_ids": position_ids,
        "modality_ids": modality_ids,
    }
    if fmt.vl:
        patches = [img.patches for img in images]
        row["pixel_values"] = np.concatenate(patches) if patches else np.zeros((0, fmt.patch_dim), dtype=np.uint8)
        row["image_grid_thw"] = np.array([img.grid_thw for img in images], dtype=np.int32).reshape(-1, 3)
    return row


# ---------------------------------------------------------------------- token balance
def balance_order(vision_tokens: np.ndarray, text_tokens: np.ndarray, group_rows: int, seed: int) -> np.ndarray:
    """Row permutation whose consecutive groups of `group_rows` rows have near-equal vision fractions.

    Rows are sorted by vision fraction and dealt snake-wise (0..G-1, G-1..0, ...) into G full groups;
    group order is then shuffled with `seed`. The n % group_rows rows left over, taken from the middle
    of the sorted order, come last as a partial group. Band: each full group's mean row fraction is
    within (f_max - f_min) / group_rows of the mean over the full groups' rows, because any two groups
    take one row from each block of G consecutive sorted rows, so their sums differ by at most the sum of
    the block ranges <= f_max - f_min. For rows of equal token count (packed rows nearly are) the mean
    row fraction is the group's token fraction.
    """
    vision, text = _token_counts(vision_tokens, text_tokens)
    if group_rows < 1:
        raise ValueError(f"group_rows must be >= 1, got {group_rows}")
    n = len(vision)
    by_fraction = np.argsort(_fractions(vision, text), kind="stable")
    groups = n // group_rows
    spare = n - groups * group_rows
    middle = (n - spare) // 2
    partial = by_fraction[middle : middle + spare]
    dealt = np.concatenate([by_fraction[:middle], by_fraction[middle + spare :]]).reshape(group_rows, groups)
    dealt[1::2] = dealt[1::2, ::-1]  # snake: odd blocks dealt in reverse
    grouped = dealt.T[np.random.default_rng(seed).permutation(groups)]
    return np.concatenate([grouped.ravel(), partial]).astype(np.int64)


def group_vision_fractions(
    order: np.ndarray, vision_tokens: np.ndarray, text_tokens: np.ndarray, group_rows: int
) -> np.ndarray:
    """Vision / all real tokens of each consecutive group of `group_rows` rows in `order` (last may be partial)."""
    vision, text = _token_counts(vision_tokens, text_tokens)
    if group_rows < 1:
        raise ValueError(f"group_rows must be >= 1, got {group_rows}")
    if sorted(order.tolist()) != list(range(len(vision))):
        raise ValueError(f"order is not a permutation of the {len(vision)} rows")
    starts = np.arange(0, len(order), group_rows)
    group_vision = np.add.reduceat(vision[order], starts) if len(order) else np.zeros(0)
    group_total = np.add.reduceat(vision[order] + text[order], starts) if len(order) else np.zeros(0)
    return group_vision / np.maximum(group_total, 1)


def _token_counts(vision_tokens: np.ndarray, text_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vision, text = np.asarray(vision_tokens, dtype=np.int64), np.asarray(text_tokens, dtype=np.int64)
    if vision.ndim != 1 or vision.shape != text.shape:
        raise ValueError(f"vision_tokens {vision.shape} and text_tokens {text.shape} must be 1-D of one length")
    if (vision < 0).any() or (text < 0).any():
        raise ValueError("token counts must be >= 0")
    return vision, text


def _fractions(vision: np.ndarray, text: np.ndarray) -> np.ndarray:
    return vision / np.maximum(vision + text, 1)
