"""The post-training loop every Ray Train worker runs; SFT and DPO plug in an `Objective`.

Examples are visited in a deterministic, resumable order: epoch `e` is a permutation of
the examples drawn from (seed, e); step `t` takes stream positions [t * B, (t + 1) * B)
and worker `r` of W its contiguous B / W of them. The cursor (examples consumed, t * B)
is saved with the model, optimizer, step and RNG, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from ernie.checkpoint import load_pretrained, save_pretrained
from ernie.lora import merge_lora
from stages.training import train_state
from stages.training.optim import build_optimizer, lr_at, set_lr
from stages.training.parallel import wrap_ddp

HISTORY_FILE = "history.json"


class Objective(Protocol):
    """What SFT and DPO define: how a batch is built, trained on and evaluated.

    An objective may instead define `make_batch(loop, step)` to build step `step`'s batch itself
    (RLVR and UPO sample it from the policy).
    """

    def setup(self, loop: WorkerLoop) -> None:
        """Before the train state is restored (the model is still the input checkpoint)."""

    def collate(self, examples: list, device: torch.device) -> dict[str, torch.Tensor]: ...

    def loss(self, model, batch: dict, loop: WorkerLoop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, per-rank metric tensors averaged over ranks for the log)."""

    def evaluate(self, loop: WorkerLoop) -> dict[str, float]:
        """Evaluation metrics, named `val_*` for the validation set (collective: every rank calls it)."""


@dataclass
class Job:
    """What every worker gets (picklable; examples travel through the Ray object store)."""

    config: Any
    objective: Objective
    ckpt_dir: str
    seed: int
    train: Any  # ray.ObjectRef of a list of examples
    val: Any
    state_dir: str
    fingerprint: dict
    sink: Any = None


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point: train to `config.steps`, resuming from the train state if there is one."""
    job = loop_config["job"]
    loop = WorkerLoop(dataclasses.replace(job, sink=loop_config.get("sink", job.sink)))
    cfg = loop.cfg
    if loop.step == 0:
        loop.record(0, loop.evaluate(), "val")
    elif loop.rank == 0 and loop.job.sink is not None:
        loop.job.sink.put_nowait((loop.step, {"resumed_from_step": float(loop.step)}))
    while loop.step < cfg.steps:
        loop.record(loop.step + 1, loop.train_step(), "train")
        if loop.step % cfg.eval_every == 0 and loop.step < cfg.steps:
            loop.record(loop.step, loop.evaluate(), "val")
        if loop.step % cfg.checkpoint_every == 0 and loop.step < cfg.steps:
            loop.save_state()
    loop.finish()


class WorkerLoop:
    """Model, optimizer, examples and history of one rank."""

    def __init__(self, job: Job) -> None:
        import ray
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.job, self.cfg, self.objective = job, job.config, job.objective
        torch.manual_seed(job.seed)
        self.train_examples, self.val_examples = ray.get(job.train), ray.get(job.val)
        self.model = load_pretrained(job.ckpt_dir, device=self.device)
        self.model.train()
        self.step = 0
        self.history: dict[str, list] = {"train": [], "val": []}
        self.objective.setup(self)
        self.optimizer = build_optimizer(
            self.model, self.cfg.lr, self.cfg.weight_decay, (self.cfg.beta1, self.cfg.beta2)
        )
        state = train_state.load(Path(job.state_dir), job.fingerprint)
        if state is not None:
            self._restore(state)
        self.ddp = wrap_ddp(self.model, self.device)

    # ------------------------------------------------------------------ helpers for objectives
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def my_share(self, count: int) -> list[np.ndarray]:
        """This rank's indices of the first `count` examples, in chunks of the per-rank batch size."""
        mine = np.arange(count)[self.rank :: self.world]
        per_batch = max(self.cfg.batch_size // self.world, 1)
        return [mine[i : i + per_batch] for i in range(0, len(mine), per_batch)]

    def eval_count(self, examples: list) -> int:
        return min(self.cfg.eval_examples or len(examples), len(examples))

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().float().clone()
        dist.all_reduce(values)
        return values

    # ------------------------------------------------------------------ steps
    def batch_indices(self, step: int) -> np.ndarray:
        """This rank's example indices for step `step` (1-based)."""
        per_worker = self.cfg.batch_size // self.world
        start = (step - 1) * self.cfg.batch_size + self.rank * per_worker
        positions = np.arange(start, start + per_worker)
        epochs, offsets = np.divmod(positions, len(self.train_examples))
        return np.array([self._epoch(int(e))[o] for e, o in zip(epochs, offsets, strict=True)])

    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.job.seed, epoch]).permutation(len(self.train_examples))

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step + 1
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction)
        set_lr(self.optimizer, lr)
        make_batch = getattr(self.objective, "make_batch", None)  # objectives that sample their own batches (RL)
        if make_batch is not None:
            batch = make_batch(self, step)
        else:
            batch = self.objective.collate([self.train_examples[i] for i in self.batch_indices(step)], self.device)
        started = time.perf_counter()
        loss, metrics = self.objective.loss(self.ddp, batch, self)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = ["loss", *metrics]
        averaged = self.all_sum(torch.stack([loss.detach(), *metrics.values()])) / self.world
        self.step = step
        seconds = time.perf_counter() - started
        return dict(zip(names, averaged.tolist(), strict=True)) | {
            "lr": lr,
            "grad_norm": float(grad_norm),
            "examples_per_s": cfg.batch_size / seconds,
        }

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.objective.evaluate(self)
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ bookkeeping (rank 0)
    def record(self, step: int, metrics: dict[str, float], kind: str) -> None:
        if self.rank != 0:
            return
        entries = self.history[kind]
        if entries and entries[-1]["step"] == step:  # a rerun of a finished run evaluates again
            entries.pop()
        entries.append({"step": step, **metrics})
        if self.job.sink is not None:
            self.job.sink.put_nowait((step, metrics))

    def save_state(self) -> None:
        if self.rank != 0:
            return
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "cursor": self.step * self.cfg.batch_size,
            "rng": train_state.rng_state(),
            "history": self.history,
            "fingerprint": self.job.fingerprint,
        }
        train_state.save(Path(self.job.state_dir), state)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]
        assert state["cursor"] == self.step * self.cfg.batch_size, "data cursor and step disagree"
        train_state.set_rng_state(state["rng"])

    def finish(self) -> None:
        """Final validation, then rank 0 hands Ray Train the HF checkpoint + train state."""
        import ray.train

        final = self.evaluate()
        self.record(self.step, final, "val")
        summary = self.summary(final)
        if self.rank != 0:
            ray.train.report(summary)
            return
        self.save_state()
        merge_lora(self.model)  # adapters, if any, become part of the exported weights
        with tempfile.TemporaryDirectory() as tmp:
            save_pretrained(self.model, tmp)
            shutil.copytree(self.job.state_dir, Path(tmp) / "train_state")
            (Path(tmp) / "train_state" / HISTORY_FILE).write_text(json.dumps(self.history) + "\n")
            ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def summary(self, final: dict[str, float]) -> dict[str, float]:
        """Final and initial validation metrics, and the last train metrics averaged over 10 steps."""
        out = {"steps": float(self.step), **final}
        if self.history["val"]:
            out.update({f"{k}_initial": v for k, v in self.history["val"][0].items() if k != "step"})
        recent = self.history["train"][-10:]
        for name in recent[0] if recent else []:
            if name != "step":
                out[f"train_{name}_last10"] = float(np.mean([entry[name] for entry in recent]))
        return out
