"""Property tests of the multimodal best-fit-decreasing packer (`stages.data.packing`).

Every document's tokens come back once and in order, images travel with their placeholders,
atomic ranges are never cut, nothing attends or predicts across pieces, positions are what the
model computes from the row, efficiency beats the greedy baseline, windows are resumable, and
the token-balanced order keeps every micro-batch near the corpus's vision fraction.

Test documents encode where they came from: a text token is TEXT_BASE + its offset in the
document, and every image's patches carry a unique image number, so any piece found in a row can
be located in its document without trusting the packer.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie.positions import document_positions, vl_position_ids
from ernie.presets import tiny_vl
from stages.data.packing import (
    IGNORE_INDEX,
    PackDocument,
    PackImage,
    RowFormat,
    balance_order,
    best_fit_rows,
    build_row,
    group_vision_fractions,
    pack_best_fit,
    pack_documents,
    pack_greedy,
    pack_windows,
    packing_efficiency,
    split_document,
)

CONFIG = tiny_vl()
IMAGE, IMAGE_START, IMAGE_END = CONFIG.image_token_id, CONFIG.image_start_token_id, CONFIG.image_end_token_id
TEXT_BASE = 1000
PATCH_DIM = 4
IMAGES_PER_DOC = 64  # image number = doc_id * IMAGES_PER_DOC + index in the document


# ---------------------------------------------------------------------- test documents
def text_document(doc_id: int, length: int, atomic: list[tuple[int, int]] | None = None) -> PackDocument:
    return PackDocument(doc_id, (TEXT_BASE + np.arange(length)).astype(np.int32), atomic=atomic or [])


@st.composite
def atomic_text_documents(draw, seq_len: int) -> list[PackDocument]:
    """Text documents with non-overlapping atomic ranges of 2..seq_len tokens (ranges may touch)."""
    documents = []
    for doc_id in range(draw(st.integers(0, 12))):
        length, ranges, at = draw(st.integers(1, 150)), [], 0
        for gap, size in draw(st.lists(st.tuples(st.integers(0, 20), st.integers(2, max(2, seq_len))), max_size=8)):
            start, end = at + gap, at + gap + size
            if end > length or size > seq_len:
                break
            ranges.append((start, end))
            at = end
        documents.append(text_document(doc_id, length, ranges))
    return documents


def vl_document(doc_id: int, segments: list[tuple[str, object]], plain: bool = False) -> PackDocument:
    """Text runs and [image_start, a*b placeholders, image_end] blocks of grid (1, 2a, 2b).

    Positions come from the model's own rule applied to the whole document; `plain` drops them
    for an all-text document (a text document inside a VL stream).
    """
    tokens: list[int] = []
    modality: list[int] = []
    images: list[PackImage] = []
    atomic: list[tuple[int, int]] = []
    for kind, value in segments:
        if kind == "text":
            tokens += [TEXT_BASE + len(tokens) + i for i in range(value)]
            modality += [0] * value
            continue
        a, b = value
        start, k = len(tokens), a * b
        tokens += [IMAGE_START, *[IMAGE] * k, IMAGE_END]
        modality += [0, *[1] * k, 0]
        number = doc_id * IMAGES_PER_DOC + len(images)
        patches = np.zeros((4 * k, PATCH_DIM), dtype=np.uint8)
        patches[:, 0], patches[:, 1], patches[:, 2] = number % 256, number // 256, np.arange(4 * k) % 256
        images.append(PackImage(patches, (1, 2 * a, 2 * b), (start + 1, start + 1 + k)))
        atomic.append((start, start + k + 2))
    ids = np.array(tokens, dtype=np.int32)
    if plain and not images:
        return PackDocument(doc_id, ids)
    grids = torch.tensor([img.grid_thw for img in images], dtype=torch.long).reshape(-1, 3)
    positions = vl_position_ids(torch.from_numpy(ids).long()[None], CONFIG, grids)[:, 0].numpy().astype(np.int32)
    return PackDocument(doc_id, ids, positions, np.array(modality, dtype=np.int8), images, atomic)


def image_number(patches: np.ndarray) -> int:
    return int(patches[0, 0]) + 256 * int(patches[0, 1])


segment_st = st.one_of(
    st.tuples(st.just("text"), st.integers(1, 12)),
    st.tuples(st.just("image"), st.tuples(st.integers(1, 3), st.integers(1, 3))),
)
vl_documents_st = st.lists(st.tuples(st.lists(segment_st, min_size=1, max_size=12), st.booleans()), max_size=10)


# ---------------------------------------------------------------------- the row checker
def runs(document_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """(doc_id, start, end) of each run of one document id in a row, padding left out."""
    starts = np.flatnonzero(np.r_[True, document_ids[1:] != document_ids[:-1]])
    ends = np.r_[starts[1:], len(document_ids)]
    return [(int(document_ids[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True) if document_ids[s] != -1]


def row_images(row: dict, images: dict[int, tuple[PackDocument, PackImage]]) -> dict[int, PackImage]:
    """{row offset of a placeholder run: its image}, pairing runs, grids and patches in row order."""
    placeholder_runs = runs(np.where(row["modality_ids"] == 1, row["document_ids"], -1))
    grids, pixels = row["image_grid_thw"], row["pixel_values"]
    assert grids.shape == (len(placeholder_runs), 3) and grids.dtype == np.int32
    assert pixels.shape == (int(grids.prod(axis=1).sum()), PATCH_DIM) and pixels.dtype == np.uint8
    found, at = {}, 0
    for (doc_id, start, end), grid in zip(placeholder_runs, grids.tolist(), strict=True):
        patches = pixels[at : at + math.prod(grid)]
        doc, image = images[image_number(patches)]
        assert doc.doc_id == doc_id and tuple(grid) == image.grid_thw
        np.testing.assert_array_equal(patches, image.patches)
        assert end - start == image.span[1] - image.span[0]
        found[start] = image
        at += math.prod(grid)
    return found


def piece_offset(ids: np.ndarray, start: int, end: int, images_at: dict[int, PackImage]) -> int:
    """Where the piece at row [start, end) begins in its document."""
    text = np.flatnonzero(ids[start:end] >= TEXT_BASE)
    if len(text):
        return int(ids[start + text[0]]) - TEXT_BASE - int(text[0])
    first = min(at for at in images_at if start <= at < end)  # a piece of image blocks only
    return images_at[first].span[0] - (first - start)


def check_rows(rows: list[dict], documents: list[PackDocument], seq_len: int, vl: bool) -> None:
    """Every property a packed stream must have; raises on the first violation."""
    by_id = {doc.doc_id: doc for doc in documents}
    images = {doc.doc_id * IMAGES_PER_DOC + i: (doc, img) for doc in documents for i, img in enumerate(doc.images)}
    pieces: dict[int, list[tuple[int, int]]] = defaultdict(list)
    images_seen = 0
    for row in rows:
        ids, labels, doc_ids, positions = row["input_ids"], row["labels"], row["document_ids"], row["position_ids"]
        assert ids.shape == labels.shape == doc_ids.shape == row["modality_ids"].shape == (seq_len,)
        assert positions.shape == ((3, seq_len) if vl else (seq_len,)) and positions.dtype == np.int32
        real = doc_ids != -1
        assert real[0] and not (~real[:-1] & real[1:]).any()  # no empty row; padding only at the tail
        assert (ids[~real] == 0).all() and (labels[~real] == IGNORE_INDEX).all()
        row_runs = runs(doc_ids)
        assert len({doc_id for doc_id, _, _ in row_runs}) == len(row_runs)  # masking keeps every piece apart
        docs_t = torch.from_numpy(doc_ids).long()[None]
        if vl:
            grids = torch.from_numpy(row["image_grid_thw"]).long()
            expected = vl_position_ids(torch.from_numpy(ids).long()[None], CONFIG, grids, document_ids_BS=docs_t)[:, 0]
            images_at = row_images(row, images)
            images_seen += len(images_at)
        else:
            expected, images_at = document_positions(docs_t)[0], {}
            assert "pixel_values" not in row
        np.testing.assert_array_equal(positions, expected.numpy())
        for doc_id, start, end in row_runs:
            doc = by_id[doc_id]
            offset = piece_offset(ids, start, end, images_at)
            assert 0 <= offset and offset + end - start <= len(doc.tokens)
            np.testing.assert_array_equal(ids[start:end], doc.tokens[offset : offset + end - start])
            modality = np.zeros(end - start, np.int8) if doc.modality is None else doc.modality[offset:][: end - start]
            np.testing.assert_array_equal(row["modality_ids"][start:end], modality)
            want = np.where(modality == 1, IGNORE_INDEX, ids[start:end])
            want[0] = IGNORE_INDEX
            np.testing.assert_array_equal(labels[start:end], want)
            for at, image in images_at.items():
                if start <= at < end:
                    assert image.span[0] == offset + at - start  # the image sits on its own placeholders
            pieces[doc_id].append((offset, offset + end - start))
    assert sorted(pieces) == sorted(by_id)
    for doc_id, spans in pieces.items():
        check_pieces(by_id[doc_id], sorted(spans), seq_len)
    assert images_seen == len(images)


def check_pieces(doc: PackDocument, spans: list[tuple[int, int]], seq_len: int) -> None:
    """Pieces tile the document in order, cut only outside atomic ranges, none longer than a row.

    (Cuts are not always the latest allowed one: gap filling cuts a piece to fit a row's room.)"""
    starts = [s for s, _ in spans]
    ends = [e for _, e in spans]
    assert starts == [0, *ends[:-1]] and ends[-1] == len(doc.tokens)
    inside = np.zeros(len(doc.tokens) + 1, dtype=bool)
    for s, e in doc.atomic:
        inside[s + 1 : e] = True
    for start, end in spans:
        assert end - start <= seq_len
        assert not inside[start] and not inside[end]


# ---------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(
    seq_len=st.integers(2, 64),
    lengths=st.lists(st.integers(1, 200), max_size=40),
    window_rows=st.integers(1, 8),
)
def test_text_rows_keep_every_token_and_isolate_documents(seq_len, lengths, window_rows):
    documents = [text_document(3 * i + 1, n) for i, n in enumerate(lengths)]
    windows = list(pack_windows(documents, seq_len, window_tokens=window_rows * seq_len))
    rows = [row for w in windows for row in w.rows]
    check_rows(rows, documents, seq_len, vl=False)
    for window in windows:  # any-fit: a row half empty would have taken the next row's first piece
        fill = [int((r["document_ids"] != -1).sum()) for r in window.rows]
        assert sum(2 * f <= seq_len for f in fill) <= 1
        assert len(window.rows) <= 2 * sum(fill) / seq_len + 1


@settings(max_examples=80, deadline=None)
@given(data=st.data(), seq_len=st.integers(2, 40), window_rows=st.integers(1, 4))
def test_text_atomic_ranges_are_never_cut(data, seq_len, window_rows):
    documents = data.draw(atomic_text_documents(seq_len))
    check_rows(list(pack_best_fit(documents, seq_len, window_tokens=window_rows * seq_len)), documents, seq_len, False)


@settings(max_examples=60, deadline=None)
@given(seq_len=st.integers(12, 48), specs=vl_documents_st, window_rows=st.integers(1, 6))
def test_vl_rows_keep_images_with_placeholders_and_positions_match_the_model(seq_len, specs, window_rows):
    documents = [vl_document(2 * i + 5, segments, plain) for i, (segments, plain) in enumerate(specs)]
    rows = list(pack_best_fit(documents, seq_len, window_tokens=window_rows * seq_len, vl=True, patch_dim=PATCH_DIM))
    check_rows(rows, documents, seq_len, vl=True)


@settings(max_examples=40, deadline=None)
@given(seq_len=st.integers(12, 48), specs=vl_documents_st)
def test_greedy_baseline_rows_have_the_same_format_and_guarantees(seq_len, specs):
    documents = [vl_document(i, segments, plain) for i, (segments, plain) in enumerate(specs)]
    check_rows(list(pack_greedy(documents, seq_len, vl=True, patch_dim=PATCH_DIM)), documents, seq_len, vl=True)


@settings(max_examples=40, deadline=None)
@given(seq_len=st.integers(2, 48), lengths=st.lists(st.integers(1, 150), max_size=30), window_rows=st.integers(1, 5))
def test_windows_are_stream_slices_and_packing_resumes_at_any_boundary(seq_len, lengths, window_rows):
    documents = [text_document(i, n) for i, n in enumerate(lengths)]
    window_tokens = window_rows * seq_len
    windows = list(pack_windows(documents, seq_len, window_tokens=window_tokens))
    consumed = 0
    for k, window in enumerate(windows):
        taken = lengths[consumed : window.documents_consumed]
        assert taken and (sum(taken) >= window_tokens or window.documents_consumed == len(lengths))
        assert sum(taken[:-1]) < window_tokens  # the window closes on the document that fills it
        in_rows = {int(d) for r in window.rows for d in np.unique(r["document_ids"]) if d != -1}
        assert in_rows == set(range(consumed, window.documents_consumed))
        resumed = list(pack_windows(documents[consumed:], seq_len, window_tokens=window_tokens))
        assert len(resumed) == len(windows) - k
        assert_same_rows(resumed[0].rows, window.rows)
        consumed = window.documents_consumed
    assert consumed == len(lengths)


def assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype
            np.testing.assert_array_equal(x[key], y[key])


@settings(max_examples=20, deadline=None)
@given(seq_len=st.integers(12, 48), specs=vl_documents_st)
def test_same_input_gives_identical_rows(seq_len, specs):
    first = [vl_document(i, segments, plain) for i, (segments, plain) in enumerate(specs)]
    again = [vl_document(i, segments, plain) for i, (segments, plain) in enumerate(specs)]
    options = {"window_tokens": 2 * seq_len, "vl": True, "patch_dim": PATCH_DIM}
    assert_same_rows(list(pack_best_fit(first, seq_len, **options)), list(pack_best_fit(again, seq_len, **options)))


def test_best_fit_reaches_99_percent_on_a_lognormal_mix_and_beats_greedy():
    seq_len = 512
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 4), 1.0, 8000).astype(int), 20, 3 * seq_len)
    documents = [PackDocument(i, np.full(n, 7, dtype=np.int32)) for i, n in enumerate(lengths)]
    windows = list(pack_windows(documents, seq_len))
    rows = [row for w in windows for row in w.rows]
    greedy = list(pack_greedy(documents, seq_len))
    assert sum(int((r["document_ids"] != -1).sum()) for r in rows) == lengths.sum()
    assert len(rows) <= math.ceil(lengths.sum() / seq_len) + 2 * len(windows)
    assert packing_efficiency(rows) >= 0.99
    assert packing_efficiency(greedy) < packing_efficiency(rows) - 0.1


def test_gap_filling_reaches_99_percent_on_short_rows_of_short_documents():
    """seq_len 128 with documents of 40..384 tokens: whole-piece best fit leaves gaps below the
    shortest document (~98.6%); cutting pieces into gaps of >= FILL_MIN_TOKENS closes them."""
    seq_len = 128
    lengths = np.random.default_rng(1).integers(40, 3 * seq_len, 3000)
    documents = [PackDocument(i, np.full(n, 7, dtype=np.int32)) for i, n in enumerate(lengths)]
    filled = list(pack_best_fit(documents, seq_len))
    unfilled = [build_row(r, RowFormat(seq_len)) for r in _rows_without_filling(documents, seq_len)]
    assert sum(int((r["document_ids"] != -1).sum()) for r in filled) == lengths.sum()
    assert packing_efficiency(filled) >= 0.99 > packing_efficiency(unfilled)


def _rows_without_filling(documents, seq_len):
    fmt = RowFormat(seq_len)
    pieces = [piece for doc in documents for piece in split_document(doc, fmt)]
    return best_fit_rows(pieces, seq_len, cuts_of=None)


def test_best_fit_puts_each_piece_into_the_tightest_row():
    documents = [text_document(i, n) for i, n in enumerate([8, 6, 3, 1])]
    rows = list(pack_best_fit(documents, 10))
    layout = [[doc_id for doc_id, _, _ in runs(r["document_ids"])] for r in rows]
    assert layout == [[0], [1, 2, 3]]  # the 1-token document takes the row with 1 free slot (first-fit: 2)


def test_a_long_document_is_cut_at_the_latest_allowed_position():
    doc = vl_document(4, [("text", 5), ("image", (2, 2)), ("text", 9)])  # block of 6 tokens at [5, 11)
    spans = [(p.start, p.end) for p in split_document(doc, RowFormat(8, vl=True, patch_dim=PATCH_DIM))]
    assert spans == [(0, 5), (5, 13), (13, 20)]  # 6..10 are inside the block


def test_pieces_of_one_document_never_share_a_row():
    # pieces (0, 2), (2, 12), (12, 22), (22, 24): the two 2-token ends would fit one row together
    doc = vl_document(1, [("text", 2), ("image", (1, 7)), ("text", 2), ("image", (1, 7)), ("text", 2)])
    spans = [(p.start, p.end) for p in split_document(doc, RowFormat(10, vl=True, patch_dim=PATCH_DIM))]
    assert spans == [(0, 2), (2, 12), (12, 22), (22, 24)]
    rows = list(pack_best_fit([doc, text_document(2, 3)], 10, vl=True, patch_dim=PATCH_DIM))
    check_rows(rows, [doc, text_document(2, 3)], 10, vl=True)
    assert len(rows) == 4


def test_a_window_closes_on_the_document_that_reaches_window_tokens():
    documents = [text_document(i, 4) for i in range(5)]
    windows = list(pack_windows(documents, 8, window_tokens=8))
    assert [w.documents_consumed for w in windows] == [2, 4, 5]


# ---------------------------------------------------------------------- bad input
def test_no_documents_give_no_rows():
    assert list(pack_best_fit([], 16)) == [] and list(pack_windows(iter([]), 16)) == []
    assert list(pack_greedy([], 16)) == [] and list(pack_documents([], 16)) == []
    assert packing_efficiency([]) == 0.0


@pytest.mark.parametrize(
    ("document", "options", "message"),
    [
        (PackDocument(7, np.zeros(0, np.int32)), {}, "document 7: tokens must be a non-empty"),
        (
            vl_document(9, [("text", 2), ("image", (3, 3)), ("text", 2)]),
            {"vl": True},
            r"document 9: atomic range \[2, 13\)",
        ),
        (vl_document(3, [("image", (1, 1))]), {}, "document 3 has images or 3D positions; pack it with vl=True"),
        (PackDocument(-2, np.ones(3, np.int32)), {}, "document -2: doc_id must be >= 0"),
    ],
)
def test_bad_documents_are_refused_by_name(document, options, message):
    options = {**options, "patch_dim": PATCH_DIM} if options.get("vl") else options
    for packer in (pack_best_fit, pack_greedy):
        with pytest.raises(ValueError, match=message):
            list(packer([document], 10, **options))


def test_image_patches_of_the_wrong_shape_are_refused():
    doc = vl_document(5, [("text", 2), ("image", (1, 1))])
    with pytest.raises(ValueError, match=r"document 5: image 0 patches are uint8 \(4, 4\), expected uint8 \(4, 6\)"):
        list(pack_best_fit([doc], 16, vl=True, patch_dim=6))


def test_a_repeated_doc_id_in_one_window_is_refused():
    with pytest.raises(ValueError, match="document 1 appears twice"):
        list(pack_best_fit([text_document(1, 3), text_document(1, 4)], 16))


def test_vl_packing_needs_a_patch_dim():
    with pytest.raises(ValueError, match="patch_dim"):
        list(pack_best_fit([text_document(1, 3)], 16, vl=True))


def test_legacy_token_lists_pack_into_text_rows():
    rows = list(pack_documents([[1, 5, 2], [1, 6, 6, 2]], 8, [10, 20], pad_id=0))
    assert len(rows) == 1 and set(rows[0]) == {"input_ids", "labels", "document_ids", "position_ids", "modality_ids"}
    assert rows[0]["document_ids"].tolist() == [20, 20, 20, 20, 10, 10, 10, -1]
    assert rows[0]["labels"].tolist() == [-100, 6, 6, 2, -100, 5, 2, -100]


# ---------------------------------------------------------------------- token balance
def test_balanced_groups_stay_in_the_documented_band_on_a_mixed_corpus():
    rng = np.random.default_rng(1)
    seq_len, group_rows, n = 1024, 8, 8 * 50
    kind = rng.choice(3, n, p=[0.5, 0.3, 0.2])  # text-only rows, mixed rows, image-heavy rows
    vision = np.select([kind == 0, kind == 1], [0, rng.integers(50, 400, n)], rng.integers(600, 950, n))
    text = seq_len - vision
    order = balance_order(vision, text, group_rows, seed=3)
    fractions = group_vision_fractions(order, vision, text, group_rows)
    overall = vision.sum() / (vision + text).sum()
    band = np.ptp(vision / seq_len) / group_rows
    assert sorted(order.tolist()) == list(range(n)) and len(fractions) == n // group_rows
    assert np.abs(fractions - overall).max() <= band
    shuffled = group_vision_fractions(rng.permutation(n), vision, text, group_rows)
    assert np.abs(fractions - overall).max() < np.abs(shuffled - overall).max() / 3


@pytest.mark.parametrize("group_rows", [2, 4, 8])
def test_snake_dealing_gives_equal_groups_on_evenly_spread_fractions(group_rows):
    vision = np.arange(group_rows * 16)  # rows of equal size, fractions evenly spaced
    text = vision.max() - vision
    fractions = group_vision_fractions(balance_order(vision, text, group_rows, 0), vision, text, group_rows)
    np.testing.assert_allclose(fractions, 0.5)


@settings(max_examples=100, deadline=None)
@given(
    vision=st.lists(st.integers(0, 64), min_size=0, max_size=60),
    group_rows=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_full_group_is_within_range_over_group_rows_of_the_mean(vision, group_rows, seed):
    vision = np.array(vision, dtype=np.int64)
    text = 64 - vision  # equal rows: a group's token fraction is its mean row fraction
    order = balance_order(vision, text, group_rows, seed)
    assert sorted(order.tolist()) == list(range(len(vision)))
    full = len(vision) // group_rows * group_rows
    if full == 0:
        return
    kept = order[:full]  # the partial group (taken from the middle of the sorted rows) comes last
    fractions = group_vision_fractions(np.arange(full), vision[kept], text[kept], group_rows)
    band = (vision.max() - vision.min()) / 64 / group_rows
    assert np.abs(fractions - vision[kept].sum() / (64 * full)).max() <= band + 1e-12
    np.testing.assert_array_equal(order, balance_order(vision, text, group_rows, seed))
