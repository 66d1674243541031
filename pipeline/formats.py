"""On-disk formats of the artifacts that stages hand each other (part of the stage contract).

dataset artifact:
    tokenizer/tokenizer.json        HF `tokenizers` file (special tokens: ernie.chat_template)
    train/shard-00000.tar ...       webdataset shards of packed rows (see ROW_FIELDS)
    val/shard-00000.tar ...
    sft/{train,val}.jsonl           {"messages": [{"role", "content"}...]}
    preferences/{train,val}.jsonl   {"prompt": [...messages], "chosen": str, "rejected": str}
    tasks/val.jsonl                 {"task", "prompt": [...messages], "answer": str}  (eval)
    stats.json                      token-balance and packing statistics

A packed row holds `seq_len` tokens from one or more documents:
    input_ids [S] int32, labels [S] int32 (-100 = no loss), document_ids [S] int32,
    position_ids [S] int32 (restart per document), modality_ids [S] int8 (0 text, 1 image, 2 video)

Only numpy, webdataset and tokenizers here; no Ray, MLflow or Hydra.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

ROW_FIELDS = {
    "input_ids": np.int32,
    "labels": np.int32,
    "document_ids": np.int32,
    "position_ids": np.int32,
    "modality_ids": np.int8,
}
TOKENIZER_FILE = "tokenizer/tokenizer.json"


# ---------------------------------------------------------------------- packed rows
def write_row_shards(rows: Iterable[dict[str, np.ndarray]], directory: Path, rows_per_shard: int) -> list[str]:
    """Write rows into `directory/shard-NNNNN.tar`; returns the shard file names."""
    import webdataset as wds

    directory.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    writer = None
    for i, row in enumerate(rows):
        if i % rows_per_shard == 0:
            if writer is not None:
                writer.close()
            names.append(f"shard-{len(names):05d}.tar")
            writer = wds.TarWriter(str(directory / names[-1]), mtime=0)  # byte-identical reruns
        sample = {"__key__": f"{i:09d}"}
        for name, dtype in ROW_FIELDS.items():
            sample[f"{name}.npy"] = _npy_bytes(np.asarray(row[name], dtype=dtype))
        writer.write(sample)
    if writer is not None:
        writer.close()
    return names


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def iter_rows(directory: Path) -> Iterator[dict[str, np.ndarray]]:
    """Rows of every shard in `directory`, in order (shards sorted by name)."""
    import tarfile

    shards = sorted(directory.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar files in {directory}")
    for shard in shards:
        with tarfile.open(shard) as tar:
            sample: dict[str, np.ndarray] = {}
            key = None
            for member in tar:
                stem, _, field_ext = member.name.partition(".")
                if key is not None and stem != key:
                    yield sample
                    sample = {}
                key = stem
                data = tar.extractfile(member).read()
                sample[field_ext.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
            if sample:
                yield sample


def load_rows(directory: Path) -> dict[str, np.ndarray]:
    """All rows stacked: {field: [N, S]} (small datasets: tiny runs, eval, calibration)."""
    rows = list(iter_rows(directory))
    return {name: np.stack([r[name] for r in rows]) for name in ROW_FIELDS}


# ---------------------------------------------------------------------- jsonl + tokenizer
def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_tokenizer(dataset_dir: Path):
    """The dataset's tokenizer (`tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer

    path = Path(dataset_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the dataset artifact has no tokenizer")
    return Tokenizer.from_file(str(path))
