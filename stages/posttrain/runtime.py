"""Training plumbing of the post-training stages: schedule, optimizer, train state, Ray Train launch.

The same design as `stages.pretrain` (stages never import each other, so it is repeated
here in one place for SFT and DPO): the learning rate is a pure function of the step;
rank 0 writes `train_state/state.pt` atomically (temporary file, then rename); the stage
process starts a `TorchTrainer` and drains rank 0's (step, metrics) messages from a Ray
queue to log them and move the progress bar.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.contract import UserError

STATE_FILE, META_FILE = "state.pt", "meta.json"
OnMessage = Callable[[int, dict], None]


# ---------------------------------------------------------------------- optimisation
def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then cosine to peak * min_lr_ratio."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak * step / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return peak * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW; 2-D+ weights are decayed, norms, biases and router weights are not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() < 2 or name.endswith("gate.weight") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)


# ---------------------------------------------------------------------- train state
def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), python_gauss],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))


def save_state(directory: Path, state: dict) -> None:
    """Atomically replace `directory/state.pt` (then `meta.json`) with `state`."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{STATE_FILE}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / STATE_FILE)
    meta = {"step": state["step"], "cursor": state["cursor"]}
    (directory / f".{META_FILE}.tmp").write_text(json.dumps(meta) + "\n")
    os.replace(directory / f".{META_FILE}.tmp", directory / META_FILE)


def load_state(directory: Path, fingerprint: dict) -> dict | None:
    """The saved state, or None when there is none; a state of another config is a `UserError`."""
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if json.dumps(state["fingerprint"], sort_keys=True) != json.dumps(fingerprint, sort_keys=True):
        raise UserError(
            f"{directory} holds a train state of a different configuration (step {state['step']}); "
            "delete it to start over, or rerun with the configuration that wrote it"
        )
    return state


# ---------------------------------------------------------------------- Ray Train
def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)


def fit(train_fn: Callable[[dict], None], loop_config: dict, cfg, storage: Path, on_message: OnMessage):
    """Train with `cfg.num_workers` DDP workers; returns Ray Train's `Result`."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    sink = Queue(actor_options={"num_cpus": 0})
    gpus = cfg.resources.num_gpus
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": gpus} if gpus > 0 else {})
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**loop_config, "sink": sink},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=f"run-{uuid.uuid4().hex[:8]}",
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(trainer.fit)
            while not running.done():
                _drain(sink, on_message, timeout=0.5)
            _drain(sink, on_message, timeout=0)
            return running.result()
    finally:
        ray.kill(sink.actor)


def _drain(sink, on_message: OnMessage, timeout: float) -> None:
    from ray.util.queue import Empty

    try:
        message = sink.get(block=timeout > 0, timeout=timeout or None)
        while True:
            on_message(*message)
            message = sink.get_nowait()
    except Empty:
        return


def copy_checkpoint(result, output_dir: Path, storage: Path) -> None:
    """Copy the run's final checkpoint into `output_dir`, then drop Ray Train's copy of the run."""
    if result.checkpoint is None:
        raise RuntimeError("the training run ended without a final checkpoint")
    output_dir.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(output_dir))
    shutil.rmtree(storage, ignore_errors=True)


def relay(ctx) -> OnMessage:
    """Log rank 0's (step, metrics) messages and advance the progress bar to `step`."""
    seen = {"step": 0}

    def on_message(step: int, metrics: dict) -> None:
        ctx.log.metrics(metrics, step=step)
        if step > seen["step"]:
            ctx.progress.update(step - seen["step"], message=f"step {step}")
            seen["step"] = step

    return on_message
