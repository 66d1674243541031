"""The stage-process side shared by SFT and DPO: inputs, tokenizer, launch, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ernie.checkpoint import CheckpointError, load_config
from pipeline.contract import StageContext, UserError
from pipeline.formats import TOKENIZER_FILE
from stages.training import launch
from stages.training.storage import is_remote

from .loop import HISTORY_FILE, Job, train_worker


def input_dirs(ctx: StageContext) -> tuple[Path, Path, Path]:
    """(checkpoint dir, dataset dir, tokenizer dir); a missing or unreadable input is a `UserError`."""
    ckpt_dir = ctx.input("ckpt").local_dir()
    dataset_dir = ctx.input("dataset").local_dir()
    try:
        load_config(ckpt_dir)
    except CheckpointError as err:
        raise UserError(f"stage {ctx.stage}: the input checkpoint is unusable: {err}") from None
    for candidate in (ckpt_dir / "tokenizer", dataset_dir / Path(TOKENIZER_FILE).parent):
        if (candidate / "tokenizer.json").is_file():
            return ckpt_dir, dataset_dir, candidate
    raise UserError(f"stage {ctx.stage}: neither {ckpt_dir}/tokenizer/ nor {dataset_dir}/tokenizer/ has tokenizer.json")


def worker_checkpoint(ctx: StageContext, ckpt_dir: Path) -> str:
    """Where Ray Train workers and rollout actors load the input checkpoint from: its artifact URL under a remote
    root (they may run on another node than this stage, whose local copy is `ckpt_dir`), else `ckpt_dir`."""
    uri = ctx.input("ckpt").uri
    return uri if is_remote(uri) else str(ckpt_dir)


def load_tokenizer(tokenizer_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))


def check_vocab(tokenizer, ckpt_dir: Path, stage: str) -> None:
    vocab = load_config(ckpt_dir).vocab_size
    if tokenizer.get_vocab_size() > vocab:
        raise UserError(
            f"stage {stage}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the checkpoint's "
            f"vocab_size is {vocab}"
        )


def train(ctx: StageContext, objective, ckpt_dir: Path, train_examples: list, val_examples: list, fingerprint: dict):
    """Run the Ray Train job; returns Ray Train's `Result` after the checkpoint is in `ctx.output_dir`."""
    import ray

    cfg = ctx.config
    work_dir = ctx.work_dir or ctx.output_dir.parent / f".{ctx.output_dir.name}.work"
    # under a remote root the train state and Ray Train's storage live there: every node's workers reach them
    state_dir = f"{ctx.state_uri}/train_state" if ctx.state_uri else str(work_dir / "train_state")
    storage = f"{ctx.state_uri}/ray" if ctx.state_uri else work_dir / "ray"
    launch.check_cluster(cfg.requested(), f"posttrain.{ctx.stage}")
    job = Job(
        config=cfg,
        objective=objective,
        ckpt_dir=worker_checkpoint(ctx, ckpt_dir),
        seed=ctx.seed,
        train=ray.put(train_examples),
        val=ray.put(val_examples),
        state_dir=state_dir,
        fingerprint={ctx.stage: fingerprint, "seed": ctx.seed, "ckpt": ctx.input("ckpt").cache_key},
    )
    ctx.progress.set_total(cfg.steps, ctx.stage)
    result = launch.fit(
        train_worker,
        {"job": job},
        num_workers=cfg.num_workers,
        cpus_per_worker=cfg.cpus_per_worker,
        gpus_per_worker=cfg.resources.num_gpus,
        max_failures=cfg.max_failures,
        storage=storage,
        on_message=launch.relay(ctx),
    )
    launch.copy_checkpoint(result, ctx.output_dir, storage)
    return result


def finish_outputs(ctx: StageContext, tokenizer_dir: Path, curves: dict[str, list[str]]) -> None:
    """Copy the tokenizer next to the weights and log one PNG per entry of `curves` (name -> metric keys)."""
    shutil.copytree(tokenizer_dir, ctx.output_dir / "tokenizer", dirs_exist_ok=True)
    history = json.loads((ctx.output_dir / "train_state" / HISTORY_FILE).read_text())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, keys in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            for kind in ("train", "val"):
                points = [(e["step"], e[key]) for e in history[kind] if key in e]
                if points:
                    ax.plot(
                        *zip(*points, strict=True), "o-" if kind == "val" else "-", label=key, linewidth=1, markersize=3
                    )
        ax.set_xlabel("step")
        ax.set_title(f"{ctx.stage}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        ctx.log.figure(fig, f"{name}.png")
        plt.close(fig)


def chat_images(ckpt_dir: Path, dataset_dir: Path):
    """The chats' image loader for a VL checkpoint (None for a text model: a chat with images is then refused)."""
    from .chat import ChatImages

    model = load_config(ckpt_dir)
    if model.vision is None:
        return None
    return ChatImages(dataset_dir, model.vision, model.image_token_id)
