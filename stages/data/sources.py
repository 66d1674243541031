"""Sources -> raw documents: file listing (local or s3:// through fsspec) and per-file parsing.

A raw document is a list of segments in reading order, ("text", str), ("image", bytes) or
("image_ref", url): an image that a later, parallel step fetches. Parsing happens inside
Ray Data tasks (`parse_file`), one file at a time, so a bad line or a missing image costs one
record, not the file: each problem becomes an error record naming the file and the line
(or row / tar member) that the stage counts (`on_error=skip`) or reports (`on_error=fail`).
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from dataclasses import dataclass

import fsspec

from pipeline.contract import UserError

from .config import SourceConfig
from .wire import segments_from_bytes, segments_to_bytes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
EXTENSIONS = {
    "jsonl": (".jsonl", ".json"),
    "parquet": (".parquet",),
    "image-text": (".jsonl", ".parquet"),
    "interleaved": (".jsonl", ".json"),
    "webdataset": (".tar",),
}
"""Files a directory source reads, per kind (a glob or a single file is taken as given)."""
ERROR_KINDS = ("bad_utf8", "bad_json", "missing_field", "bad_record", "missing_file", "bad_image", "bad_file")
"""Error record kinds, as counted in stats.json and logged as `errors/<source>/<kind>`."""


@dataclass(frozen=True)
class RawRecord:
    """What a parsing task hands on: the document's segments, or why there is none."""

    source: str
    key: str
    """Where it came from: `file:line N` / `file:row N` / `file:member`; named in errors."""
    segments: list | None = None
    error_kind: str = ""
    error: str = ""

    def to_row(self) -> dict:
        payload = segments_to_bytes(self.segments) if self.segments is not None else b""
        return {
            "source": self.source,
            "key": self.key,
            "payload": payload,
            "error_kind": self.error_kind,
            "error": self.error,
        }

    @staticmethod
    def from_row(row: dict) -> RawRecord:
        segments = segments_from_bytes(row["payload"]) if row["payload"] else None
        return RawRecord(row["source"], row["key"], segments, row["error_kind"], row["error"])


def list_files(source: SourceConfig, index: int) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The source's files, sorted (a fixed order makes the dataset deterministic)."""
    try:
        fs, path = fsspec.core.url_to_fs(source.path)
    except (ValueError, ImportError) as error:
        raise UserError(f"data.sources[{index}].path={source.path!r} cannot be opened: {error}") from error
    if any(ch in path for ch in "*?["):
        files = [f for f in fs.glob(path) if fs.isfile(f)]
    elif fs.isdir(path):  # images may sit next to the records: only files of the kind's extensions are read
        found = [f for f in fs.find(path) if not posixpath.basename(f).startswith(".")]
        files = [f for f in found if f.endswith(EXTENSIONS[source.kind])]
    elif fs.exists(path):
        files = [path]
    else:
        raise UserError(f"data.sources[{index}].path={source.path!r} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return fs, sorted(f if protocol == "file" else f"{protocol}://{f}" for f in files)


def parse_file(source: SourceConfig, url: str, data: bytes) -> list[RawRecord]:
    """All raw records of one file of `source`."""
    name = source.name
    try:
        if source.kind == "webdataset":
            return list(_webdataset_records(name, url, data))
        if url.endswith(".parquet"):
            rows = _parquet_rows(data)
            return [_record(source, url, f"{url}:row {i}", row) for i, row in enumerate(rows)]
        return list(_jsonl_records(source, url, data))
    except Exception as error:  # an unreadable file is one error record
        return [RawRecord(name, url, error_kind="bad_file", error=f"{type(error).__name__}: {error}")]


def _jsonl_records(source: SourceConfig, url: str, data: bytes):
    offset = 0
    for number, line in enumerate(data.split(b"\n"), start=1):
        key = f"{url}:line {number}"
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield RawRecord(
                source.name, key, error_kind="bad_utf8", error=f"invalid UTF-8 at byte {start + error.start}"
            )
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            yield RawRecord(source.name, key, error_kind="bad_json", error=f"invalid JSON: {error.msg}")
            continue
        except RecursionError:  # nesting deeper than the parser's stack: one bad line, not a bad file
            yield RawRecord(source.name, key, error_kind="bad_json", error="invalid JSON: nested too deeply")
            continue
        yield _record(source, url, key, record)


def _parquet_rows(data: bytes) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


def _record(source: SourceConfig, url: str, key: str, record) -> RawRecord:
    name = source.name
    if not isinstance(record, dict):
        return RawRecord(name, key, error_kind="bad_record", error=f"expected an object, got {type(record).__name__}")
    if source.kind == "interleaved":
        return _interleaved(name, url, key, record.get("segments"))
    text = record.get(source.text_field)
    if not isinstance(text, str) or not text:
        return RawRecord(name, key, error_kind="missing_field", error=f"no text in field {source.text_field!r}")
    if source.kind != "image-text":
        return RawRecord(name, key, [("text", text)])
    image = record.get(source.image_field)
    if isinstance(image, bytes | bytearray):
        return RawRecord(name, key, [("image", bytes(image)), ("text", text)])
    if isinstance(image, str) and image:
        return RawRecord(name, key, [("image_ref", _resolve(url, image)), ("text", text)])
    return RawRecord(name, key, error_kind="missing_field", error=f"no image in field {source.image_field!r}")


def _interleaved(name: str, url: str, key: str, segments) -> RawRecord:
    if not isinstance(segments, list) or not segments:
        return RawRecord(name, key, error_kind="missing_field", error="no `segments` list")
    out = []
    for i, segment in enumerate(segments):
        kind = segment.get("type") if isinstance(segment, dict) else None
        if kind == "text" and isinstance(segment.get("text"), str):
            out.append(("text", segment["text"]))
        elif kind == "image" and isinstance(segment.get("image"), str):
            out.append(("image_ref", _resolve(url, segment["image"])))
        else:
            return RawRecord(name, key, error_kind="bad_record", error=f"segment {i} is not a text or image segment")
    return RawRecord(name, key, out)


def _resolve(index_url: str, ref: str) -> str:
    """An image path relative to the file that names it (absolute paths and URLs stay)."""
    if "://" in ref or ref.startswith("/"):
        return ref
    base = index_url.rsplit("/", 1)[0]
    return f"{base}/{ref}"


def _webdataset_records(name: str, url: str, data: bytes):
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = posixpath.basename(member.name).partition(".")
            sample_key = posixpath.join(posixpath.dirname(member.name), stem)
            samples.setdefault(sample_key, {})[ext.lower()] = tar.extractfile(member).read()
    for sample_key, members in samples.items():
        key = f"{url}:{sample_key}"
        if "txt" not in members:
            yield RawRecord(name, key, error_kind="missing_field", error="sample has no txt member")
            continue
        try:
            text = members["txt"].decode("utf-8")
        except UnicodeDecodeError as error:
            yield RawRecord(name, key, error_kind="bad_utf8", error=f"invalid UTF-8 at byte {error.start} of txt")
            continue
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        yield RawRecord(name, key, ([("image", image)] if image is not None else []) + [("text", text)])


def fetch_image(url: str) -> bytes:
    """An image named by a record (runs inside a Ray Data task, so on any node of the cluster)."""
    with fsspec.open(url, "rb") as f:
        return f.read()
