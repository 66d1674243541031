"""Pretraining: the packed rows of a dataset artifact -> an HF-layout checkpoint.

    python -m pipeline run conf=tiny until=pretrain pretrain.steps=300

Ray Train `TorchTrainer` runs `num_workers` data-parallel ranks (DDP; gloo on CPU, NCCL on
GPU). AdamW with warmup + cosine decay, gradient clipping, LM + router losses; validation
loss every `eval_every` steps. Rank 0 writes the resumable train state to
`<work_dir>/train_state/` every `checkpoint_every` steps; a rerun with the same cache key
(same work dir) resumes from it exactly (step, LR, RNG, optimizer, data cursor), and so
does a worker group that Ray Train restarts after a worker died. The work dir must be
visible to rank 0 and to every rank on resume (one node, or a shared filesystem).

Output (ckpt): config.json, model.safetensors, generation_config.json, tokenizer/ (copied
from the dataset), train_state/ (the final train state and its metric history).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.contract import StageContext, StageResult, UserError
from stages.training.launch import copy_checkpoint, ensure_ray, fit, relay

from .config import Config
from .data import load_split
from .loop import HISTORY_FILE, Job, train_worker
from .plots import loss_curve, router_heatmap
from .router_stats import RouterLoad

INPUTS = {"dataset": "dataset"}
OUTPUT_KIND = "ckpt"

__all__ = ["Config", "INPUTS", "OUTPUT_KIND", "run"]


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate()
    dataset_dir = ctx.input("dataset").local_dir()
    tokenizer_dir = _tokenizer_dir(dataset_dir)
    train_rows, val_rows = load_split(dataset_dir, "train"), load_split(dataset_dir, "val")
    _check_rows(train_rows, val_rows, ctx.model.vocab_size, cfg.batch_size)
    work_dir = ctx.work_dir or ctx.output_dir.parent / f".{ctx.output_dir.name}.work"

    import ray

    ensure_ray()
    job = Job(
        config=cfg,
        model=ctx.model,
        seed=ctx.seed,
        train_rows=ray.put(train_rows),
        val_rows=ray.put(val_rows),
        state_dir=str(work_dir / "train_state"),
        fingerprint={"pretrain": cfg.fingerprint(), "model": ctx.model.to_dict(), "seed": ctx.seed},
    )
    ctx.log.params({"rows_train": len(train_rows["input_ids"]), "seq_len": train_rows["input_ids"].shape[1]})
    ctx.progress.set_total(cfg.steps, "pretraining")
    result = fit(
        train_worker,
        {"job": job},
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.resources.num_gpus,
        max_failures=cfg.max_failures,
        storage=work_dir / "ray",
        on_message=relay(ctx, loss_key="loss"),
    )
    copy_checkpoint(result, ctx.output_dir, work_dir / "ray")
    shutil.copytree(tokenizer_dir, ctx.output_dir / "tokenizer", dirs_exist_ok=True)
    _log_figures(ctx, ctx.output_dir / "train_state" / HISTORY_FILE)
    metrics = dict(result.metrics)
    summary = (
        f"{int(metrics['steps'])} steps: train loss {metrics['loss_first']:.3f} -> {metrics['loss_last10']:.3f}, "
        f"val loss {metrics['val_loss_initial']:.3f} -> {metrics['val_loss']:.3f}, "
        f"{metrics['tokens_per_s']:.0f} tokens/s"
    )
    return StageResult(metrics=metrics, summary=summary)


def _tokenizer_dir(dataset_dir: Path) -> Path:
    tokenizer_dir = dataset_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"the dataset artifact at {dataset_dir} has no tokenizer/tokenizer.json; rerun the data stage")
    return tokenizer_dir


def _check_rows(train_rows: dict, val_rows: dict, vocab_size: int, batch_size: int) -> None:
    largest = int(max(train_rows["input_ids"].max(), val_rows["input_ids"].max()))
    if largest >= vocab_size:
        raise UserError(
            f"the dataset has token id {largest} but model.vocab_size={vocab_size}; "
            "data.vocab_size and model.vocab_size must match"
        )
    rows = len(train_rows["input_ids"])
    if rows < batch_size:
        raise UserError(f"pretrain.batch_size={batch_size} is larger than the {rows} train rows of the dataset")


def _log_figures(ctx: StageContext, history_file: Path) -> None:
    import matplotlib.pyplot as plt

    history = json.loads(history_file.read_text())
    figures = {"loss_curve.png": loss_curve(history)}
    if history.get("router"):
        figures["router_load.png"] = router_heatmap(history, RouterLoad(ctx.model, device="cpu").names)
    for name, figure in figures.items():
        ctx.log.figure(figure, name)
        plt.close(figure)
