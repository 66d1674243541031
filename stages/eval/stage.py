"""The eval stage's run (the package's docstring says what it does)."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch

from ernie.evaluation import perplexity, val_loss
from ernie.quant import is_quantized_dir, load_model
from ernie.tasks import accuracy_by_task, balanced_items, task_predictions
from pipeline.contract import StageContext, StageResult, UserError
from pipeline.formats import TOKENIZER_FILE, read_jsonl
from pipeline.shards import iter_rows

from .config import Config

INPUTS = {"model": "ckpt", "dataset": "dataset"}
"""`model` may be a ckpt or a qckpt (ACCEPTED_KINDS); eval tells them apart by quant_config.json."""
ACCEPTED_KINDS = {"model": ("ckpt", "qckpt"), "dataset": ("dataset",)}
OUTPUT_KIND = "eval"
TASKS_FILE = "tasks/val.jsonl"


def find_tokenizer(*dirs: Path) -> Path:
    """The first tokenizer.json found in a model dir's tokenizer/ or a dataset's tokenizer/ (or the dir itself)."""
    for d in dirs:
        for candidate in (Path(d) / TOKENIZER_FILE, Path(d) / "tokenizer.json"):
            if candidate.is_file():
                return candidate
    raise UserError(f"no tokenizer.json under {', '.join(map(str, dirs))} (looked in tokenizer/ and the dir itself)")


def evaluate(model, tokenizer, dataset_dir: Path, cfg: Config) -> tuple[dict[str, float], dict]:
    """(metrics, details) of `model` on the dataset's val rows and task items."""
    t0 = time.perf_counter()
    rows = list(itertools.islice(iter_rows(dataset_dir / "val"), cfg.max_rows or None))
    loss, tokens = val_loss(model, rows, cfg.batch_size)
    metrics = {"val_loss": loss, "val_ppl": perplexity(loss)}
    details: dict = {"val_rows": len(rows), "val_tokens": tokens}
    tasks_path = dataset_dir / TASKS_FILE
    if tasks_path.is_file():
        items = balanced_items(read_jsonl(tasks_path), cfg.max_items)
        predictions = task_predictions(model, tokenizer, items, cfg.batch_size, cfg.max_new_tokens)
        per_task, counts = accuracy_by_task(items, predictions)
        correct = sum(per_task[t] * counts[t] for t in counts)
        metrics["task_accuracy"] = correct / max(1, len(items))
        metrics.update({f"task_accuracy/{t}": acc for t, acc in per_task.items()})
        details["task_items"] = counts
        details["examples"] = [
            {"task": it["task"], "prompt": it["prompt"][-1]["content"], "answer": it["answer"], "prediction": p}
            for it, p in zip(items[: cfg.num_examples], predictions, strict=False)
        ]
    details["seconds"] = time.perf_counter() - t0
    return metrics, details


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    if cfg.batch_size <= 0 or cfg.max_new_tokens <= 0 or cfg.max_rows < 0 or cfg.max_items < 0:
        raise UserError("eval.batch_size and eval.max_new_tokens must be > 0, eval.max_rows and eval.max_items >= 0")
    model_dir, dataset_dir = ctx.input("model").local_dir(), ctx.input("dataset").local_dir()
    torch.manual_seed(ctx.seed)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(find_tokenizer(model_dir, dataset_dir)))
    model = load_model(model_dir)
    ctx.progress.set_total(1, "evaluating")
    metrics, details = evaluate(model, tokenizer, dataset_dir, cfg)
    ctx.progress.update(1)
    kind = "qckpt" if is_quantized_dir(model_dir) else "ckpt"
    out = Path(ctx.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model_kind": kind, "metrics": metrics, **{k: v for k, v in details.items() if k != "seconds"}}
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    ctx.log.metrics(metrics)
    acc = f", task accuracy {metrics['task_accuracy']:.1%}" if "task_accuracy" in metrics else ""
    summary = f"{kind}: val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.3f}){acc}"
    return StageResult(metrics=metrics, summary=summary, extra={"eval_seconds": details["seconds"]})
