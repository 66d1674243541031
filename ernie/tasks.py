"""Task accuracy: greedy answers to held-out chat prompts, exact match per task.

The one definition the eval stage and the quantize stage (accuracy before / after) both report;
validation loss is `ernie.evaluation`."""

from __future__ import annotations

from collections import defaultdict

import torch

from .chat_template import EOS, render
from .generation import generate


def balanced_items(items: list[dict], limit: int) -> list[dict]:
    """At most `limit` items (0 = all), taken round-robin over tasks so every task keeps items."""
    if not limit or len(items) <= limit:
        return items
    by_task: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_task[item["task"]].append(item)
    queues = [list(reversed(v)) for v in by_task.values()]
    picked: list[dict] = []
    while len(picked) < limit:
        for queue in queues:
            if queue and len(picked) < limit:
                picked.append(queue.pop())
    return picked


def answer_text(tokenizer, new_ids: list[int], eos_id: int) -> str:
    """Generated ids -> the text before the end-of-sentence token, stripped."""
    if eos_id in new_ids:
        new_ids = new_ids[: new_ids.index(eos_id)]
    return tokenizer.decode(new_ids, skip_special_tokens=False).split(EOS)[0].strip()


@torch.no_grad()
def task_predictions(model, tokenizer, items: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy answers to each item's chat prompt (rendered with the generation prompt)."""
    cfg = model.config
    prompts = [
        tokenizer.encode(render(it["prompt"], add_generation_prompt=True), add_special_tokens=False).ids for it in items
    ]
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every row's last token is its prompt's last
            input_ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        new = generate(
            model, input_ids, max_new_tokens=max_new_tokens, attention_mask=mask, eos_token_id=cfg.eos_token_id
        )
        answers += [answer_text(tokenizer, row.tolist(), cfg.eos_token_id) for row in new]
    return answers


def accuracy_by_task(items: list[dict], predictions: list[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Exact match (after strip) per task, and the item count per task."""
    correct: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for item, pred in zip(items, predictions, strict=True):
        counts[item["task"]] += 1
        correct[item["task"]] += int(pred == str(item["answer"]).strip())
    return {t: correct[t] / counts[t] for t in sorted(counts)}, dict(sorted(counts.items()))
