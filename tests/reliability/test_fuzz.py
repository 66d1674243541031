"""Bad input fuzzing (hypothesis): every reader of outside input either succeeds or raises its documented
error, never another exception and never a hang.

- jsonl files (`pipeline.formats.read_jsonl`): records (dicts), or a `ValueError` naming the line;
- data source files, jsonl / parquet / image-text / interleaved / webdataset tar
  (`stages.data.sources.parse_file`): raw records, bad ones as error records of `ERROR_KINDS`, never raises;
- encoded image bytes (`stages.imaging.decode_image`, then `image_to_patches`): an RGB image, or `ImageError`;
- chat messages (`ernie.chat_template.render` / `render_segments` / `image_refs`): text, or `ValueError`;
- config overrides (`pipeline.config.load`): a `PipelineConfig`, or `UserError`;
- OpenAI request bodies (`stages.serve.protocol` models, then the chat template as the app calls it): a
  request or pydantic `ValidationError`, then text or `ValueError` (which the app answers with a 400);
- data-stage blobs, segments / documents / resume carry (`stages.data.wire`): values, or `WireError`.

Each example runs under a wall-clock bound (SIGALRM), so a hang fails the test instead of the suite.
"""

from __future__ import annotations

import io
import json
import re
import signal
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BOUND_S = 20.0
"""Per example: generous for a loaded 2-core machine; a hang runs into it, a slow example does not."""
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(BaseException):
    """Raised in the example when it runs past `BOUND_S`; a BaseException, so no reader swallows it."""


@contextmanager
def time_bound(seconds: float = BOUND_S):
    def expire(signum, frame):
        raise Hang(f"no result after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _mutated(seed: bytes, data) -> bytes:
    """`seed` with a few bytes replaced, then maybe cut short: close enough to the format to go deep."""
    blob = bytearray(seed)
    for _ in range(data.draw(st.integers(0, 6), label="flips")):
        at = data.draw(st.integers(0, max(0, len(blob) - 1)), label="at")
        if blob:
            blob[at] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(blob)), label="cut") if data.draw(st.booleans(), label="truncate") else None
    return bytes(blob[:cut])


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------- jsonl
def _jsonl_lines():
    record = st.dictionaries(st.sampled_from(["text", "image", "segments", "messages", "x"]), json_values, max_size=3)
    line = st.one_of(
        record.map(lambda r: json.dumps(r).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.integers(2_000, 100_000).map(lambda n: _deep_json(n).encode()),
    )
    return st.lists(line, max_size=6).map(b"\n".join)


@FUZZ
@given(data=_jsonl_lines())
def test_read_jsonl_gives_records_or_a_value_error_naming_the_line(data):
    from pipeline.formats import read_jsonl

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "records.jsonl"
        path.write_bytes(data)
        with time_bound():
            try:
                records = read_jsonl(path)
            except ValueError as err:
                assert str(path) in str(err)
                return
    assert all(isinstance(r, dict) for r in records)


@FUZZ
@given(st.lists(st.dictionaries(st.text(max_size=6), json_values, max_size=3), max_size=5))
def test_jsonl_records_round_trip(records):
    from pipeline.formats import read_jsonl, write_jsonl

    records = json.loads(json.dumps(records))  # what JSON can hold (NaN stays NaN: compare the text)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "records.jsonl"
        write_jsonl(path, records)
        assert json.dumps(read_jsonl(path)) == json.dumps(records)


# ---------------------------------------------------------------------- data source files
def _check_raw_records(records) -> None:
    from stages.data.sources import ERROR_KINDS, RawRecord

    assert isinstance(records, list)
    for record in records:
        if record.segments is None:
            assert record.error_kind in ERROR_KINDS and record.error
        else:
            assert record.error_kind == "" and record.segments
            for kind, value in record.segments:
                assert kind in ("text", "image", "image_ref")
                assert isinstance(value, bytes if kind == "image" else str)
        assert RawRecord.from_row(record.to_row()) == record  # the Ray Data hop, without pickle


@FUZZ
@given(kind=st.sampled_from(["jsonl", "image-text", "interleaved"]), data=_jsonl_lines())
def test_jsonl_sources_turn_every_bad_line_into_an_error_record(kind, data):
    from stages.data.config import SourceConfig
    from stages.data.sources import parse_file

    source = SourceConfig(name="fuzz", kind=kind, path="/d")
    with time_bound():
        records = parse_file(source, "/d/f.jsonl", data)
    _check_raw_records(records)


def _parquet_seed() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["a caption", "", "more"], "image": [b"\x89PNG", None, b"x"], "n": [1, 2, 3]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


PARQUET_SEED = _parquet_seed()


@FUZZ
@given(kind=st.sampled_from(["parquet", "image-text"]), data=st.data())
def test_parquet_sources_survive_damaged_files(kind, data):
    from stages.data.config import SourceConfig
    from stages.data.sources import parse_file

    blob = _mutated(PARQUET_SEED, data) if data.draw(st.booleans(), label="seeded") else data.draw(st.binary())
    with time_bound():
        records = parse_file(SourceConfig(name="fuzz", kind=kind, path="/d"), "/d/f.parquet", blob)
    _check_raw_records(records)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name or "x")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


member_names = st.one_of(
    st.builds(
        lambda s, e: f"{s}.{e}",
        st.sampled_from(["a", "b", "dir/a", "../up", "/abs"]),
        st.sampled_from(["txt", "jpg", "png", "TXT", "json", "txt.gz", ""]),
    ),
    st.text(min_size=1, max_size=12).filter(lambda t: "\0" not in t),
)


@FUZZ
@given(
    members=st.lists(st.tuples(member_names, st.binary(max_size=30)), max_size=5),
    data=st.data(),
)
def test_webdataset_sources_survive_odd_members_and_damaged_tars(members, data):
    from stages.data.config import SourceConfig
    from stages.data.sources import parse_file

    try:
        blob = _tar(members)
    except (ValueError, UnicodeError):  # names tarfile itself cannot write
        return
    if data.draw(st.booleans(), label="damage"):
        blob = _mutated(blob, data)
    with time_bound():
        records = parse_file(SourceConfig(name="fuzz", kind="webdataset", path="/d"), "/d/f.tar", blob)
    _check_raw_records(records)


# ---------------------------------------------------------------------- images
def _image_seeds() -> dict[str, bytes]:
    from PIL import Image

    image = Image.new("RGBA", (30, 20), (10, 200, 30, 128))
    seeds = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO"):
        buffer = io.BytesIO()
        (image if fmt in ("PNG", "WEBP", "TIFF", "ICO") else image.convert("RGB")).save(buffer, format=fmt)
        seeds[fmt] = buffer.getvalue()
    return seeds


IMAGE_SEEDS = _image_seeds()


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about every damaged TIFF tag it skips
@FUZZ
@given(fmt=st.sampled_from(sorted(IMAGE_SEEDS)), data=st.data())
def test_decode_image_gives_an_rgb_image_or_an_image_error(fmt, data):
    from ernie.presets import get_preset
    from stages.imaging import ImageError, decode_image, image_to_patches

    blob = _mutated(IMAGE_SEEDS[fmt], data) if data.draw(st.booleans(), label="seeded") else data.draw(st.binary())
    vision = get_preset("tiny_vl").vision
    with time_bound():
        try:
            image = decode_image(blob, "fuzz.img")
            patches, grid = image_to_patches(image, vision, 28 * 28, 112 * 112)
        except ImageError as err:
            assert "fuzz.img" in str(err) or "image size" in str(err)
            return
    assert image.mode == "RGB"
    assert patches.dtype == np.uint8 and patches.shape[0] == grid[0] * grid[1] * grid[2]


def test_an_image_declaring_more_pixels_than_the_bomb_limit_is_refused_before_decoding():
    """12000 x 12000 is over Pillow's limit but under twice it, where Pillow itself only warns."""
    import struct
    import zlib

    from stages.imaging import ImageError, decode_image

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 12_000, 12_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    with pytest.warns(Warning), pytest.raises(ImageError, match=r"'bomb.png' .* declares 12000x12000 pixels"):
        decode_image(png, "bomb.png")


# ---------------------------------------------------------------------- the chat template
_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), json_values)}),
    st.fixed_dictionaries({"type": st.just("image"), "image": st.one_of(st.text(max_size=10), json_values)}),
    json_values,
)
_messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", None, 3]),
        "content": st.one_of(st.text(max_size=30), st.lists(_parts, max_size=3), json_values),
    },
    optional={"reasoning_content": st.one_of(st.text(max_size=20), json_values)},
)
chats = st.one_of(st.lists(st.one_of(_messages, json_values), max_size=5), json_values)


@FUZZ
@given(messages=chats, add_generation_prompt=st.booleans(), enable_thinking=st.booleans())
def test_chat_template_renders_or_raises_value_error(messages, add_generation_prompt, enable_thinking):
    from ernie.chat_template import BOS, image_refs, render, render_segments

    with time_bound():
        try:
            text = render(messages, add_generation_prompt, enable_thinking)
        except ValueError:
            return
        segments = render_segments(messages, add_generation_prompt, enable_thinking)
        refs = image_refs(messages)
    assert text.startswith(BOS) and "".join(piece for piece, _ in segments) == text
    assert all(isinstance(ref, str) for ref in refs)


# ---------------------------------------------------------------------- config overrides
def _config_keys() -> list[str]:
    from pipeline import config
    from pipeline.tracking import flatten

    return sorted(flatten(config.PipelineConfig()))


CONFIG_KEYS = _config_keys()
_values = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(str),
    st.sampled_from(["null", "true", "[]", "{}", "[sft,sft]", "${oops}", "'quoted'", "[a,b", "nope", "-1", "0"]),
    st.text(alphabet="ab01=[]{}:,$'\"\\. _-+~@", max_size=12),
)
_overrides = st.one_of(
    st.builds(
        lambda prefix, key, value: f"{prefix}{key}={value}",
        st.sampled_from(["", "", "+", "++", "~"]),
        st.one_of(st.sampled_from(CONFIG_KEYS), st.sampled_from(["model", "data", "x", "model.moe", "a.b"])),
        _values,
    ),
    st.text(max_size=20),
)


@settings(FUZZ, max_examples=30)
@given(overrides=st.lists(_overrides, min_size=1, max_size=3))
def test_config_overrides_load_or_raise_a_user_error(overrides):
    from pipeline import config
    from pipeline.contract import UserError

    with time_bound():
        try:
            cfg = config.load("tiny", overrides)
        except UserError as err:
            assert str(err)
            return
    assert isinstance(cfg, config.PipelineConfig)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+pretrain.stepz=3"], "unknown configuration key pretrain.stepz"),
        (["+a.b=1"], "unknown configuration key a (the top level has no key 'a')"),
        (
            ["pretrain.stepz=3"],
            "unknown configuration key pretrain.stepz (pretrain has no key 'stepz'); did you mean pretrain.steps?",
        ),
        (["serve.prefix_cache_tokens=64"], "serve.prefix_caching turns it on or off"),
        (["posttrain.recipe=[sft,dpo,sft]"], "names ['sft'] twice"),
        (["model=0"], "bad configuration for conf=tiny"),
    ],
)
def test_overrides_found_by_fuzzing_are_user_errors(overrides, message):
    """A `+key` Hydra accepts under the schema (a typo passed silently), a repeated recipe method (two
    stages of one name), a group choice that is not a name (Hydra's own ValueError)."""
    from pipeline import config
    from pipeline.contract import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        config.load("tiny", overrides)


# ---------------------------------------------------------------------- OpenAI request bodies
_content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20), json_values)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.one_of(st.fixed_dictionaries({"url": st.text()}), json_values)}
    ),
    json_values,
)
_openai_messages = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool"]),
        "content": st.one_of(st.text(max_size=30), st.lists(_content_parts, max_size=3), json_values),
    }
)
_bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "model": json_values,
            "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3), json_values),
            "messages": st.one_of(st.lists(st.one_of(_openai_messages, json_values), max_size=4), json_values),
            "max_tokens": st.one_of(st.integers(-5, 10**20), json_values),
            "temperature": st.one_of(st.floats(), json_values),
            "top_p": st.floats(),
            "top_k": st.integers(-3, 3),
            "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3), json_values),
            "n": st.integers(-1, 3),
            "stream": json_values,
            "stream_options": json_values,
            "enable_thinking": json_values,
            "chat_template_kwargs": json_values,
            "seed": st.one_of(st.integers(), json_values),
        },
    ),
)


@FUZZ
@given(body=_bodies)
def test_openai_requests_validate_or_raise_a_validation_error(body):
    from pydantic import ValidationError

    from ernie.chat_template import render
    from stages.serve.protocol import ChatCompletionRequest, CompletionRequest

    with time_bound():
        try:
            completion = CompletionRequest.model_validate(body)
            assert isinstance(completion.stop_list(), list)
        except ValidationError:
            pass
        try:
            chat = ChatCompletionRequest.model_validate(body)
        except ValidationError:
            return
        images: list = []
        messages = [m.template_message(i, images) for i, m in enumerate(chat.messages)]
        try:  # what the app does next; a ValueError becomes a 400
            render(messages, add_generation_prompt=True, enable_thinking=chat.thinking())
        except ValueError:
            pass
    assert isinstance(chat.stop_list(), list) and all(isinstance(url, str) for url, _ in images)


def test_openai_request_validation_survives_deeply_nested_json():
    """Nesting no JSON parser would hand over whole (the server's JSON parsing answers 400 first)."""
    from pydantic import ValidationError

    from stages.serve.protocol import ChatCompletionRequest

    nested: list = []
    for _ in range(20_000):
        nested = [nested]
    kwargs = {"enable_thinking": True, "deep": nested}
    message = {"role": "user", "content": "hi"}
    with time_bound():
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"messages": nested})
        assert ChatCompletionRequest.model_validate({"messages": [message], "chat_template_kwargs": kwargs}).thinking()


# ---------------------------------------------------------------------- data-stage blobs (no pickle)
def _carry_seed() -> bytes:
    from stages.data.packing import PackDocument, PackImage
    from stages.data.wire import carry_to_bytes

    image = PackImage(np.arange(24, dtype=np.uint8).reshape(2, 12), (1, 1, 2), (2, 4))
    doc = PackDocument(
        doc_id=7,
        tokens=np.arange(6, dtype=np.int32),
        positions=np.zeros((3, 6), np.int32),
        modality=np.array([0, 0, 1, 1, 0, 0], np.int8),
        images=[image],
        atomic=[(1, 5)],
        source="scenes",
    )
    row = {"input_ids": np.arange(8, dtype=np.int32), "modality_ids": np.zeros(8, np.int8)}
    return carry_to_bytes({"rows": {"train": [row], "val": []}, "pending": {"train": [doc], "val": []}})


CARRY_SEED = _carry_seed()


def test_the_carry_round_trips_without_pickle():
    from stages.data.wire import carry_from_bytes, carry_to_bytes

    carry = carry_from_bytes(CARRY_SEED)
    assert carry_to_bytes(carry) == CARRY_SEED
    (doc,) = carry["pending"]["train"]
    assert doc.doc_id == 7 and doc.images[0].grid_thw == (1, 1, 2) and doc.atomic == [(1, 5)]
    doc.tokens[0] = 99  # writable, as the unpickled arrays were


@FUZZ
@given(data=st.data())
def test_damaged_blobs_are_wire_errors(data):
    from stages.data.wire import WireError, carry_from_bytes, document_from_bytes, segments_from_bytes

    blob = _mutated(CARRY_SEED, data) if data.draw(st.booleans(), label="seeded") else data.draw(st.binary())
    for read in (carry_from_bytes, document_from_bytes, segments_from_bytes):
        with time_bound():
            try:
                read(blob)
            except WireError:
                pass


@FUZZ
@given(meta=json_values, data=st.data())
def test_blob_headers_that_lie_are_wire_errors(meta, data):
    """A well-framed blob whose header holds anything: dtypes, shapes and meta of any JSON shape."""
    import struct

    from stages.data.wire import MAGIC, WireError, carry_from_bytes, document_from_bytes, segments_from_bytes

    specs = data.draw(
        st.one_of(
            json_values,
            st.lists(
                st.tuples(
                    st.sampled_from(["<i4", "|u1", "O", "<U3", "V8", "<f8", "x", "|b1", "<M8[s]"]),
                    st.lists(st.integers(-2, 2**40), max_size=3),
                ),
                max_size=3,
            ),
        ),
        label="arrays",
    )
    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    blob = MAGIC + struct.pack("<I", len(header)) + header + data.draw(st.binary(max_size=64), label="payload")
    for read in (carry_from_bytes, document_from_bytes, segments_from_bytes):
        with time_bound():
            try:
                read(blob)
            except WireError:
                pass


def test_an_empty_array_with_sides_longer_than_the_data_is_a_wire_error():
    """Found by the fuzzing above: shape [0, 1518494220, 1518506280] has no elements, yet numpy refuses to make it."""
    import struct

    from stages.data.wire import MAGIC, WireError, loads

    header = json.dumps({"meta": None, "arrays": [["<i4", [0, 1518494220, 1518506280]]]}).encode()
    with pytest.raises(WireError, match="shape"):
        loads(MAGIC + struct.pack("<I", len(header)) + header)


_DOC = {"doc_id": 1, "tokens": 0, "positions": None, "modality": None, "images": [], "atomic": [], "source": "s"}


@pytest.mark.parametrize(
    ("meta", "specs"),
    [
        (_DOC | {"doc_id": float("inf")}, [["<i4", [2]]]),
        (_DOC | {"atomic": [[float("nan"), 1]]}, [["<i4", [2]]]),
        (_DOC | {"images": [{"patches": 0, "grid_thw": 5, "span": [1, 2]}]}, [["<i4", [2]]]),
        ({"rows": {"t": [{"a": 0}]}, "pending": {"t": [_DOC | {"doc_id": float("inf")}]}}, [["<i4", [2]]]),
        ({}, [["<i4", [float("inf")]]]),
        ({}, [["<i4", [2**62, 2**62]]]),
        ({}, [["O", [1]]]),
    ],
)
def test_blob_values_out_of_range_are_wire_errors(meta, specs):
    """Cases random JSON rarely reaches: infinities where ints go, overflowing shapes, object dtypes."""
    import struct

    from stages.data.wire import MAGIC, WireError, carry_from_bytes, document_from_bytes

    header = json.dumps({"meta": meta, "arrays": specs}).encode()
    blob = MAGIC + struct.pack("<I", len(header)) + header + bytes(8)
    read = carry_from_bytes if "rows" in meta else document_from_bytes
    with pytest.raises(WireError):
        read(blob)
