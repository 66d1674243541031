"""The dataset's packed-row shards: schema, atomic writing (local or s3://), reading, and streaming.

A packed row holds `seq_len` tokens from one or more documents (ROW_FIELDS):
    input_ids [S] int32, labels [S] int32 (-100 = no loss), document_ids [S] int32 (-1 = padding),
    position_ids [S] int32 (restart per document; [3, S] (t, h, w) in image splits),
    modality_ids [S] int8 (0 text, 1 image, 2 video)
Rows of an image (VL) split add IMAGE_FIELDS, whose first dimension varies per row:
    pixel_values [P, D] uint8 (the row's image patches), image_grid_thw [n, 3] int32 (one line per
    image; P = sum of t * h * w)
A shard member is `KEY.FIELD.npy` (numpy .npy, no pickle); members follow the schema's field order
and carry no time or owner, so the same rows always give the same bytes. A split directory holds
`shard-NNNNN.tar` files and `index.json` (written last; see write_index).

Split directories are local paths or fsspec URLs (s3://bucket/...); `storage_options` go to fsspec.
Only numpy and fsspec here (and s3fs behind fsspec for s3://): GPU machines without Ray, MLflow or
Hydra import this module.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import io
import itertools
import json
import os
import posixpath
import random
import secrets
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from .contract import PathEscape, check_relative, contained

SHARD_SCHEMA_VERSION = 2
"""Version 1: shards only, text fields. Version 2: index.json, image fields."""
INDEX_FILE = "index.json"
PADDING_DOCUMENT_ID = -1
ROW_FIELDS = {
    "input_ids": np.int32,
    "labels": np.int32,
    "document_ids": np.int32,
    "position_ids": np.int32,
    "modality_ids": np.int8,
}
"""Fields of every row; their shapes are fixed by seq_len, so `load_rows` stacks them."""
IMAGE_FIELDS = {"pixel_values": np.uint8, "image_grid_thw": np.int32}
"""Fields that rows of an image split add; they vary in length from row to row."""
TEXT_LAYOUT = tuple(ROW_FIELDS)
IMAGE_LAYOUT = TEXT_LAYOUT + tuple(IMAGE_FIELDS)
FIELD_DTYPES = {name: np.dtype(dtype) for name, dtype in {**ROW_FIELDS, **IMAGE_FIELDS}.items()}


class ShardError(ValueError):
    """A split directory or shard that cannot be read as this schema: the message names it."""


@dataclass(frozen=True)
class ShardInfo:
    """One finished shard, as index.json lists it."""

    name: str
    rows: int
    tokens: int
    """Non-padding tokens (document_ids != -1)."""
    bytes: int
    fields: tuple[str, ...]
    """TEXT_LAYOUT or IMAGE_LAYOUT."""
    seq_len: int

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ShardInfo:
        """Back from `dataclasses.asdict` (and JSON): how a resumable writer keeps its finished shards."""
        try:
            return cls(
                str(record["name"]),
                int(record["rows"]),
                int(record["tokens"]),
                int(record["bytes"]),
                tuple(record["fields"]),
                int(record["seq_len"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"not a ShardInfo record ({type(err).__name__}: {err}): {dict(record)}") from None


@dataclass(frozen=True)
class ShardIndex:
    """A split's index.json, checked against this schema."""

    directory: str
    fields: tuple[str, ...]
    seq_len: int
    shards: tuple[ShardInfo, ...]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


# ---------------------------------------------------------------------- where files live
@dataclass(frozen=True)
class _Location:
    """A directory on an fsspec filesystem, and the URL its files are named by in messages."""

    fs: Any
    path: str
    url: str

    @classmethod
    def of(cls, directory: str | os.PathLike, storage_options: Mapping[str, Any] | None) -> _Location:
        url = os.fspath(directory).rstrip("/")
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        return cls(fs, path.rstrip("/"), url)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def file_url(self, name: str) -> str:
        return f"{self.url}/{name}"


class _PendingFile:
    """A file that appears under its name only once complete.

    Local: written as `NAME.tmp-<random>` beside it, fsynced, then `os.replace`d (atomic on POSIX).
    Object stores: buffered and sent in one `pipe`, a PUT or a multipart upload; S3 shows neither
    before it completes.
    """

    def __init__(self, location: _Location, name: str) -> None:
        self.location, self.name = location, name
        self._tmp = f"{location.file(name)}.tmp-{secrets.token_hex(6)}" if location.is_local else None
        self.stream = open(self._tmp, "wb") if self._tmp else io.BytesIO()  # closed by commit or discard

    def commit(self) -> int:
        """Publish the file; returns its size in bytes."""
        if self._tmp is None:
            data = self.stream.getvalue()
            self.location.fs.pipe(self.location.file(self.name), data)
            return len(data)
        self.stream.flush()
        os.fsync(self.stream.fileno())
        size = self.stream.tell()
        self.stream.close()
        os.replace(self._tmp, self.location.file(self.name))
        return size

    def discard(self) -> None:
        self.stream.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._tmp)


# ---------------------------------------------------------------------- writing
class ShardWriter:
    """Rows -> `shard-NNNNN.tar` files of `rows_per_shard` rows in `directory` (local path or URL).

    A shard becomes visible only complete (see `_PendingFile`); a crash leaves at most a
    `*.tmp-*` file beside the shards locally, never a half shard under a shard name. Opening a
    writer deletes the directory's index.json, so readers refuse the split until `write_index`
    publishes the new one. `first_shard` numbers the first shard: a resumed writer continues
    after the shards its predecessor finished.

        with ShardWriter(url, rows_per_shard=128) as writer:
            for row in rows:
                writer.write(row)
        write_index(url, writer.close(), writer.seq_len)

    An exception inside `with` discards the open shard and finishes nothing more.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rows_per_shard: int,
        first_shard: int = 0,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard={rows_per_shard} must be at least 1")
        if first_shard < 0:
            raise ValueError(f"first_shard={first_shard} must not be negative")
        self.rows_per_shard, self.first_shard = rows_per_shard, first_shard
        self._location = _Location.of(directory, storage_options)
        if self._location.is_local:
            os.makedirs(self._location.path, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._location.fs.rm_file(self._location.file(INDEX_FILE))
        self.fields: tuple[str, ...] | None = None
        """The split's layout, set by the first row."""
        self.seq_len: int | None = None
        """Tokens per row, set by the first row."""
        self._infos: list[ShardInfo] = []
        self._pending: _PendingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._shard_rows = self._shard_tokens = self._rows_written = 0
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, row: Mapping[str, Any]) -> None:
        if self._closed:
            raise ValueError(f"the ShardWriter of {self._location.url} is closed")
        members, tokens = self._encode(row)
        if self._tar is None:
            self._open_shard()
        key = f"{self.first_shard * self.rows_per_shard + self._rows_written:09d}"
        for field, data in members:
            info = tarfile.TarInfo(f"{key}.{field}.npy")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self._shard_rows += 1
        self._shard_tokens += tokens
        self._rows_written += 1
        if self._shard_rows == self.rows_per_shard:
            self._finish_shard()

    @property
    def infos(self) -> list[ShardInfo]:
        """The shards finished so far."""
        return list(self._infos)

    def close(self) -> list[ShardInfo]:
        """Finish the last (possibly short) shard; returns every shard this writer wrote."""
        if not self._closed:
            if self._tar is not None:
                self._finish_shard()
            self._closed = True
        return list(self._infos)

    def abort(self) -> None:
        """Drop the open shard; the finished ones stay (a resumed writer starts after them)."""
        if self._pending is not None:
            self._pending.discard()
        self._tar = self._pending = None
        self._closed = True

    def _encode(self, row: Mapping[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
        where = f"row {self._rows_written} written to {self._location.url}"
        fields = _row_layout(row, where)
        if self.fields is not None and fields != self.fields:
            raise ValueError(
                f"{where} has fields {list(fields)} but the split's first row had {list(self.fields)}: "
                "a split holds either text rows or image rows"
            )
        arrays = {name: _field_array(row[name], name, where) for name in fields}
        seq_len = _row_seq_len(arrays, where)
        if self.seq_len is not None and seq_len != self.seq_len:
            raise ValueError(f"{where} has {seq_len} tokens but the split's first row had {self.seq_len}")
        self.fields, self.seq_len = fields, seq_len
        tokens = int((arrays["document_ids"] != PADDING_DOCUMENT_ID).sum())
        return [(name, _npy_bytes(arrays[name])) for name in fields], tokens

    def _shard_name(self) -> str:
        return f"shard-{self.first_shard + len(self._infos):05d}.tar"

    def _open_shard(self) -> None:
        self._pending = _PendingFile(self._location, self._shard_name())
        self._tar = tarfile.open(fileobj=self._pending.stream, mode="w", format=tarfile.USTAR_FORMAT)

    def _finish_shard(self) -> None:
        self._tar.close()  # writes the end-of-archive blocks; the stream stays open
        size = self._pending.commit()
        info = ShardInfo(self._pending.name, self._shard_rows, self._shard_tokens, size, self.fields, self.seq_len)
        self._infos.append(info)
        self._tar = self._pending = None
        self._shard_rows = self._shard_tokens = 0


def _row_layout(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if not isinstance(row, Mapping):
        raise TypeError(f"{where} is a {type(row).__name__}, not a mapping of field name to array")
    names = set(row)
    unknown = names - set(IMAGE_LAYOUT)
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}; a row holds {list(IMAGE_LAYOUT)}")
    layout = IMAGE_LAYOUT if names & set(IMAGE_FIELDS) else TEXT_LAYOUT
    missing = [name for name in layout if name not in names]
    if missing:
        raise ValueError(f"{where} lacks fields {missing}")
    return layout


def _field_array(value: Any, name: str, where: str) -> np.ndarray:
    """`value` as the schema's dtype, C order (np.save of another order gives other bytes)."""
    array = np.asarray(value)
    dtype = FIELD_DTYPES[name]
    if array.dtype != dtype:
        cast = array.astype(dtype) if array.dtype.kind in "biuf" else None
        if cast is None or not np.array_equal(cast, array):
            raise ValueError(f"{where}: {name} holds {array.dtype} values that {dtype} cannot hold exactly")
        array = cast
    return np.ascontiguousarray(array)


def _row_seq_len(arrays: dict[str, np.ndarray], where: str) -> int:
    """The row's token count, after checking every field's shape against it."""
    input_ids = arrays["input_ids"]
    if input_ids.ndim != 1 or not len(input_ids):
        raise ValueError(f"{where}: input_ids has shape {input_ids.shape}, expected [S] with S > 0")
    seq_len = len(input_ids)
    images = "pixel_values" in arrays
    expected = {name: (seq_len,) for name in ROW_FIELDS} | {"position_ids": (3, seq_len) if images else (seq_len,)}
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"{where}: {name} has shape {arrays[name].shape}, expected {list(shape)}")
    if images:
        pixels, grid = arrays["pixel_values"], arrays["image_grid_thw"]
        if grid.ndim != 2 or grid.shape[1] != 3 or (grid < 1).any():
            raise ValueError(f"{where}: image_grid_thw must be [n, 3] positive (t, h, w), got {grid.tolist()}")
        patches = int(grid.astype(np.int64).prod(axis=1).sum())
        if pixels.ndim != 2 or pixels.shape[0] != patches:
            raise ValueError(
                f"{where}: pixel_values has shape {pixels.shape}, expected [{patches}, D] "
                f"(sum of t*h*w over image_grid_thw {grid.tolist()})"
            )
    return seq_len


def _npy_bytes(array: np.ndarray) -> bytes:
    """What `np.save` writes for a C-order array, with the header built once per dtype and shape."""
    return _npy_header(array.dtype.str, array.shape) + array.tobytes()


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def write_index(
    directory: str | os.PathLike,
    infos: Sequence[ShardInfo | Mapping[str, Any]],
    seq_len: int,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Publish a split: index.json listing `infos` in order, written after all of them; returns its URL.

    `infos` are ShardInfos or their `asdict` records. Every listed shard must be in the
    directory with its recorded size, so an index never promises a shard that is not there.
    """
    location = _Location.of(directory, storage_options)
    infos = [info if isinstance(info, ShardInfo) else ShardInfo.from_dict(info) for info in infos]
    fields = infos[0].fields if infos else TEXT_LAYOUT
    names = [info.name for info in infos]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"shards {duplicates} are listed twice for {location.url}")
    for info in infos:
        if info.fields != fields:
            raise ValueError(f"{info.name} has fields {list(info.fields)}, {infos[0].name} has {list(fields)}")
        if info.seq_len != seq_len:
            raise ValueError(f"{info.name} holds rows of {info.seq_len} tokens, not seq_len={seq_len}")
    _check_present(location, infos)
    document = {
        "schema_version": SHARD_SCHEMA_VERSION,
        "fields": {name: FIELD_DTYPES[name].name for name in fields},
        "seq_len": seq_len,
        "rows": sum(info.rows for info in infos),
        "tokens": sum(info.tokens for info in infos),
        "shards": [{"name": i.name, "rows": i.rows, "tokens": i.tokens, "bytes": i.bytes} for i in infos],
    }
    pending = _PendingFile(location, INDEX_FILE)
    pending.stream.write(json.dumps(document, indent=1).encode() + b"\n")
    pending.commit()
    return location.file_url(INDEX_FILE)


def _check_present(location: _Location, infos: Sequence[ShardInfo]) -> None:
    if not infos:
        return
    location.fs.invalidate_cache(location.path)  # shards may come from other processes
    sizes = {posixpath.basename(e["name"]): e["size"] for e in location.fs.ls(location.path, detail=True)}
    for info in infos:
        if sizes.get(info.name) != info.bytes:
            found = "missing" if info.name not in sizes else f"{sizes[info.name]} bytes"
            raise ValueError(f"{location.file_url(info.name)} is {found}, its ShardInfo says {info.bytes} bytes")


def write_row_shards(
    rows: Iterable[Mapping[str, Any]],
    directory: str | os.PathLike,
    rows_per_shard: int,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write a whole split (shards, then index.json); returns the shard file names."""
    with ShardWriter(directory, rows_per_shard, storage_options=storage_options) as writer:
        for row in rows:
            writer.write(row)
    infos = writer.close()
    write_index(directory, infos, writer.seq_len or 0, storage_options)
    return [info.name for info in infos]


# ---------------------------------------------------------------------- reading
def read_index(directory: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> ShardIndex:
    """The split's index.json, checked against SHARD_SCHEMA_VERSION and the schema's fields.

    A directory with shards but no index.json is rejected, not read as schema version 1:
    in version 2 a missing index also means a writer that stopped before finishing, and the
    two cannot be told apart. (Version 1 artifacts cannot reach a reader through the pipeline
    anyway: this file is part of every stage's cache key.)
    """
    return _read_index(_Location.of(directory, storage_options))


def _read_index(location: _Location) -> ShardIndex:
    try:
        document = json.loads(location.fs.cat_file(location.file(INDEX_FILE)))
    except FileNotFoundError:
        location.fs.invalidate_cache(location.path)
        if location.fs.glob(location.file("shard-*.tar")):
            raise ShardError(
                f"{location.url} has shard-*.tar files but no {INDEX_FILE}: written by shard schema version 1 "
                f"(before index files; this code reads version {SHARD_SCHEMA_VERSION}) or by a writer that stopped "
                "before finishing. Rebuild it by rerunning the data stage"
            ) from None
        raise FileNotFoundError(f"{location.url} has no {INDEX_FILE} and no shards: not a dataset split") from None
    except json.JSONDecodeError as err:
        raise ShardError(f"{location.file_url(INDEX_FILE)} is not JSON ({err})") from None
    version = document.get("schema_version")
    if version != SHARD_SCHEMA_VERSION:
        raise ShardError(
            f"{location.url} holds shard schema version {version}; this code reads version "
            f"{SHARD_SCHEMA_VERSION}. Rebuild the split by rerunning the data stage"
        )
    fields = _declared_layout(document.get("fields"), location)
    try:
        seq_len = int(document["seq_len"])
        shards = tuple(
            ShardInfo(s["name"], int(s["rows"]), int(s["tokens"]), int(s["bytes"]), fields, seq_len)
            for s in document["shards"]
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ShardError(f"{location.file_url(INDEX_FILE)} is malformed ({type(err).__name__}: {err})") from None
    for shard in shards:
        _check_shard_name(location, shard.name)
    return ShardIndex(location.url, fields, seq_len, shards)


def _check_shard_name(location: _Location, name: Any) -> None:
    """A shard named by index.json is a file of the split directory itself: no path, no symlink out."""
    what = f"{location.file_url(INDEX_FILE)} lists shard"
    if not isinstance(name, str) or "/" in check_relative(name, what):
        raise PathEscape(f"{what} {name!r}, which is not a file name in {location.url}")
    if location.is_local:
        contained(location.path, name, what)


def _declared_layout(declared: Any, location: _Location) -> tuple[str, ...]:
    for layout in (TEXT_LAYOUT, IMAGE_LAYOUT):
        if declared == {name: FIELD_DTYPES[name].name for name in layout}:
            return layout
    known = {name: dtype.name for name, dtype in FIELD_DTYPES.items()}
    raise ShardError(
        f"{location.url} declares fields {declared}; shard schema version {SHARD_SCHEMA_VERSION} has "
        f"{known} (the last two only in image splits)"
    )


def list_shards(directory: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """URLs of the split's shards, in index order."""
    location = _Location.of(directory, storage_options)
    return [location.file_url(shard.name) for shard in _read_index(location).shards]


def _read_shard(location: _Location, shard: ShardInfo) -> list[dict[str, np.ndarray]]:
    """The shard's rows, checked against its index entry; any damage is a ShardError naming its URL."""
    url = location.file_url(shard.name)
    try:
        data = location.fs.cat_file(location.file(shard.name))
    except FileNotFoundError:
        raise ShardError(f"{url} is listed in {INDEX_FILE} but missing") from None
    if len(data) != shard.bytes:
        raise ShardError(f"{url} has {len(data)} bytes, {INDEX_FILE} records {shard.bytes}: truncated or rewritten")
    try:
        rows = _parse_tar(data, shard.fields)
    except (tarfile.TarError, ValueError, EOFError) as err:
        raise ShardError(f"{url} is corrupt: {err}") from err
    if len(rows) != shard.rows:
        raise ShardError(f"{url} holds {len(rows)} rows, {INDEX_FILE} records {shard.rows}")
    return rows


def _parse_tar(data: bytes, fields: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    rows: dict[str, dict[str, np.ndarray]] = {}  # by key, in file order
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, rest = member.name.partition(".")
            field = rest.removesuffix(".npy")
            if not member.isfile() or field not in fields or field == rest:
                raise ValueError(f"unexpected member {member.name!r}")
            array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
            if array.dtype != FIELD_DTYPES[field]:
                raise ValueError(f"member {member.name!r} is {array.dtype}, not {FIELD_DTYPES[field]}")
            rows.setdefault(key, {})[field] = array
    for key, row in rows.items():
        missing = [field for field in fields if field not in row]
        if missing:
            raise ValueError(f"row {key} lacks members {missing}")
    return list(rows.values())


def iter_rows(
    directory: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of every shard in index order, one shard in memory at a time."""
    location = _Location.of(directory, storage_options)
    for shard in _read_index(location).shards:
        yield from _read_shard(location, shard)


def load_rows(directory: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """The ROW_FIELDS of all rows stacked, {field: [N, S]} ([N, 3, S] for image position_ids).

    For small splits: tiny runs, eval, calibration. Image fields vary in length per row and are
    left out; read them with `iter_rows`.
    """
    index = read_index(directory, storage_options)
    rows = list(iter_rows(directory, storage_options))
    images = index.fields == IMAGE_LAYOUT
    stacked = {}
    for name, dtype in ROW_FIELDS.items():
        shape = (3, index.seq_len) if images and name == "position_ids" else (index.seq_len,)
        stacked[name] = np.stack([r[name] for r in rows]) if rows else np.zeros((0, *shape), dtype)
    return stacked


# ---------------------------------------------------------------------- streaming for pretraining
class ShardStream:
    """One data-parallel worker's rows of a split for one epoch: its own shards, streamed and shuffled.

    Epoch `e` deals the shards in an order drawn from (seed, e); worker `rank` of `world` takes
    shards rank::world of it, so workers never share a row. Rows pass a buffer of `shuffle_buffer`
    rows (seeded by seed, epoch, rank, world; 0 keeps file order): memory holds one shard plus the
    buffer, never the split. Every worker yields `rows_per_epoch()` rows, the smallest share of any
    worker, so all ranks take the same number of steps (a rank that ran out early would leave the
    others waiting in a collective); rows past it on ranks holding more are skipped this epoch
    only, as the next epoch deals the shards anew.

    Units: with `unit_rows=u` each run of u consecutive rows of a shard (fewer at a shard's end)
    is one buffer item, so its rows stay together and in order; the buffer then holds
    ceil(shuffle_buffer / u) units. The data stage orders VL rows so that every
    `data.balance.group_rows` consecutive rows have a balanced text:vision share, which a
    row-level shuffle would undo.

    Resume: `start_row=k` (or `skip(k)`) yields exactly what the stream yields after its first k
    rows, also when k falls inside a unit. The buffer's draws depend on unit positions only, never
    on contents, so they are replayed without reading data (about a second per million units);
    then only the shards holding units still buffered at k, and those after, are read.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        rank: int,
        world: int,
        seed: int,
        shuffle_buffer: int,
        epoch: int = 0,
        start_row: int = 0,
        unit_rows: int = 1,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank} world={world}: need world >= 1 and 0 <= rank < world")
        for name, value in (("shuffle_buffer", shuffle_buffer), ("epoch", epoch)):
            if value < 0:
                raise ValueError(f"{name}={value} must not be negative")
        if unit_rows < 1:
            raise ValueError(f"unit_rows={unit_rows} must be at least 1")
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, epoch
        self.shuffle_buffer, self.unit_rows = shuffle_buffer, unit_rows
        self._location = _Location.of(directory, storage_options)
        self.index = _read_index(self._location)
        n_shards = len(self.index.shards)
        if n_shards < world:
            raise ValueError(
                f"{self._location.url} has {n_shards} shards but {world} workers read it: every worker needs at "
                f"least one shard; lower data.rows_per_shard so the split has {world} shards or more"
            )
        order = random.Random(f"shards:{seed}:{epoch}").sample(range(n_shards), n_shards)
        self._dealt = [[self.index.shards[i] for i in order[r::world]] for r in range(world)]
        self.shards: tuple[ShardInfo, ...] = tuple(self._dealt[rank])
        """This worker's shards this epoch, in reading order."""
        self._unit_starts = [0, *itertools.accumulate(-(-shard.rows // unit_rows) for shard in self.shards)]
        """Index of each shard's first unit (and the unit count last)."""
        self.start_row = 0
        self._set_start(start_row)

    def worker_rows(self, rank: int) -> int:
        """Rows in worker `rank`'s shards this epoch."""
        return sum(shard.rows for shard in self._dealt[rank])

    def rows_per_epoch(self) -> int:
        """Rows every worker yields this epoch (from row 0): steps = rows_per_epoch() // per-worker batch."""
        return min(self.worker_rows(r) for r in range(self.world))

    def __len__(self) -> int:
        """Rows still to come after start_row."""
        return self.rows_per_epoch() - self.start_row

    def skip(self, n_rows: int) -> ShardStream:
        """The same stream started `n_rows` later (nothing is read until iteration)."""
        resumed = copy.copy(self)
        resumed._set_start(self.start_row + n_rows)
        return resumed

    def _set_start(self, start_row: int) -> None:
        if not 0 <= start_row <= self.rows_per_epoch():
            raise ValueError(
                f"start_row={start_row} is outside this epoch's stream of {self.rows_per_epoch()} rows "
                f"(rank {self.rank} of {self.world}, {self._location.url})"
            )
        self.start_row = start_row

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rng = random.Random(f"rows:{self.seed}:{self.epoch}:{self.rank}:{self.world}")
        buffer = _ShuffleBuffer(-(-self.shuffle_buffer // self.unit_rows), rng)
        replay = buffer.stream(range(self._unit_starts[-1]))
        emitted_rows = emitted_units = last = 0
        while emitted_rows < self.start_row:
            last = next(replay)
            emitted_rows += self._unit_size(last)
            emitted_units += 1
        pushed = emitted_units + len(buffer.items)  # every unit read so far was emitted or is buffered
        overshoot = emitted_rows - self.start_row  # rows of the last emitted unit not yet yielded
        fetched = self._fetch(list(buffer.items) + ([last] if overshoot else []))
        head = fetched[last][len(fetched[last]) - overshoot :] if overshoot else []
        buffer.items = [(unit, fetched[unit]) for unit in buffer.items]  # same order: same draws
        rest = (row for _, rows in buffer.stream(self._units_from(pushed)) for row in rows)
        yield from itertools.islice(itertools.chain(head, rest), len(self))

    def _locate(self, unit: int) -> tuple[int, int, int]:
        """(shard number, first row, end row) of `unit` within this worker's shards."""
        k = bisect.bisect_right(self._unit_starts, unit) - 1
        first = (unit - self._unit_starts[k]) * self.unit_rows
        return k, first, min(first + self.unit_rows, self.shards[k].rows)

    def _unit_size(self, unit: int) -> int:
        _, first, end = self._locate(unit)
        return end - first

    def _units_from(self, unit: int) -> Iterator[tuple[int, list[dict[str, np.ndarray]]]]:
        """(unit, rows) of this worker's units from `unit` on, reading shard by shard."""
        for k, shard in enumerate(self.shards):
            if self._unit_starts[k + 1] > unit:
                rows = _read_shard(self._location, shard)
                for u in range(max(unit, self._unit_starts[k]), self._unit_starts[k + 1]):
                    _, first, end = self._locate(u)
                    yield u, rows[first:end]

    def _fetch(self, units: list[int]) -> dict[int, list[dict[str, np.ndarray]]]:
        """Rows of `units`, reading only the shards that hold them."""
        by_shard: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
        for unit in units:
            k, first, end = self._locate(unit)
            by_shard[k].append((unit, first, end))
        fetched = {}
        for k, wanted in by_shard.items():
            shard_rows = _read_shard(self._location, self.shards[k])
            fetched.update({unit: shard_rows[first:end] for unit, first, end in wanted})
        return fetched


class _ShuffleBuffer:
    """Holds up to `size` items; each item past that releases one drawn uniformly from the buffer.

    The state (items in order, rng) after any release fully decides what follows, which is
    what lets ShardStream resume by replaying positions.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size, self.rng = size, rng
        self.items: list = []

    def stream(self, items: Iterable) -> Iterator:
        for item in items:
            self.items.append(item)
            if len(self.items) > self.size:
                yield self._release()
        while self.items:
            yield self._release()

    def _release(self):
        j = self.rng.randrange(len(self.items))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()
