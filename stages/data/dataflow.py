"""The Ray Data part of the stage: read -> parse -> encode every source, in parallel across the cluster.

Each source becomes one materialised dataset of encoded documents in a fixed order
(`preserve_order`), so a rerun or a resume sees the same documents in the same order however
many nodes did the work. The stage's own process only mixes, packs and writes.
"""

from __future__ import annotations

import pickle
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.contract import UserError
from stages.training.launch import ensure_ray

from .config import Config, SourceConfig
from .encode import EncodeSpec, encode_batch
from .sources import RawRecord, list_files, parse_file

ENCODE_BATCH = 64
MAX_EXAMPLES = 5
"""Error examples kept per source in stats.json (the counts are complete)."""


def _data_context():
    import ray.data

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # determinism: documents in file order
    ctx.enable_progress_bars = False  # the stage reports its own progress
    ctx.print_on_execution_start = False
    return ray.data


def raw_dataset(source: SourceConfig, index: int, bundled: list[RawRecord] | None):
    """A Ray dataset of raw-record rows for one source, or None when it has no files."""
    rd = _data_context()
    if bundled is not None:
        return rd.from_items([r.to_row() for r in bundled]) if bundled else None
    fs, files = list_files(source, index)
    if not files:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    local = files[0].startswith("/")
    ds = rd.read_binary_files(
        files if local else [f.split("://", 1)[1] for f in files],
        include_paths=True,
        filesystem=None if local else PyFileSystem(FSSpecHandler(fs)),
        override_num_blocks=len(files),
    )
    protocol = "" if local else files[0].split("://", 1)[0] + "://"

    def parse(row: dict) -> list[dict]:
        return [r.to_row() for r in parse_file(source, protocol + row["path"], row["bytes"])]

    return ds.flat_map(parse)


def encoded_dataset(raw, spec: EncodeSpec):
    """Encode and materialise (blocks stay in the object store, spilled to disk when large)."""
    return raw.map_batches(encode_batch, fn_kwargs={"spec": spec}, batch_size=ENCODE_BATCH).materialize()


@dataclass
class SourceScan:
    """What one pass over a source's encoded rows found (no documents kept)."""

    documents: int = 0
    tokens: int = 0
    vision_tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)


def scan(name: str, ds, on_error: str) -> SourceScan:
    result = SourceScan()
    if ds is None:
        return result
    for row in ds.select_columns(["key", "error_kind", "error", "tokens", "vision_tokens"]).iter_rows():
        if row["error_kind"]:
            if on_error == "fail":
                raise UserError(f"data source {name!r}: {row['key']}: {row['error']} ({row['error_kind']})")
            result.errors[row["error_kind"]] += 1
            if len(result.examples) < MAX_EXAMPLES:
                result.examples.append(f"{row['key']}: {row['error']}")
            continue
        result.documents += 1
        result.tokens += int(row["tokens"])
        result.vision_tokens += int(row["vision_tokens"])
    return result


def documents(ds) -> Iterator[tuple[int, tuple[str, object]]]:
    """(tokens, (split, PackDocument)) of every encoded document, in order; error rows skipped."""
    for row in ds.select_columns(["split", "doc", "tokens"]).iter_rows():
        if row["doc"]:
            yield int(row["tokens"]), (row["split"], pickle.loads(row["doc"]))


def sample_texts(config: Config, raws: dict, limit: int) -> list[str]:
    """Texts to train the BPE on when the sources are files and no tokenizer directory is given."""
    texts: list[str] = []
    per_source = defaultdict(int)
    for name, raw in raws.items():
        if raw is None:
            continue
        for row in raw.limit(limit).iter_rows():
            record = RawRecord.from_row(row)
            texts += [t for kind, t in (record.segments or []) if kind == "text"]
            per_source[name] += 1
    if not texts:
        raise UserError("no text found in data.sources to train the tokenizer on; set data.tokenizer to a directory")
    return texts
