"""The Ray Data part of the stage: read -> parse -> encode every source, in parallel across the cluster.

Each source becomes one materialised dataset of encoded documents in a fixed order
(`preserve_order`), so a rerun or a resume sees the same documents in the same order however
many nodes did the work. The stage's own process only mixes, packs and writes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.contract import UserError
from stages.training.launch import ensure_ray

from .config import SourceConfig
from .encode import EncodeSpec, encode_batch, encode_records, table_documents
from .sources import RawRecord, list_files, parse_file

ENCODE_BATCH = 256
MAX_EXAMPLES = 5
"""Error examples kept per source in stats.json (the counts are complete)."""


def _data_context():
    import ray.data

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # determinism: documents in file order
    ctx.enable_progress_bars = False  # the stage reports its own progress
    ctx.print_on_execution_start = False
    # Without this, Ray Data reserves CPUs per operator and on small machines runs one encode task
    # at a time; the pipeline here is read -> parse -> encode, nothing to starve.
    ctx.op_resource_reservation_enabled = False
    return ray.data


def warm_up() -> Future:
    """Start Ray Data's helper actors and import the encode code in the workers, in the background.

    The first Ray Data run of a process spends seconds on this; the stage starts it before it
    builds the corpus and trains the tokenizer, so the two overlap.
    """
    rd = _data_context()
    import ray

    workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    warm = rd.range(workers, override_num_blocks=workers).map_batches(_imported, batch_size=None)
    return ThreadPoolExecutor(1, thread_name_prefix="ray-data-warm-up").submit(warm.materialize)


def _imported(batch: dict) -> dict:
    import stages.data.encode  # noqa: F401  (what every encode task needs; cached for the worker's life)

    return batch


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
    return FileSource(ds, source, protocol)


@dataclass
class FileSource:
    """A source's files as a Ray dataset of (path, bytes); parsed and encoded in one task per file."""

    files: object
    source: SourceConfig
    protocol: str


def _parse_and_encode(batch: dict, source: SourceConfig, protocol: str, spec: EncodeSpec) -> dict:
    """One task per file: parse it and encode its records, with no raw-record block in between."""
    records = [
        r
        for path, data in zip(batch["path"], batch["bytes"], strict=True)
        for r in parse_file(source, protocol + path, data)
    ]
    return encode_records(records, spec)


def encoded_dataset(raw, spec: EncodeSpec):
    """Encode and materialise (blocks stay in the object store, spilled to disk when large)."""
    if isinstance(raw, FileSource):
        kwargs = {"source": raw.source, "protocol": raw.protocol, "spec": spec}
        return raw.files.map_batches(_parse_and_encode, fn_kwargs=kwargs, batch_size=1).materialize()
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
    for batch in _batches(ds, ("key", "error_kind", "error", "tokens", "vision_tokens")):
        kinds = batch["error_kind"]
        ok = [i for i, kind in enumerate(kinds) if not kind]
        result.documents += len(ok)
        result.tokens += sum(batch["tokens"][i] for i in ok)
        result.vision_tokens += sum(batch["vision_tokens"][i] for i in ok)
        for i, kind in enumerate(kinds):
            if not kind:
                continue
            where = f"{batch['key'][i]}: {batch['error'][i]}"
            if on_error == "fail":
                raise UserError(f"data source {name!r}: {where} ({kind})")
            result.errors[kind] += 1
            if len(result.examples) < MAX_EXAMPLES:
                result.examples.append(where)
    return result


def documents(ds) -> Iterator[tuple[int, tuple[str, object]]]:
    """(tokens, (split, PackDocument)) of every encoded document, in order; error rows skipped."""
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        yield from table_documents(table)


def _batches(ds, columns: tuple[str, ...]) -> Iterator[dict[str, list]]:
    """Columns of a materialised dataset, block by block, as Python lists (no per-row dicts)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2):
        yield {name: batch.column(name).to_pylist() for name in columns}


def write_shards(directory: str, rows: list[dict], rows_per_shard: int, first_shard: int):
    """Write `rows` as shards in a Ray task on this node (the stage's work dir is local); an ObjectRef
    of their `ShardInfo`s as dicts."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # No CPU reservation: it runs beside the stage like a thread of it, and a node whose CPUs the
    # stage holds must not leave it waiting forever (it cannot go to another node).
    task = _remote(_write_shards).options(num_cpus=0, scheduling_strategy=here, max_retries=0)
    return task.remote(directory, rows, rows_per_shard, first_shard)


@functools.cache
def _remote(fn):
    import ray

    return ray.remote(fn)


def _write_shards(directory: str, rows: list[dict], rows_per_shard: int, first_shard: int) -> list[dict]:
    from dataclasses import asdict

    from pipeline.shards import ShardWriter

    with ShardWriter(directory, rows_per_shard, first_shard=first_shard) as writer:
        for row in rows:
            writer.write(row)
    return [asdict(info) for info in writer.infos]


def sample_texts(sources: dict[int, SourceConfig], max_chars: int) -> list[str]:
    """Texts to train the BPE on when the sources are files and no tokenizer directory is given.

    The first `max_chars` characters of text per source, read in this process file by file: a
    small BPE's merges settle within a few million characters, and a Ray Data pass would cost
    more in start-up than the reading itself.
    """
    import fsspec

    texts: list[str] = []
    for index, source in sources.items():
        _, files = list_files(source, index)
        chars = 0
        for url in files:
            if chars >= max_chars:
                break
            with fsspec.open(url, "rb") as f:
                parsed = parse_file(source, url, f.read())
            for record in parsed:
                for kind, text in record.segments or []:
                    if kind == "text" and chars < max_chars:
                        texts.append(text)
                        chars += len(text)
    if not texts:
        raise UserError("no text found in data.sources to train the tokenizer on; set data.tokenizer to a directory")
    return texts
