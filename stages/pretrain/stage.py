"""The pretrain stage's run: checks the dataset, starts the Ray Train workers (`loop.train_worker`), copies the
final checkpoint and logs the curves (the package's docstring says what it does)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ernie import ErnieConfig
from pipeline.contract import StageContext, StageResult, UserError
from pipeline.formats import load_tokenizer
from pipeline.shards import IMAGE_LAYOUT, ShardError, ShardIndex, read_index
from stages.training import train_state
from stages.training.launch import check_cluster, copy_checkpoint, fit, relay

from .config import Config
from .data import TrainReader, unit_rows_for
from .loop import HISTORY_FILE, Job, train_worker
from .plots import loss_curve, router_heatmap
from .router_stats import RouterLoad

INPUTS = {"dataset": "dataset"}
OUTPUT_KIND = "ckpt"

__all__ = ["Config", "INPUTS", "OUTPUT_KIND", "run"]


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    cfg.validate()
    dataset = ctx.input("dataset")
    dataset_dir = dataset.local_dir()
    tokenizer_dir = _tokenizer_dir(dataset_dir)
    work_dir = ctx.work_dir or ctx.output_dir.parent / f".{ctx.output_dir.name}.work"
    state_dir = f"{ctx.state_uri}/train_state" if ctx.state_uri else str(work_dir / "train_state")
    streams = _data_streams(cfg, state_dir)
    unit_rows = _check_dataset(ctx, dataset_dir, streams)

    check_cluster(cfg.requested(), "pretrain")
    job = Job(
        config=cfg,
        model=ctx.model,
        seed=ctx.seed,
        # a remote artifact's URL: every worker streams its shards from the store itself, on whichever
        # node it runs (this process's copy is on this node's disk only)
        dataset_dir=dataset.uri if "://" in dataset.uri else str(dataset_dir),
        unit_rows=unit_rows,
        data_streams=streams,
        state_dir=state_dir,
        fingerprint={
            "pretrain": cfg.fingerprint() | {"data_streams": streams},
            "model": ctx.model.to_dict(),
            "seed": ctx.seed,
            "unit_rows": unit_rows,
        },
    )
    ctx.progress.set_total(cfg.steps, "pretraining")
    storage = f"{ctx.state_uri}/ray" if ctx.state_uri else work_dir / "ray"  # Ray Train's: every node reaches it
    result = fit(
        train_worker,
        {"job": job},
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.resources.num_gpus,
        max_failures=cfg.max_failures,
        storage=storage,
        on_message=relay(ctx, loss_key="loss"),
    )
    copy_checkpoint(result, ctx.output_dir, storage)
    shutil.copytree(tokenizer_dir, ctx.output_dir / "tokenizer", dirs_exist_ok=True)
    _log_figures(ctx, ctx.output_dir / "train_state" / HISTORY_FILE)
    metrics = dict(result.metrics)
    summary = (
        f"{int(metrics['steps'])} steps: train loss {metrics['loss_first']:.3f} -> {metrics['loss_last10']:.3f}, "
        f"val loss {metrics['val_loss_initial']:.3f} -> {metrics['val_loss']:.3f}, "
        f"{metrics['tokens_per_s']:.0f} tokens/s"
    )
    return StageResult(metrics=metrics, summary=summary)


def _data_streams(cfg: Config, state_dir: str) -> int:
    """The run's data streams: as configured, else those its train state was written with, else the workers."""
    meta = train_state.read_meta(state_dir)
    recorded = meta["fingerprint"]["pretrain"].get("data_streams") if meta else None
    streams = cfg.data_streams or recorded or cfg.ranks
    cfg.check_streams(streams)
    return streams


def _tokenizer_dir(dataset_dir: Path) -> Path:
    tokenizer_dir = dataset_dir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise UserError(f"the dataset artifact at {dataset_dir} has no tokenizer/tokenizer.json; rerun the data stage")
    return tokenizer_dir


def _check_dataset(ctx: StageContext, dataset_dir: Path, streams: int) -> int:
    """Check that the dataset can feed this model and these workers; returns the train rows per shuffle unit."""
    cfg: Config = ctx.config
    train = _read_split(dataset_dir, "train", ctx.model)
    _read_split(dataset_dir, "val", ctx.model)
    _check_vocab(dataset_dir, ctx.model.vocab_size)
    micro_batch = cfg.batch_size // cfg.ranks
    unit_rows, note = unit_rows_for(dataset_dir, train, cfg.batch_size // streams)
    if note:
        logging.getLogger(__name__).warning(note)
        ctx.log.text(note, "data_note.txt")
    reader = TrainReader(
        str(dataset_dir / "train"), 0, cfg.ranks, ctx.seed, cfg.shuffle_buffer, micro_batch, streams=streams
    )
    try:
        steps_per_epoch = reader.steps_in_epoch(0)
    except ValueError as err:  # too few shards for the workers, or too few rows for a micro-batch
        raise UserError(
            f"the train split of {dataset_dir} cannot feed {streams} data streams (pretrain.num_workers="
            f"{cfg.num_workers}) with pretrain.batch_size={cfg.batch_size}: {err}"
        ) from None
    ctx.log.params(
        {
            "rows_train": train.rows,
            "seq_len": train.seq_len,
            "steps_per_epoch": steps_per_epoch,
            "unit_rows": unit_rows,
            "data_streams": streams,
        }
    )
    return unit_rows


def _read_split(dataset_dir: Path, split: str, model: ErnieConfig) -> ShardIndex:
    """The split's index, checked to be readable and of the model's kind (text or VL)."""
    try:
        index = read_index(dataset_dir / split)
    except FileNotFoundError:
        raise UserError(
            f"the dataset artifact at {dataset_dir} has no {split} split ({split}/index.json and "
            f"{split}/shard-*.tar are missing); rerun the data stage"
        ) from None
    except ShardError as err:
        raise UserError(f"the dataset artifact at {dataset_dir} has an unreadable {split} split: {err}") from None
    images, vl_model = index.fields == IMAGE_LAYOUT, model.vision is not None
    if images and not vl_model:
        raise UserError(
            f"the dataset artifact at {dataset_dir} holds image rows (a VL dataset) but model {model.name} is a "
            "text model: pretrain a VL model (e.g. model=tiny_vl) or rebuild the dataset with this one"
        )
    if vl_model and not images:
        raise UserError(
            f"the dataset artifact at {dataset_dir} holds text rows but model {model.name} is a VL model: rebuild "
            "the dataset with this model (the data stage writes image rows for VL models)"
        )
    return index


def _check_vocab(dataset_dir: Path, vocab_size: int) -> None:
    try:
        tokens = load_tokenizer(dataset_dir).get_vocab_size(with_added_tokens=True)
    except Exception as err:  # tokenizers raises its own exception type for a bad file
        raise UserError(f"the tokenizer of the dataset artifact at {dataset_dir} cannot be read: {err}") from None
    if tokens > vocab_size:
        raise UserError(
            f"the dataset's tokenizer has {tokens} tokens but model.vocab_size={vocab_size}; "
            "data.vocab_size and model.vocab_size must match"
        )


def _log_figures(ctx: StageContext, history_file: Path) -> None:
    import matplotlib.pyplot as plt

    history = json.loads(history_file.read_text())
    figures = {"loss_curve.png": loss_curve(history)}
    if history.get("router"):
        figures["router_load.png"] = router_heatmap(history, RouterLoad(ctx.model, device="cpu").names)
    for name, figure in figures.items():
        ctx.log.figure(figure, name)
        plt.close(figure)
