"""Raw segments, encoded documents and the packer's resume carry as bytes, without pickle.

These bytes cross Ray Data tasks and, for the carry, sit on disk between attempts of a stage;
unpickling them would run whatever code a tampered file names. A blob is instead

    MAGIC | u32 header length | header (JSON) | array data

where the header holds the plain values (`meta`) and, per numeric array, its dtype and shape;
arrays follow back to back in header order. Decoding builds only JSON values and numeric
arrays; anything else (object dtypes, short data, a bad header) is a `WireError`.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from .packing import PackDocument, PackImage

MAGIC = b"EPW1"
_LENGTH = struct.Struct("<I")
NUMERIC_KINDS = "biuf"
"""bool, signed, unsigned, float: the only array dtypes a blob may hold."""


class WireError(ValueError):
    """Bytes that are not a blob of this format; the message says what is wrong."""


def dumps(meta: Any, arrays: list[np.ndarray]) -> bytes:
    """`meta` (JSON values; arrays referred to by their index in `arrays`) and the arrays, as one blob."""
    arrays = [np.ascontiguousarray(a) for a in arrays]
    for array in arrays:
        if array.dtype.kind not in NUMERIC_KINDS:
            raise WireError(f"cannot write an array of dtype {array.dtype}")
    header = {"meta": meta, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return b"".join([MAGIC, _LENGTH.pack(len(text)), text, *(a.tobytes() for a in arrays)])


def loads(blob: bytes) -> tuple[Any, list[np.ndarray]]:
    """(meta, arrays) of a blob written by `dumps`; the arrays are writable copies."""
    blob = bytes(blob)
    start = len(MAGIC) + _LENGTH.size
    if len(blob) < start or not blob.startswith(MAGIC):
        raise WireError(f"not a {MAGIC.decode()} blob ({len(blob)} bytes)")
    (length,) = _LENGTH.unpack_from(blob, len(MAGIC))
    try:
        header = json.loads(blob[start : start + length].decode("utf-8", "surrogatepass"))
        meta, specs = header["meta"], header["arrays"]
        shapes = [(np.dtype(dtype), tuple(int(n) for n in shape)) for dtype, shape in specs]
    except (ValueError, KeyError, TypeError, OverflowError) as err:
        raise WireError(f"bad blob header ({type(err).__name__}: {err})") from None
    data = bytearray(blob[start + length :])  # one writable copy the arrays view
    arrays, offset = [], 0
    for dtype, shape in shapes:
        if dtype.kind not in NUMERIC_KINDS or dtype.hasobject or any(n < 0 for n in shape):
            raise WireError(f"bad array in blob header: dtype {dtype}, shape {shape}")
        size = dtype.itemsize * math.prod(shape)
        if offset + size > len(data):
            raise WireError(f"blob is truncated: {len(data)} bytes of array data, its header needs more")
        try:
            arrays.append(np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=offset).reshape(shape))
        except ValueError as err:  # e.g. an empty array whose other sides numpy cannot address
            raise WireError(f"bad array in blob header: dtype {dtype}, shape {shape} ({err})") from None
        offset += size
    return meta, arrays


# ---------------------------------------------------------------------- raw segments
def segments_to_bytes(segments: list) -> bytes:
    """("text", str) / ("image_ref", str) / ("image", bytes) segments as a blob."""
    meta, arrays = [], []
    for kind, value in segments:
        if isinstance(value, bytes | bytearray):
            meta.append([kind, len(arrays)])
            arrays.append(np.frombuffer(bytes(value), np.uint8))
        else:
            meta.append([kind, str(value)])
    return dumps(meta, arrays)


def segments_from_bytes(blob: bytes) -> list[tuple[str, str | bytes]]:
    meta, arrays = loads(blob)
    try:
        return [(str(kind), arrays[value].tobytes() if isinstance(value, int) else str(value)) for kind, value in meta]
    except (TypeError, ValueError, IndexError, OverflowError) as err:
        raise WireError(f"bad segments in blob ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------- documents and carry
def _document_meta(doc: PackDocument, arrays: list[np.ndarray]) -> dict:
    def put(array: np.ndarray | None) -> int | None:
        if array is None:
            return None
        arrays.append(array)
        return len(arrays) - 1

    return {
        "doc_id": int(doc.doc_id),
        "tokens": put(doc.tokens),
        "positions": put(doc.positions),
        "modality": put(doc.modality),
        "images": [
            {"patches": put(i.patches), "grid_thw": [int(n) for n in i.grid_thw], "span": [int(n) for n in i.span]}
            for i in doc.images
        ],
        "atomic": [[int(a), int(b)] for a, b in doc.atomic],
        "source": doc.source,
    }


def _document(meta: dict, arrays: list[np.ndarray]) -> PackDocument:
    def get(index: int | None) -> np.ndarray | None:
        return None if index is None else arrays[index]

    try:
        images = [PackImage(get(i["patches"]), tuple(i["grid_thw"]), tuple(i["span"])) for i in meta["images"]]
        return PackDocument(
            doc_id=int(meta["doc_id"]),
            tokens=get(meta["tokens"]),
            positions=get(meta["positions"]),
            modality=get(meta["modality"]),
            images=images,
            atomic=[(int(a), int(b)) for a, b in meta["atomic"]],
            source=str(meta["source"]),
        )
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as err:
        raise WireError(f"bad document in blob ({type(err).__name__}: {err})") from None


def document_to_bytes(doc: PackDocument) -> bytes:
    arrays: list[np.ndarray] = []
    meta = _document_meta(doc, arrays)
    return dumps(meta, arrays)


def document_from_bytes(blob: bytes) -> PackDocument:
    meta, arrays = loads(blob)
    return _document(meta, arrays)


def carry_to_bytes(carry: dict[str, dict[str, list]]) -> bytes:
    """The packer's carry: {"rows": {split: [row]}, "pending": {split: [PackDocument]}}."""
    arrays: list[np.ndarray] = []

    def put(array: np.ndarray) -> int:
        arrays.append(array)
        return len(arrays) - 1

    meta = {
        "rows": {split: [{k: put(v) for k, v in row.items()} for row in rows] for split, rows in carry["rows"].items()},
        "pending": {split: [_document_meta(doc, arrays) for doc in docs] for split, docs in carry["pending"].items()},
    }
    return dumps(meta, arrays)


def carry_from_bytes(blob: bytes) -> dict[str, dict[str, list]]:
    meta, arrays = loads(blob)
    try:
        rows = {split: [{k: arrays[i] for k, i in row.items()} for row in rs] for split, rs in meta["rows"].items()}
        pending = {split: [_document(d, arrays) for d in docs] for split, docs in meta["pending"].items()}
    except (KeyError, TypeError, AttributeError, IndexError, OverflowError) as err:
        raise WireError(f"bad carry blob ({type(err).__name__}: {err})") from None
    return {"rows": rows, "pending": pending}
