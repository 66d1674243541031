"""The pretraining corpus: documents from each source, deduplicated, shuffled, split.

Sources are mixed by a seeded shuffle, so every shard holds both real text and arithmetic
in proportion. The train/val split hashes each document's text, not its position: a
document stays on the same side whatever the seed or the corpus size.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

STDLIB, ARITHMETIC = "stdlib-docs", "arithmetic"


@dataclass
class Document:
    """One corpus document on its way to the shards."""

    id: int
    """Global index; becomes the row's `document_ids` value."""
    source: str
    text: str
    split: str = "train"
    modality: str = "text"
    tokens: list[int] | None = None
    """bos + tokens + eos, filled in once the tokenizer exists."""


def build_corpus(sources: dict[str, list[str]], val_fraction: float, rng: random.Random) -> list[Document]:
    """Deduplicate across sources (first source wins), shuffle, number and split the documents."""
    seen: set[str] = set()
    pairs = []
    for source, texts in sources.items():
        for text in texts:
            if text not in seen:
                seen.add(text)
                pairs.append((source, text))
    rng.shuffle(pairs)
    documents = [Document(i, source, text) for i, (source, text) in enumerate(pairs)]
    for doc in documents:
        doc.split = "val" if split_point(doc.text) < val_fraction else "train"
    _make_both_splits_nonempty(documents)
    return documents


def split_point(text: str) -> float:
    """A stable number in [0, 1) from the text; below `val_fraction` means validation."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _make_both_splits_nonempty(documents: list[Document]) -> None:
    """Tiny corpora can hash everything to one side; move the closest document over."""
    if len(documents) < 2:
        return
    if all(d.split == "train" for d in documents):
        min(documents, key=lambda d: split_point(d.text)).split = "val"
    elif all(d.split == "val" for d in documents):
        max(documents, key=lambda d: split_point(d.text)).split = "train"


def sample_documents(texts: list[str], cap: int, rng: random.Random) -> list[str]:
    """At most `cap` of `texts`, chosen by `rng`, kept in their original order."""
    if len(texts) <= cap:
        return list(texts)
    keep = sorted(rng.sample(range(len(texts)), cap))
    return [texts[i] for i in keep]


def holdout_split(records: list[dict], val_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, val) of already-shuffled generated records; val gets at least one when possible."""
    n_val = round(len(records) * val_fraction)
    if len(records) >= 2:
        n_val = max(1, n_val)
    return records[n_val:], records[:n_val]
