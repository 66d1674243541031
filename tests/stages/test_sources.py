"""Per-file parsing of every source kind: one bad record costs one record, named by file and line."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.contract import UserError
from stages.data.config import SourceConfig
from stages.data.sources import RawRecord, list_files, parse_file


def jsonl(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def test_jsonl_good_bad_utf8_bad_json_and_missing_field_each_cost_one_record():
    data = jsonl({"text": "hello"}, b'{"text": "caf\xe9"}', b"{not json", {"body": "x"}, {"text": "bye"})
    records = parse_file(SourceConfig(name="web", kind="jsonl", path="x"), "/d/a.jsonl", data)
    assert [(r.key, r.error_kind) for r in records] == [
        ("/d/a.jsonl:line 1", ""),
        ("/d/a.jsonl:line 2", "bad_utf8"),
        ("/d/a.jsonl:line 3", "bad_json"),
        ("/d/a.jsonl:line 4", "missing_field"),
        ("/d/a.jsonl:line 5", ""),
    ]
    assert records[0].segments == [("text", "hello")]
    assert "byte" in records[1].error and "'text'" in records[3].error


def test_image_text_paths_resolve_next_to_the_index_and_parquet_carries_bytes():
    source = SourceConfig(name="caps", kind="image-text", path="x")
    records = parse_file(source, "s3://b/caps/index.jsonl", jsonl({"image": "img/1.png", "text": "a cat"}))
    assert records[0].segments == [("image_ref", "s3://b/caps/img/1.png"), ("text", "a cat")]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [b"\x89PNG..."], "text": ["a dog"]}), buffer)
    records = parse_file(source, "/d/caps.parquet", buffer.getvalue())
    assert records[0].segments == [("image", b"\x89PNG..."), ("text", "a dog")]
    assert records[0].key == "/d/caps.parquet:row 0"


def test_interleaved_segments_keep_reading_order_and_reject_unknown_segments():
    source = SourceConfig(name="doc", kind="interleaved", path="x")
    good = {
        "segments": [
            {"type": "text", "text": "see"},
            {"type": "image", "image": "p.png"},
            {"type": "text", "text": "!"},
        ]
    }
    bad = {"segments": [{"type": "audio", "audio": "a.wav"}]}
    records = parse_file(source, "/d/i.jsonl", jsonl(good, bad))
    assert records[0].segments == [("text", "see"), ("image_ref", "/d/p.png"), ("text", "!")]
    assert records[1].error_kind == "bad_record" and "segment 0" in records[1].error


def test_webdataset_samples_pair_text_with_their_image():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in (("a.txt", b"first"), ("a.jpg", b"JPEG"), ("b.txt", b"second"), ("c.jpg", b"orphan")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    records = parse_file(SourceConfig(name="wds", kind="webdataset", path="x"), "/d/s.tar", buffer.getvalue())
    assert [r.segments for r in records[:2]] == [[("image", b"JPEG"), ("text", "first")], [("text", "second")]]
    assert records[2].error_kind == "missing_field"


def test_an_unreadable_file_is_one_error_record_naming_it():
    records = parse_file(SourceConfig(name="p", kind="parquet", path="x"), "/d/broken.parquet", b"not parquet")
    assert len(records) == 1 and records[0].error_kind == "bad_file" and records[0].key == "/d/broken.parquet"


def test_raw_records_survive_the_row_round_trip():
    record = RawRecord("s", "k", [("image", b"\x00\x01"), ("text", "t")])
    assert RawRecord.from_row(record.to_row()) == record


def test_listing_is_sorted_and_a_missing_path_is_a_user_error(tmp_path):
    for name in ("b.jsonl", "a.jsonl", ".hidden"):
        (tmp_path / name).write_text("{}\n")
    _, files = list_files(SourceConfig(name="s", kind="jsonl", path=str(tmp_path)), 0)
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.jsonl"]
    with pytest.raises(UserError, match=r"data\.sources\[3\]\.path='/nope' does not exist"):
        list_files(SourceConfig(name="s", kind="jsonl", path="/nope"), 3)
