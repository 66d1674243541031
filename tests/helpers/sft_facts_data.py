"""A dataset artifact where SFT's gain in exact match is measurable on the tiny presets.

The fact universe is small: the 155 single-digit additions and subtractions (`SMALL_FACTS`).
Pretraining text states every fact many times, in the two text formats of `training_data`
("3 + 4 = 7." and "Question: What is 3 + 4? Answer: 7."), so a tiny model memorises them.
The facts are split three ways: SFT train chats, SFT val chats, and the held-out facts of
tasks/val.jsonl, which appear in pretraining text but in no SFT chat. Exact match on the
held-out facts then measures SFT turning pretrained knowledge into chat answers: the
pretrained model continues text instead of answering, the tuned one answers.

`scramble_answers=True` writes the same artifact with the SFT train answers shuffled across
the questions (same chats, same answer distribution, wrong pairing): a control whose SFT
teaches the chat format but no fact.
"""

from __future__ import annotations

import random
from pathlib import Path

from training_data import BOS_ID, EOS_ID, SMALL_FACTS, _chat, _pack

from ernie.chat_template import render
from pipeline.formats import TOKENIZER_FILE, write_jsonl
from pipeline.shards import write_row_shards
from stages.data.tokenizer import train_bpe

Fact = tuple[int, str, int, int]
TEXT_FORMATS = ("{a} {op} {b} = {c}.", "Question: What is {a} {op} {b}? Answer: {c}.")
HELD_OUT, SFT_VAL = 60, 15
"""Facts held out of SFT (tasks/val.jsonl) and facts of the SFT val chats; SFT trains on the other 80."""


def split_facts(held_out: int = HELD_OUT, sft_val: int = SFT_VAL) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """(sft train, sft val, held-out) facts: a seeded partition of `SMALL_FACTS`."""
    facts = list(SMALL_FACTS)
    random.Random(0).shuffle(facts)
    return facts[held_out + sft_val :], facts[held_out : held_out + sft_val], facts[:held_out]


def _document(rng: random.Random, lines: int) -> str:
    picked = (rng.choice(SMALL_FACTS) for _ in range(lines))
    return "\n".join(rng.choice(TEXT_FORMATS).format(a=a, op=op, b=b, c=c) for a, op, b, c in picked)


def build_dataset(
    root: Path,
    seq_len: int = 128,
    documents: int = 1200,
    held_out: int = HELD_OUT,
    sft_val: int = SFT_VAL,
    sft_repeats: int = 4,
    scramble_answers: bool = False,
    vocab_size: int = 320,
) -> Path:
    """Write the artifact under `root` and return it (deterministic: everything is seeded)."""
    rng = random.Random(0)
    texts = [_document(rng, rng.randint(4, 10)) for _ in range(documents)]
    # the chat template's own words ("User", "Assistant") get tokens too; no pretraining document holds them
    template = render([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
    tokenizer = train_bpe([*texts, *[template] * 50], vocab_size, min_frequency=0)
    (root / TOKENIZER_FILE).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(root / TOKENIZER_FILE))
    docs = [[BOS_ID, *enc.ids, EOS_ID] for enc in tokenizer.encode_batch(texts)]
    rows = _pack(docs, seq_len)
    n_val = max(len(rows) // 32, 4)
    write_row_shards(rows[n_val:], root / "train", rows_per_shard=64)
    write_row_shards(rows[:n_val], root / "val", rows_per_shard=64)

    sft_train, sft_val_facts, held = split_facts(held_out, sft_val)
    answers = [c for *_, c in sft_train]
    if scramble_answers:
        random.Random(1).shuffle(answers)
    train_chats = [
        {"messages": _chat(a, op, b, str(answer))}
        for _ in range(sft_repeats)
        for (a, op, b, _), answer in zip(sft_train, answers, strict=True)
    ]
    rng.shuffle(train_chats)
    write_jsonl(root / "sft" / "train.jsonl", train_chats)
    write_jsonl(root / "sft" / "val.jsonl", ({"messages": _chat(a, op, b, str(c))} for a, op, b, c in sft_val_facts))
    tasks = (
        {"task": "add" if op == "+" else "sub", "prompt": _chat(a, op, b, "")[:1], "answer": str(c)}
        for a, op, b, c in held
    )
    write_jsonl(root / "tasks" / "val.jsonl", tasks)
    return root
