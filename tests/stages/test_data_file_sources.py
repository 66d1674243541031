"""Every file source kind through the real stage (Ray Data), local files: parquet text, interleaved
jsonl with image files, webdataset shards with images; each source's documents and images arrive."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ernie import get_preset
from pipeline.contract import StageContext
from pipeline.shards import read_index
from stages import data
from stages.data.config import SourceConfig

TEXTS = [f"Record {i}: a sentence about topic {i % 7} that is long enough to be a document." for i in range(120)]


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (56, 84), (shade, 255 - shade, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    pq.write_table(pa.table({"body": TEXTS}), root / "text.parquet")
    (root / "docs" / "img").mkdir(parents=True)
    lines = []
    for i in range(30):
        (root / "docs" / "img" / f"{i}.png").write_bytes(png(5 * i))
        segments = [{"type": "text", "text": f"Look at picture {i}:"}, {"type": "image", "image": f"img/{i}.png"}]
        lines.append(json.dumps({"segments": [*segments, {"type": "text", "text": f"It is shade {5 * i}."}]}))
    (root / "docs" / "part.jsonl").write_text("\n".join(lines) + "\n")
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "shard-0.tar", "w") as tar:
        for i in range(30):
            for name, payload in ((f"s{i:03d}.png", png(200 - 5 * i)), (f"s{i:03d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    sources = [
        SourceConfig(name="parquet", kind="parquet", path=str(root / "text.parquet"), text_field="body", weight=0.5),
        SourceConfig(name="interleaved", kind="interleaved", path=str(root / "docs"), weight=0.3),
        SourceConfig(name="wds", kind="webdataset", path=str(root / "wds"), weight=0.2),
    ]
    config = data.Config(sources=sources, vocab_size=400, seq_len=64, rows_per_shard=8, val_fraction=0.1)
    model = get_preset("tiny_vl").replace(vocab_size=400)
    out = root / "dataset"
    data.run(StageContext("data", config, model, {}, out))
    return out, json.loads((out / "stats.json").read_text())


def test_each_kind_contributes_documents_and_images_without_errors(built):
    _, stats = built
    assert stats["errors"] == {}
    assert {name: s["documents"] > 0 for name, s in stats["sources"].items()} == dict.fromkeys(
        ("interleaved", "parquet", "wds"), True
    )
    assert stats["sources"]["parquet"]["images"] == 0
    assert stats["sources"]["interleaved"]["images"] >= 30 and stats["sources"]["wds"]["images"] >= 30
    for name, share in stats["mixture"].items():
        assert share["realised"] == pytest.approx(share["asked"], abs=0.02), name


def test_rows_carry_the_images_their_placeholders_need(built):
    out, _ = built
    from pipeline.shards import iter_rows

    model = get_preset("tiny_vl")
    index = read_index(out / "train")
    assert index.fields and "pixel_values" in index.fields
    images = 0
    for row in iter_rows(out / "train"):
        placeholders = int((row["input_ids"] == model.image_token_id).sum())
        grids = row["image_grid_thw"]
        assert placeholders == sum(int(t * h * w) // 4 for t, h, w in grids)
        assert len(row["pixel_values"]) == sum(int(t * h * w) for t, h, w in grids)
        images += len(grids)
    assert images > 0
