"""A small synthetic dataset artifact for the training-stage tests (built in a few seconds).

Arithmetic statements tokenised by a byte-level BPE (digits split, ERNIE's special tokens
first: pad=0, bos=1, eos=2), packed into rows of `seq_len` tokens; SFT chats and
preference pairs about the same facts, and verifiable prompts (rlvr/) with their answers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from pipeline.formats import TOKENIZER_FILE, write_jsonl
from pipeline.shards import write_row_shards
from stages.data.tokenizer import train_bpe

BOS_ID, EOS_ID = 1, 2
SMALL_FACTS = [(a, "+", b, a + b) for a in range(10) for b in range(10)]
SMALL_FACTS += [(a, "-", b, a - b) for a in range(10) for b in range(a + 1)]


def _facts(rng: random.Random, n: int) -> list[tuple[int, str, int, int]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            out.append((a, "+", b, a + b))
        else:
            a, b = max(a, b), min(a, b)
            out.append((a, "-", b, a - b))
    return out


def _document(rng: random.Random) -> str:
    lines = []
    for a, op, b, c in _facts(rng, rng.randint(3, 8)):
        lines.append(rng.choice([f"{a} {op} {b} = {c}.", f"Question: What is {a} {op} {b}? Answer: {c}."]))
    return "\n".join(lines)


def _pack(docs: list[list[int]], seq_len: int) -> list[dict[str, np.ndarray]]:
    stream_ids, stream_docs = [], []
    for d, ids in enumerate(docs):
        stream_ids += ids
        stream_docs += [d] * len(ids)
    rows = []
    for start in range(0, len(stream_ids) - seq_len + 1, seq_len):
        ids = np.array(stream_ids[start : start + seq_len])
        doc = np.array(stream_docs[start : start + seq_len])
        doc = doc - doc[0]
        boundary = np.r_[True, doc[1:] != doc[:-1]]
        starts = np.maximum.accumulate(np.where(boundary, np.arange(seq_len), 0))
        rows.append(
            {
                "input_ids": ids,
                "labels": ids,
                "document_ids": doc,
                "position_ids": np.arange(seq_len) - starts,
                "modality_ids": np.zeros(seq_len),
            }
        )
    return rows


def _chat(a: int, op: str, b: int, answer: str) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} {op} {b}?"}, {"role": "assistant", "content": answer}]


def _wrong(c: int, rng: random.Random) -> int:
    """A plausible slip: off by one, two or ten."""
    return rng.choice([x for x in (c - 2, c - 1, c + 1, c + 2, c + 10) if x >= 0])


def build_dataset(root: Path, seq_len: int = 128, documents: int = 600, vocab_size: int = 320) -> Path:
    """Write the artifact under `root` and return it; the tokenizer vocabulary is `vocab_size`."""
    rng = random.Random(0)
    texts = [_document(rng) for _ in range(documents)]
    tokenizer = train_bpe(texts, vocab_size, min_frequency=0)
    (root / TOKENIZER_FILE).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(root / TOKENIZER_FILE))
    docs = [[BOS_ID, *enc.ids, EOS_ID] for enc in tokenizer.encode_batch(texts)]
    rows = _pack(docs, seq_len)
    n_val = max(len(rows) // 16, 4)
    write_row_shards(rows[n_val:], root / "train", rows_per_shard=64)
    write_row_shards(rows[:n_val], root / "val", rows_per_shard=64)
    for split, n in (("train", 400), ("val", 48)):
        facts = _facts(rng, n)
        write_jsonl(root / "sft" / f"{split}.jsonl", ({"messages": _chat(a, op, b, str(c))} for a, op, b, c in facts))
        pairs = (
            {"prompt": _chat(a, op, b, "")[:1], "chosen": str(c), "rejected": str(_wrong(c, rng))}
            for a, op, b, c in facts
        )
        write_jsonl(root / "preferences" / f"{split}.jsonl", pairs)
        # single-digit facts, train and val drawn from the same pool: a tiny model half knows them after SFT
        prompts = (
            {"task": "add" if op == "+" else "sub", "prompt": _chat(a, op, b, "")[:1], "answer": str(c)}
            for a, op, b, c in (rng.choice(SMALL_FACTS) for _ in range(n))
        )
        write_jsonl(root / "rlvr" / f"{split}.jsonl", prompts)
    return root
