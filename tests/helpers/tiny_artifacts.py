"""Tiny, real upstream artifacts for the quantize / eval / serve stage tests.

`build(root)` writes, once per test session:
    root/dataset   tokenizer/tokenizer.json (byte-level BPE, special tokens 0..4), val/ shards of
                   packed rows (chat documents, prompts masked with -100 in some, and documents
                   the trained model sampled), tasks/val.jsonl (two tasks with known answers)
    root/ckpt      a tiny_moe model briefly trained on the same text (so perplexity means
                   something), HF layout + tokenizer/
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import SPECIAL_TOKENS, render
from ernie.checkpoint import save_pretrained
from pipeline.contract import Artifact, StageContext
from pipeline.formats import write_jsonl
from pipeline.shards import write_row_shards

SEQ_LEN = 64
VOCAB = 320


def chats(n: int, seed: int) -> list[tuple[str, list[dict], str]]:
    """(task, prompt messages, answer) for simple additions and word reversals."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "red", "map", "top", "net", "bus"]
    out = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.append(("add", [{"role": "user", "content": f"{a}+{b}="}], str(a + b)))
        else:
            w = rng.choice(words)
            out.append(("reverse", [{"role": "user", "content": f"reverse {w}"}], w[::-1]))
    return out


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS[:3]] == [0, 1, 2]
    return tok


def pack_rows(docs: list[tuple[list[int], list[int]]], seq_len: int = SEQ_LEN) -> list[dict]:
    """Greedy packing of (ids, labels) documents into rows of seq_len, padded with pad=0 / -100."""
    rows, cur = [], {k: [] for k in ("input_ids", "labels", "document_ids", "position_ids")}

    def flush():
        n = len(cur["input_ids"])
        pad = seq_len - n
        rows.append(
            {
                "input_ids": np.array(cur["input_ids"] + [0] * pad),
                "labels": np.array(cur["labels"] + [-100] * pad),
                "document_ids": np.array(cur["document_ids"] + [max(cur["document_ids"], default=0) + 1] * pad),
                "position_ids": np.array(cur["position_ids"] + list(range(pad))),
                "modality_ids": np.zeros(seq_len, dtype=np.int8),
            }
        )
        for v in cur.values():
            v.clear()

    for ids, labels in docs:
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(cur["input_ids"]) + len(ids) > seq_len:
            flush()
        doc = max(cur["document_ids"], default=-1) + 1
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["document_ids"] += [doc] * len(ids)
        cur["position_ids"] += list(range(len(ids)))
    if cur["input_ids"]:
        flush()
    return rows


def documents(tok, items, mask_prompts: bool) -> list[tuple[list[int], list[int]]]:
    docs = []
    for _, prompt, answer in items:
        prompt_text = render(prompt, add_generation_prompt=True)
        prompt_ids = tok.encode(prompt_text, add_special_tokens=False).ids
        answer_ids = tok.encode(answer + SPECIAL_TOKENS[2], add_special_tokens=False).ids
        ids = prompt_ids + answer_ids
        labels = ([-100] * len(prompt_ids) if mask_prompts else prompt_ids) + answer_ids
        docs.append((ids, labels))
    return docs


def train(model, rows: list[dict], steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])).long() for k in rows[0] if k != "modality_ids"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (16,), generator=gen)
        out = model(
            batch["input_ids"][idx],
            labels=batch["labels"][idx],
            document_ids=batch["document_ids"][idx],
            position_ids=batch["position_ids"][idx],
        )
        opt.zero_grad()
        out.losses["lm"].backward()
        opt.step()
    model.eval()


def sampled_documents(model, count: int, length: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Documents the model itself wrote (temperature 1 from BOS): text it is sure about only
    where its layers make it sure, so any damage to the layers shows in their perplexity."""
    from ernie.generation import generate

    bos = torch.full((count, 1), 1, dtype=torch.long)
    new = generate(model, bos, length - 1, temperature=1.0, eos_token_id=-1, seed=seed)
    return [(ids, ids) for ids in torch.cat([bos, new], dim=1).tolist()]


def build(root: Path, train_steps: int = 100) -> dict[str, Path]:
    """The dataset and checkpoint under `root` (built once; later calls reuse them).

    val rows: 8 packed rows of chat documents (prompts masked with -100 in half of them)
    and 16 rows of two documents the trained model sampled itself."""
    root = Path(root)
    paths = {"dataset": root / "dataset", "ckpt": root / "ckpt"}
    if (root / "done").is_file():
        return paths
    train_items, val_items = chats(400, seed=0), chats(48, seed=1)
    texts = [render(p) + a for _, p, a in train_items] + [
        render(p, add_generation_prompt=True) + a + "\n" for _, p, a in train_items
    ]
    tok = train_tokenizer(texts)
    ds = paths["dataset"]
    (ds / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(ds / "tokenizer" / "tokenizer.json"))
    write_jsonl(ds / "tasks" / "val.jsonl", [{"task": t, "prompt": p, "answer": a} for t, p, a in val_items])

    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe").replace(vocab_size=VOCAB))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and far faster on a busy machine
    try:
        train_rows = pack_rows(documents(tok, train_items, mask_prompts=False))
        train(model, train_rows, train_steps)
        sampled = sampled_documents(model, count=32, length=SEQ_LEN // 2, seed=1)
    finally:
        torch.set_num_threads(threads)
    val_docs = documents(tok, val_items[:24], mask_prompts=False) + documents(tok, val_items[24:], mask_prompts=True)
    write_row_shards(pack_rows(val_docs) + pack_rows(sampled), ds / "val", rows_per_shard=8)
    write_row_shards(train_rows, ds / "train", rows_per_shard=64)  # what the model trained on (calibration)
    save_pretrained(model, paths["ckpt"])
    (paths["ckpt"] / "tokenizer").mkdir(exist_ok=True)
    tok.save(str(paths["ckpt"] / "tokenizer" / "tokenizer.json"))
    (root / "done").write_text("ok")
    return paths


def context(stage: str, config, inputs: dict[str, tuple[str, Path]], output_dir: Path) -> StageContext:
    """A StageContext with local artifacts {name: (kind, dir)} and an in-memory logger."""
    artifacts = {name: Artifact(kind=kind, uri=str(path), cache_key="test") for name, (kind, path) in inputs.items()}
    return StageContext(stage=stage, config=config, model=None, inputs=artifacts, output_dir=Path(output_dir))
