"""Raw documents -> token ids, image patches and 3D positions (runs in Ray Data tasks).

A document's tokens are bos, then per segment its text tokens or an image block
[image_start, k x image placeholder, image_end], then eos. An image block is atomic (the
packer never cuts it) and its placeholders carry modality 1 and the (t, h, w) grid positions
of `ernie.positions` (offset by the running text position); the start/end markers count as
text for positions, as in the model. Text-model runs keep 1D positions and refuse images.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ernie.config import ErnieConfig, VisionConfig
from stages.imaging import ImageError, decode_image, image_to_patches

from .fast_bpe import Encoder, fast_encoder
from .packing import PackDocument, PackImage
from .sources import RawRecord, fetch_image
from .tokenizer import BOS_ID, EOS_ID
from .wire import document_from_bytes, document_to_bytes


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a Ray Data task needs to encode documents (picklable, shipped once per task)."""

    tokenizer_json: str
    vision: VisionConfig | None
    image_token_id: int
    image_start_token_id: int
    image_end_token_id: int
    min_pixels: int
    max_pixels: int
    val_fraction: float

    @staticmethod
    def build(tokenizer_json: str, model: ErnieConfig | None, min_pixels: int, max_pixels: int, val_fraction: float):
        vision = model.vision if model is not None else None
        ids = (model.image_token_id, model.image_start_token_id, model.image_end_token_id) if vision else (-1, -1, -1)
        return EncodeSpec(tokenizer_json, vision, *ids, min_pixels, max_pixels, val_fraction)


_ENCODERS: dict[str, Encoder] = {}


def _encoder(spec: EncodeSpec) -> Encoder:
    """tiktoken for the bundled BPE (same ids, ~3x faster), HF tokenizers for any other; one per task process."""
    # One encode task per CPU already: the tokenizer's own thread pool would only oversubscribe the cores.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    digest = hashlib.sha256(spec.tokenizer_json.encode()).hexdigest()
    if digest not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[digest] = fast_encoder(spec.tokenizer_json) or _hf_encoder(spec.tokenizer_json)
    return _ENCODERS[digest]


def _hf_encoder(tokenizer_json: str) -> Encoder:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    return lambda texts: [
        np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ]


def split_point(segments: list) -> float:
    """A stable number in [0, 1) from the content; below `val_fraction` means validation."""
    digest = hashlib.sha256(pickle.dumps(segments, protocol=4)).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


COLUMNS = ("source", "key", "split", "error_kind", "error", "tokens", "vision_tokens")


def encode_batch(batch: dict, spec: EncodeSpec):
    """Ray Data `map_batches` function: raw-record rows in, encoded-document rows out."""
    return encode_records([RawRecord.from_row({k: batch[k][i] for k in batch}) for i in range(len(batch["key"]))], spec)


def encode_records(records: list[RawRecord], spec: EncodeSpec):
    """Encoded documents of `records` as an Arrow table (errors become error rows).

    A text-only document travels as its token ids in the `ids` list column, which the stage's
    process reads as numpy views without a copy; a document with images (patches, 3D positions)
    is serialised into `doc` (`wire`, no pickle).
    """
    import pyarrow as pa

    texts = [text for r in records if r.segments for kind, text in r.segments if kind == "text"]
    encoded = iter(_encoder(spec)(texts)) if texts else iter(())
    out: dict[str, list] = {k: [] for k in (*COLUMNS, "doc")}
    ids: list[np.ndarray] = []
    for record in records:
        text_ids = [next(encoded) for kind, _ in (record.segments or []) if kind == "text"]
        doc, error_kind, error = None, record.error_kind, record.error
        if record.segments is not None:
            try:
                doc = _document(record, text_ids, spec)
            except ImageError as failure:
                error_kind, error = "bad_image", str(failure)
            except FileNotFoundError as failure:
                error_kind, error = "missing_file", f"image not found: {failure.filename or failure}"
            except OSError as failure:
                error_kind, error = "missing_file", f"image unreadable: {failure}"
            except ValueError as failure:
                error_kind, error = "bad_record", str(failure)
        text_only = doc is not None and doc.modality is None and not doc.images
        out["source"].append(record.source)
        out["key"].append(record.key)
        out["error_kind"].append(error_kind if doc is None else "")
        out["error"].append(error if doc is None else "")
        out["split"].append(
            "" if doc is None else ("val" if split_point(record.segments) < spec.val_fraction else "train")
        )
        out["doc"].append(document_to_bytes(doc) if doc is not None and not text_only else b"")
        ids.append(doc.tokens if text_only else _NO_IDS)
        out["tokens"].append(len(doc.tokens) if doc is not None else 0)
        out["vision_tokens"].append(int(doc.modality.sum()) if doc is not None and doc.modality is not None else 0)
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int64())
    values = pa.array(np.concatenate([_NO_IDS, *ids]), type=pa.int32())
    table = pa.table({name: out[name] for name in COLUMNS} | {"doc": pa.array(out["doc"], type=pa.binary())})
    return table.append_column("ids", pa.LargeListArray.from_arrays(offsets, values))


def table_documents(table) -> Iterator[tuple[int, tuple[str, PackDocument]]]:
    """(tokens, (split, document)) of each encoded row of `table` (Arrow), error rows skipped."""
    splits, docs, sources = (table.column(name).to_pylist() for name in ("split", "doc", "source"))
    tokens = table.column("tokens").to_numpy()
    ids_column = table.column("ids")
    chunks = ids_column.chunks if hasattr(ids_column, "chunks") else [ids_column]
    row = 0
    for chunk in chunks:
        offsets, values = chunk.offsets.to_numpy(), chunk.values.to_numpy()
        for i in range(len(chunk)):
            split, blob = splits[row], docs[row]
            if blob:
                yield int(tokens[row]), (split, document_from_bytes(blob))
            elif split:
                doc = PackDocument(doc_id=0, tokens=values[offsets[i] : offsets[i + 1]], source=sources[row])
                yield int(tokens[row]), (split, doc)
            row += 1


_NO_IDS = np.zeros(0, np.int32)
_BOS, _EOS = np.array([BOS_ID], np.int32), np.array([EOS_ID], np.int32)


def _document(record: RawRecord, text_ids: list[np.ndarray], spec: EncodeSpec) -> PackDocument:
    if spec.vision is None and len(text_ids) == len(record.segments):  # text model, text only: the common case
        return PackDocument(doc_id=0, tokens=np.concatenate([_BOS, *text_ids, _EOS]), source=record.source)
    tokens: list[np.ndarray] = [np.array([BOS_ID], np.int32)]
    positions: list[np.ndarray] = []
    modality: list[np.ndarray] = [np.zeros(1, np.int8)]
    images: list[PackImage] = []
    atomic: list[tuple[int, int]] = []
    length, pos = 1, 1  # tokens so far; next text position
    positions.append(np.zeros((3, 1), np.int32))
    texts = iter(text_ids)
    for kind, value in record.segments:
        if kind == "text":
            ids = next(texts)
            tokens.append(ids)
            modality.append(np.zeros(len(ids), np.int8))
            positions.append(np.broadcast_to(np.arange(pos, pos + len(ids), dtype=np.int32), (3, len(ids))))
            length, pos = length + len(ids), pos + len(ids)
            continue
        if spec.vision is None:
            raise ValueError("an image in a text-model run (the model has no vision encoder)")
        data = fetch_image(value) if kind == "image_ref" else value
        name = value if kind == "image_ref" else record.key
        patches, grid = image_to_patches(decode_image(data, name), spec.vision, spec.min_pixels, spec.max_pixels)
        merge = spec.vision.spatial_merge_size
        h, w = grid[1] // merge, grid[2] // merge
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = np.stack([np.zeros(h * w, np.int64), hh.ravel(), ww.ravel()]).astype(np.int32) + pos + 1
        start = length
        tokens.append(
            np.array([spec.image_start_token_id, *[spec.image_token_id] * (h * w), spec.image_end_token_id], np.int32)
        )
        modality.append(np.r_[0, np.ones(h * w, np.int8), 0].astype(np.int8))
        end_position = pos + 1 + max(h, w)
        positions.append(
            np.concatenate([np.full((3, 1), pos, np.int32), block, np.full((3, 1), end_position, np.int32)], 1)
        )
        images.append(PackImage(patches=patches, grid_thw=tuple(grid), span=(start + 1, start + 1 + h * w)))
        atomic.append((start, start + h * w + 2))
        length, pos = length + h * w + 2, end_position + 1
    tokens.append(np.array([EOS_ID], np.int32))
    modality.append(np.zeros(1, np.int8))
    positions.append(np.full((3, 1), pos, np.int32))
    vl = spec.vision is not None
    return PackDocument(
        doc_id=0,
        tokens=np.concatenate(tokens),
        positions=np.concatenate(positions, axis=1) if vl else None,
        modality=np.concatenate(modality) if vl else None,
        images=images,
        atomic=atomic,
        source=record.source,
    )
