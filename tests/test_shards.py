"""The dataset shard format (`pipeline.shards`): schema v2 with index.json, atomic writes on a
local disk and on a real S3 API (moto_server), corruption errors, and the streaming reader
pretraining workers use (`ShardStream`: disjoint shards per worker, seeded shuffle, exact resume)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from s3_server import S3Server, moto_s3

from pipeline import shards
from pipeline.shards import (
    IMAGE_LAYOUT,
    INDEX_FILE,
    ROW_FIELDS,
    SHARD_SCHEMA_VERSION,
    TEXT_LAYOUT,
    ShardError,
    ShardStream,
    ShardWriter,
    iter_rows,
    list_shards,
    load_rows,
    read_index,
    write_index,
    write_row_shards,
)

SEQ_LEN = 16
PATCH_DIM = 12


def text_row(i: int, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Row `i`: input_ids[0] == i + 10 identifies it; 0-4 padding tokens at the tail."""
    real = seq_len - i % 5
    input_ids = np.zeros(seq_len, np.int32)
    input_ids[:real] = np.arange(real) + i + 10
    document_ids = np.full(seq_len, -1, np.int32)
    document_ids[:real] = i
    labels = np.where(document_ids >= 0, input_ids, -100).astype(np.int32)
    labels[0] = -100
    return {
        "input_ids": input_ids,
        "labels": labels,
        "document_ids": document_ids,
        "position_ids": np.arange(seq_len, dtype=np.int32),
        "modality_ids": np.zeros(seq_len, np.int8),
    }


def image_row(i: int) -> dict[str, np.ndarray]:
    """Row `i` with i % 4 images (0 to 3) of 1 x h x w patches."""
    rng = np.random.default_rng(i)
    row = text_row(i)
    grid = np.array([[1, rng.integers(1, 4), rng.integers(1, 4)] for _ in range(i % 4)], np.int32).reshape(-1, 3)
    patches = int(grid.prod(axis=1).sum())
    row["modality_ids"][1 : 1 + min(patches, SEQ_LEN - 5)] = 1
    row["position_ids"] = np.stack([np.arange(SEQ_LEN, dtype=np.int32)] * 3)
    row["pixel_values"] = rng.integers(0, 256, (patches, PATCH_DIM), dtype=np.uint8)
    row["image_grid_thw"] = grid
    return row


def row_id(row: dict[str, np.ndarray]) -> int:
    return int(row["input_ids"][0]) - 10


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in w:
            assert g[name].dtype == shards.FIELD_DTYPES[name], name
            np.testing.assert_array_equal(g[name], w[name], err_msg=name)


# ---------------------------------------------------------------------- where splits live
@pytest.fixture(scope="module")
def s3_server():
    with moto_s3("shards") as server:
        yield server


@dataclass
class Place:
    """A split directory, local or on S3, and a way to list what is really there."""

    url: str
    options: dict | None
    s3: S3Server | None = None

    def names(self) -> list[str]:
        if self.s3 is None:
            return sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []
        path = self.url.removeprefix("s3://")
        return sorted(p.rsplit("/", 1)[-1] for p in self.s3.fs.ls(path)) if self.s3.fs.exists(path) else []

    def read(self, name: str) -> bytes:
        if self.s3 is None:
            return Path(self.url, name).read_bytes()
        return self.s3.fs.cat_file(f"{self.url}/{name}")


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path) -> Place:
    if request.param == "local":
        return Place(str(tmp_path / "train"), None)
    server = request.getfixturevalue("s3_server")
    return Place(f"s3://shards/{uuid.uuid4().hex}/train", server.storage_options, server)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("make_row", [text_row, image_row], ids=["text", "image"])
def test_rows_round_trip_with_an_index_listing_every_shard(place, make_row):
    rows = [make_row(i) for i in range(11)]
    names = write_row_shards(rows, place.url, rows_per_shard=4, storage_options=place.options)

    assert names == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert place.names() == [INDEX_FILE, *names]  # no temporary files left behind
    assert list_shards(place.url, place.options) == [f"{place.url}/{n}" for n in names]
    assert_rows_equal(list(iter_rows(place.url, place.options)), rows)

    index = json.loads(place.read(INDEX_FILE))
    layout = IMAGE_LAYOUT if make_row is image_row else TEXT_LAYOUT
    assert index["schema_version"] == SHARD_SCHEMA_VERSION == 2
    assert list(index["fields"]) == list(layout)
    assert index["fields"]["input_ids"] == "int32" and index["fields"]["modality_ids"] == "int8"
    assert index["seq_len"] == SEQ_LEN and index["rows"] == 11
    assert [s["rows"] for s in index["shards"]] == [4, 4, 3]
    assert [s["bytes"] for s in index["shards"]] == [len(place.read(n)) for n in names]
    tokens = [int((r["document_ids"] != -1).sum()) for r in rows]
    assert [s["tokens"] for s in index["shards"]] == [sum(tokens[:4]), sum(tokens[4:8]), sum(tokens[8:])]
    assert index["tokens"] == sum(tokens) < 11 * SEQ_LEN  # padding is not counted


def test_image_rows_keep_their_variable_image_counts_and_load_rows_stacks_only_fixed_fields(tmp_path):
    rows = [image_row(i) for i in range(9)]
    write_row_shards(rows, tmp_path, rows_per_shard=4)
    read = list(iter_rows(tmp_path))
    assert [len(r["image_grid_thw"]) for r in read] == [i % 4 for i in range(9)]
    assert {r["pixel_values"].shape[0] for r in read} > {0}  # several patch counts, none padded
    stacked = load_rows(tmp_path)
    assert set(stacked) == set(ROW_FIELDS)
    assert stacked["position_ids"].shape == (9, 3, SEQ_LEN)
    assert stacked["input_ids"].shape == (9, SEQ_LEN) and stacked["modality_ids"].dtype == np.int8


def test_load_rows_of_text_rows_and_of_an_empty_split(tmp_path):
    rows = [text_row(i) for i in range(5)]
    write_row_shards(rows, tmp_path / "a", rows_per_shard=2)
    stacked = load_rows(tmp_path / "a")
    for name, dtype in ROW_FIELDS.items():
        assert stacked[name].dtype == dtype and stacked[name].shape == (5, SEQ_LEN)
        np.testing.assert_array_equal(stacked[name], np.stack([r[name] for r in rows]))
    assert write_row_shards([], tmp_path / "empty", rows_per_shard=2) == []
    assert list(iter_rows(tmp_path / "empty")) == []
    assert load_rows(tmp_path / "empty")["input_ids"].shape == (0, 0)


def test_identical_rows_give_byte_identical_shards_and_index(tmp_path):
    rows = [image_row(i) for i in range(7)]
    # lists and int64 arrays of the same values are cast exactly to the schema's dtypes
    as_lists = [{k: v.tolist() if k in ROW_FIELDS else v.astype(np.int64) for k, v in r.items()} for r in rows]
    write_row_shards(rows, tmp_path / "a", rows_per_shard=3)
    write_row_shards(as_lists, tmp_path / "b", rows_per_shard=3)
    files = sorted(os.listdir(tmp_path / "a"))
    assert files == sorted(os.listdir(tmp_path / "b"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tarfile.open(tmp_path / "a" / "shard-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:7]] == [f"000000000.{f}.npy" for f in IMAGE_LAYOUT]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}


def test_shards_keep_the_webdataset_layout(tmp_path):
    import webdataset as wds

    rows = [text_row(i) for i in range(6)]
    write_row_shards(rows, tmp_path, rows_per_shard=4)
    samples = list(wds.WebDataset(list_shards(tmp_path), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    for sample, row in zip(samples, rows, strict=True):
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["labels.npy"])), row["labels"])


# ---------------------------------------------------------------------- atomic writes, resume
def test_a_writer_that_dies_mid_shard_leaves_no_partial_shard_and_no_index(place):
    write_row_shards([text_row(i) for i in range(3)], place.url, 2, storage_options=place.options)  # an old split
    assert INDEX_FILE in place.names()
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(place.url, rows_per_shard=4, storage_options=place.options) as writer:
            assert INDEX_FILE not in place.names()  # the old index no longer vouches for the directory
            for i in range(10):
                writer.write(text_row(100 + i))
            visible = [n for n in place.names() if n.endswith(".tar")]
            assert visible == ["shard-00000.tar", "shard-00001.tar"]  # not shard-00002.tar, 2 rows into it
            raise RuntimeError("boom")
    assert place.names() == ["shard-00000.tar", "shard-00001.tar"]  # two full new shards, nothing else
    assert [row_id(r) for r in shards._parse_tar(place.read("shard-00001.tar"), TEXT_LAYOUT)] == [104, 105, 106, 107]
    with pytest.raises(ShardError, match=rf"{place.url} has shard-\*\.tar files but no index\.json"):
        list(iter_rows(place.url, place.options))


def test_a_resumed_writer_numbers_its_shards_after_the_finished_ones(place):
    with ShardWriter(place.url, rows_per_shard=3, storage_options=place.options) as first:
        for i in range(6):
            first.write(text_row(i))
    with ShardWriter(place.url, rows_per_shard=3, first_shard=2, storage_options=place.options) as second:
        for i in range(6, 10):
            second.write(text_row(i))
    infos = first.close() + second.infos
    assert [i.name for i in infos] == [f"shard-{k:05d}.tar" for k in range(4)]
    records = json.loads(json.dumps([dataclasses.asdict(i) for i in infos]))  # as a resumable writer saves them
    write_index(place.url, records, SEQ_LEN, place.options)
    assert [row_id(r) for r in iter_rows(place.url, place.options)] == list(range(10))
    assert read_index(place.url, place.options).rows == 10


def test_write_index_refuses_shards_that_are_not_there(tmp_path):
    with ShardWriter(tmp_path, rows_per_shard=2) as writer:
        for i in range(4):
            writer.write(text_row(i))
    infos = writer.close()
    (tmp_path / "shard-00001.tar").unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.tar is missing"):
        write_index(tmp_path, infos, SEQ_LEN)
    with pytest.raises(ValueError, match=r"not seq_len=8"):
        write_index(tmp_path, infos[:1], 8)
    with pytest.raises(ValueError, match=r"not a ShardInfo record \(KeyError: 'bytes'\)"):
        write_index(tmp_path, [{"name": "shard-00000.tar", "rows": 2, "tokens": 3}], SEQ_LEN)
    assert not (tmp_path / INDEX_FILE).exists()


def no_patches(row: dict) -> None:
    row.update(pixel_values=np.zeros((0, PATCH_DIM), np.uint8), image_grid_thw=[[1, 2, 2]])


@pytest.mark.parametrize(
    ("make_row", "change", "message"),
    [
        (text_row, lambda r: r.pop("labels"), r"lacks fields \['labels'\]"),
        (text_row, lambda r: r.update(extra=np.zeros(3)), r"unknown fields \['extra'\]"),
        (text_row, lambda r: r.update(labels=r["labels"] + 0.5), r"labels holds float64 values that int32 cannot"),
        (text_row, lambda r: r.update(modality_ids=np.full(SEQ_LEN, 300)), r"modality_ids holds int64 .* int8"),
        (text_row, lambda r: r.update(position_ids=np.zeros((3, SEQ_LEN))), r"position_ids has shape \(3, 16\)"),
        (text_row, lambda r: r.update(input_ids=r["input_ids"][:8]), r"labels has shape \(16,\), expected \[8\]"),
        (text_row, lambda r: r.update(pixel_values=np.zeros((0, 4))), r"lacks fields \['image_grid_thw'\]"),
        (image_row, no_patches, r"pixel_values has shape \(0, 12\), expected \[4, D\]"),
        (image_row, lambda r: r.update(image_grid_thw=[[1, 0, 2]]), r"image_grid_thw must be \[n, 3\] positive"),
        (image_row, lambda r: r.update(position_ids=np.arange(SEQ_LEN)), r"position_ids has shape \(16,\)"),
    ],
)
def test_bad_rows_are_errors_naming_the_row_and_field(tmp_path, make_row, change, message):
    row = make_row(1)
    change(row)
    with pytest.raises(ValueError, match=message) as error:
        write_row_shards([make_row(0), row], tmp_path, rows_per_shard=4)
    assert f"row 1 written to {tmp_path}" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_a_split_holds_one_kind_of_row(tmp_path):
    with pytest.raises(ValueError, match="a split holds either text rows or image rows"):
        write_row_shards([text_row(0), image_row(1)], tmp_path, rows_per_shard=4)


# ---------------------------------------------------------------------- reading errors
@pytest.fixture
def split(tmp_path) -> Path:
    write_row_shards([text_row(i) for i in range(6)], tmp_path, rows_per_shard=3)
    return tmp_path


def edit_index(directory: Path, edit) -> None:
    index = json.loads((directory / INDEX_FILE).read_text())
    edit(index)
    (directory / INDEX_FILE).write_text(json.dumps(index))


def test_another_schema_version_is_an_error_naming_the_directory_and_both_versions(split):
    edit_index(split, lambda index: index.update(schema_version=1))
    with pytest.raises(ShardError, match=rf"{split} holds shard schema version 1; this code reads version 2"):
        list(iter_rows(split))


def test_fields_other_than_the_schemas_are_an_error(split):
    edit_index(split, lambda index: index["fields"].update(input_ids="int64"))
    with pytest.raises(ShardError, match=rf"{split} declares fields .*'input_ids': 'int64'"):
        read_index(split)


def test_a_directory_without_shards_or_index_is_not_a_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path} has no index\.json and no shards"):
        load_rows(tmp_path)


def test_a_truncated_shard_is_an_error_naming_its_url(split):
    shard = split / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    rows = iter_rows(split)
    assert len([next(rows) for _ in range(3)]) == 3  # the first shard is fine
    with pytest.raises(ShardError, match=rf"{shard} has 1500 bytes, index\.json records \d+: truncated"):
        next(rows)


def test_a_shard_missing_a_member_is_an_error_naming_its_url(split):
    shard = split / "shard-00000.tar"
    buffer = io.BytesIO()
    with tarfile.open(shard) as source, tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for member in source:
            if member.name != "000000001.labels.npy":
                out.addfile(member, source.extractfile(member))
    shard.write_bytes(buffer.getvalue())
    edit_index(split, lambda index: index["shards"][0].update(bytes=len(buffer.getvalue())))
    with pytest.raises(ShardError, match=rf"{shard} is corrupt: row 000000001 lacks members \['labels'\]"):
        load_rows(split)


# ---------------------------------------------------------------------- ShardStream
@pytest.fixture(scope="module")
def even_split(tmp_path_factory) -> Path:
    """8 shards of 4 rows."""
    directory = tmp_path_factory.mktemp("even")
    write_row_shards([text_row(i) for i in range(32)], directory, rows_per_shard=4)
    return directory


@pytest.fixture(scope="module")
def uneven_split(tmp_path_factory) -> Path:
    """7 shards: six of 5 rows, the last of 3."""
    directory = tmp_path_factory.mktemp("uneven")
    write_row_shards([text_row(i) for i in range(33)], directory, rows_per_shard=5)
    return directory


def stream_ids(directory: Path, **kwargs) -> list[int]:
    args = dict(rank=0, world=1, seed=0, shuffle_buffer=6) | kwargs
    return [row_id(r) for r in ShardStream(directory, **args)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_workers_read_disjoint_shards_that_cover_the_split(even_split, world):
    for epoch in range(2):
        per_rank = [stream_ids(even_split, rank=r, world=world, epoch=epoch) for r in range(world)]
        seen = [i for ids in per_rank for i in ids]
        assert sorted(seen) == list(range(32))  # disjoint and complete
        shards_of = [{i // 4 for i in ids} for ids in per_rank]
        assert all(len(s) == 8 // world for s in shards_of)  # whole shards per worker


def test_with_uneven_shards_every_worker_yields_the_same_count(uneven_split):
    for epoch in range(4):
        streams = [ShardStream(uneven_split, r, 3, seed=1, shuffle_buffer=4, epoch=epoch) for r in range(3)]
        counts = {s.rows_per_epoch() for s in streams}
        assert len(counts) == 1 and counts.pop() == min(s.worker_rows(s.rank) for s in streams)
        ids = [[row_id(r) for r in s] for s in streams]
        assert {len(i) for i in ids} == {streams[0].rows_per_epoch()} == {len(streams[0])}
        assert len(set().union(*map(set, ids))) == sum(map(len, ids))  # still disjoint


def test_the_order_is_seeded_by_seed_and_epoch(even_split):
    first = stream_ids(even_split, seed=3, epoch=1)
    assert first == stream_ids(even_split, seed=3, epoch=1)
    assert first != stream_ids(even_split, seed=3, epoch=2)
    assert first != stream_ids(even_split, seed=4, epoch=1)
    assert [stream_ids(even_split, rank=1, world=2, epoch=e) for e in range(2)] == [
        stream_ids(even_split, rank=1, world=2, epoch=e) for e in range(2)
    ]


def test_the_shuffle_buffer_mixes_rows_across_the_file_order(even_split):
    stream = ShardStream(even_split, 0, 1, seed=0, shuffle_buffer=10)
    file_order = [i for shard in stream.shards for i in range(int(shard.name[6:11]) * 4, int(shard.name[6:11]) * 4 + 4)]
    assert stream_ids(even_split, shuffle_buffer=0) == file_order  # no buffer: shard by shard, rows in order
    shuffled = stream_ids(even_split, shuffle_buffer=10)
    assert shuffled != file_order and sorted(shuffled) == list(range(32))
    assert sum(a != b for a, b in zip(shuffled, file_order, strict=True)) > 16


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_skip_continues_exactly_where_the_full_stream_was(uneven_split, data):
    world = data.draw(st.integers(1, 4), label="world")
    args = dict(
        rank=data.draw(st.integers(0, world - 1), label="rank"),
        world=world,
        seed=data.draw(st.integers(0, 3), label="seed"),
        shuffle_buffer=data.draw(st.integers(0, 12), label="buffer"),
        epoch=data.draw(st.integers(0, 2), label="epoch"),
    )
    stream = ShardStream(uneven_split, **args)
    full = [row_id(r) for r in stream]
    k = data.draw(st.integers(0, len(full)), label="k")
    assert [row_id(r) for r in stream.skip(k)] == full[k:]
    assert [row_id(r) for r in ShardStream(uneven_split, **args, start_row=k)] == full[k:]


def units_of(ids: list[int], rows_per_shard: int, unit_rows: int, total_rows: int) -> list[list[int]]:
    """Cut a stream of row ids into the units it must be made of (runs of `unit_rows` rows of a
    shard of `rows_per_shard`, shorter at a shard's end); fails if a unit is split or reordered."""
    units, at = [], 0
    while at < len(ids):
        shard, offset = divmod(ids[at], rows_per_shard)
        assert offset % unit_rows == 0, f"row {ids[at]} starts no unit: {ids}"
        shard_end = min((shard + 1) * rows_per_shard, total_rows)
        unit = list(range(ids[at], min(ids[at] + unit_rows, shard_end)))
        assert ids[at : at + len(unit)] == unit, f"unit {unit} was split: {ids}"
        units.append(unit)
        at += len(unit)
    return units


@pytest.mark.parametrize("unit_rows", [2, 3])
def test_units_move_through_the_buffer_whole_and_in_order(uneven_split, unit_rows):
    for seed in range(3):
        ids = stream_ids(uneven_split, seed=seed, shuffle_buffer=6, unit_rows=unit_rows)
        assert sorted(ids) == list(range(33))
        units = units_of(ids, rows_per_shard=5, unit_rows=unit_rows, total_rows=33)
        assert units != sorted(units), "the buffer shuffles the units"
        assert {len(u) for u in units} <= {unit_rows, 5 % unit_rows, 3 % unit_rows or unit_rows}


def test_a_unit_buffer_counts_rows(even_split):
    # 8 rows of buffer = 2 units of 4: a unit leaves at most 2 units after it entered
    ids = stream_ids(even_split, shuffle_buffer=8, unit_rows=4)
    entered = [i // 4 for i in stream_ids(even_split, shuffle_buffer=0, unit_rows=4)[::4]]
    left = [i // 4 for i in ids[::4]]
    assert all(left.index(u) >= entered.index(u) - 2 for u in entered)
    assert stream_ids(even_split, shuffle_buffer=1, unit_rows=4) != stream_ids(even_split, shuffle_buffer=0)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_skip_with_units_continues_exactly_also_inside_a_unit(uneven_split, data):
    world = data.draw(st.integers(1, 3), label="world")
    args = dict(
        rank=data.draw(st.integers(0, world - 1), label="rank"),
        world=world,
        seed=data.draw(st.integers(0, 3), label="seed"),
        shuffle_buffer=data.draw(st.integers(0, 12), label="buffer"),
        epoch=data.draw(st.integers(0, 2), label="epoch"),
        unit_rows=data.draw(st.integers(1, 6), label="unit_rows"),
    )
    full = [row_id(r) for r in ShardStream(uneven_split, **args)]
    k = data.draw(st.integers(0, len(full)), label="k")
    assert [row_id(r) for r in ShardStream(uneven_split, **args, start_row=k)] == full[k:]
    assert [row_id(r) for r in ShardStream(uneven_split, **args).skip(k)] == full[k:]


def test_resume_reads_only_the_shards_it_needs(even_split, monkeypatch):
    reads = []
    real = shards._read_shard

    def counting_read(location, shard):
        reads.append(shard.name)
        return real(location, shard)

    monkeypatch.setattr(shards, "_read_shard", counting_read)
    stream = ShardStream(even_split, 0, 1, seed=0, shuffle_buffer=2)
    tail = [row_id(r) for r in stream.skip(30)]
    assert len(tail) == 2 and len(reads) < 4  # the buffered rows' shards and the last one, not all 8


def test_fewer_shards_than_workers_is_a_clear_error(even_split):
    with pytest.raises(ValueError, match=r"has 8 shards but 9 workers .* lower data\.rows_per_shard"):
        ShardStream(even_split, rank=0, world=9, seed=0, shuffle_buffer=4)


def test_bad_stream_arguments_are_errors(even_split):
    with pytest.raises(ValueError, match=r"rank=2 world=2"):
        ShardStream(even_split, rank=2, world=2, seed=0, shuffle_buffer=4)
    with pytest.raises(ValueError, match=r"start_row=33 is outside this epoch's stream of 32 rows"):
        ShardStream(even_split, rank=0, world=1, seed=0, shuffle_buffer=4, start_row=33)
    with pytest.raises(ValueError, match=r"shuffle_buffer=-1"):
        ShardStream(even_split, rank=0, world=1, seed=0, shuffle_buffer=-1)
    with pytest.raises(ValueError, match=r"unit_rows=0 must be at least 1"):
        ShardStream(even_split, rank=0, world=1, seed=0, shuffle_buffer=4, unit_rows=0)


def test_stream_reads_a_split_on_s3(s3_server):
    url = f"s3://shards/{uuid.uuid4().hex}/train"
    options = s3_server.storage_options
    write_row_shards([image_row(i) for i in range(12)], url, rows_per_shard=3, storage_options=options)
    per_rank = [[row_id(r) for r in ShardStream(url, r, 2, 0, 4, storage_options=options)] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))
    resumed = ShardStream(url, 1, 2, 0, 4, start_row=4, storage_options=options)
    assert [row_id(r) for r in resumed] == per_rank[1][4:]
