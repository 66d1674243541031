"""On-disk formats of the artifacts that stages hand each other (part of the stage contract).

dataset artifact:
    tokenizer/tokenizer.json        HF `tokenizers` file (special tokens: ernie.chat_template)
    train/index.json                the split's table of contents, written last (`pipeline.shards`)
    train/shard-00000.tar ...       tar shards of packed rows in the webdataset layout (`pipeline.shards`)
    val/index.json, val/shard-00000.tar ...
    sft/{train,val}.jsonl           {"messages": [{"role", "content"}...]}
    preferences/{train,val}.jsonl   {"prompt": [...messages], "chosen": str, "rejected": str}
    tasks/val.jsonl                 {"task", "prompt": [...messages], "answer": str}  (eval)
    stats.json                      token-balance and packing statistics

Only the stdlib and tokenizers here: GPU machines without Ray, MLflow or Hydra import this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

TOKENIZER_FILE = "tokenizer/tokenizer.json"
IMAGE_SETTINGS = "images/settings.json"
"""In a dataset with chats that hold images (images/...): the resize bounds the data stage used."""


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file; a line that is not a JSON object (or not UTF-8) is a `ValueError`
    naming the file and the line."""
    records: list[dict] = []
    number = 0
    with Path(path).open(encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    records.append(_object(line, path, number))
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: invalid UTF-8 after line {number} ({err.reason})") from None
    return records


def _object(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than the parser's stack
        raise ValueError(f"{path}:{number}: invalid JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def load_tokenizer(dataset_dir: Path):
    """The dataset's tokenizer (`tokenizers.Tokenizer`)."""
    from tokenizers import Tokenizer

    path = Path(dataset_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the dataset artifact has no tokenizer")
    return Tokenizer.from_file(str(path))
