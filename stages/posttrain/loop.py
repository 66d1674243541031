"""The post-training loop every Ray Train worker runs; SFT, DPO, RLVR and UPO plug in an `Objective`.

Examples are visited in a deterministic, resumable order: epoch `e` is a permutation of
the examples drawn from (seed, e); step `t` takes stream positions [t * B, (t + 1) * B)
and worker `r` of W its contiguous B / W of them, run `micro_batch_size` at a time. The
model is spread over the workers as `parallel` says (`stages.training.parallel.Layout`:
FSDP2 shards, or DDP replicas). Every worker writes its shards of the train state (model,
optimizer) with torch.distributed.checkpoint, rank 0 the step, the data cursor (t * B), RNG
and history, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.func import functional_call
from torch.nn.utils import parametrize

from ernie.checkpoint import load_config, load_pretrained, model_from_state_dict, save_pretrained
from ernie.lora import LoRADelta
from stages.training import launch, train_state
from stages.training.accumulate import accumulate
from stages.training.optim import build_optimizer, lr_at, set_lr
from stages.training.parallel import Layout, reshard, shard_fsdp
from stages.training.storage import local_checkpoint

HISTORY_FILE = "history.json"


class Objective(Protocol):
    """What SFT, DPO, RLVR and UPO define: how a step's micro-batches are built, trained on and evaluated.

    An objective may instead define `make_batch(loop, step)` to build step `step`'s micro-batches
    itself (RLVR and UPO sample them from the policy), and `prepare_model(loop)` to change the model
    before it is spread over the workers (SFT's LoRA adapters).
    """

    def setup(self, loop: WorkerLoop) -> None:
        """After the model is spread over the workers, before the train state is restored (the model is
        still the input checkpoint). Collective where it runs the model."""

    def collate(self, examples: list, device: torch.device) -> dict[str, torch.Tensor]: ...

    def micro_batches(self, examples: list, loop: WorkerLoop) -> list:
        """This worker's examples of a step as micro-batches of `loop.micro_batch` examples."""

    def loss(self, model, part, loop: WorkerLoop) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss to minimise, per-rank metric tensors averaged over ranks for the log) of one micro-batch,
        both weighted by its share of the step: summed over the step's micro-batches they are the step's
        loss and metrics. A "loss" metric, if given, is logged instead of the loss (its value where the
        loss to minimise is weighted for its gradient)."""

    def evaluate(self, loop: WorkerLoop) -> dict[str, float]:
        """Evaluation metrics, named `val_*` for the validation set (collective: every rank calls it)."""


@dataclass
class Job:
    """What every worker gets (picklable; examples travel through the Ray object store)."""

    config: Any
    objective: Objective
    ckpt_dir: str
    """The input checkpoint: a local directory (one node), or its artifact URL, which each worker downloads."""
    seed: int
    train: Any  # ray.ObjectRef of a list of examples
    val: Any
    state_dir: str
    fingerprint: dict
    sink: Any = None


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point: train to `config.steps`, resuming from the train state if there is one."""
    import ray
    import ray.train
    import ray.train.torch

    job = loop_config["job"]
    job = dataclasses.replace(job, sink=loop_config.get("sink", job.sink))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    examples = ray.get(job.train), ray.get(job.val)
    loop = WorkerLoop(job, rank, world, ray.train.torch.get_device(), *examples)
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

    def __init__(
        self, job: Job, rank: int, world: int, device: torch.device, train_examples: list, val_examples: list
    ) -> None:
        """Inside an initialised process group of `world` ranks (Ray Train's, or a test's)."""
        self.rank, self.world, self.device = rank, world, device
        self.job, self.cfg, self.objective = job, job.config, job.objective
        torch.manual_seed(job.seed)
        self.train_examples, self.val_examples = train_examples, val_examples
        self.ckpt_dir, self._ckpt_copy = local_checkpoint(job.ckpt_dir)
        self.build_model()
        self.step = 0
        self.history: dict[str, list] = {"train": [], "val": []}
        self.objective.setup(self)
        reshard(self.model)  # setup's forwards (DPO's reference log-probs) left units gathered
        # after sharding: the optimizer holds this rank's shards of the parameters
        self.optimizer = build_optimizer(
            self.model, self.cfg.lr, self.cfg.weight_decay, (self.cfg.beta1, self.cfg.beta2)
        )
        extra = train_state.load_sharded(job.state_dir, job.fingerprint, self.model, self.optimizer)
        self.checkpointer = train_state.ShardedCheckpointer(job.state_dir, self.rank)
        if extra is not None:
            self._restore(extra)

    def build_model(self) -> None:
        """The input checkpoint, changed by the objective (`prepare_model`), spread over the workers.

        Under fsdp it is loaded on the CPU and FSDP2 moves each unit's shards to the device as it
        shards it, so no worker's device ever holds the whole model.
        """
        cfg = self.cfg
        mode = cfg.parallel_for(load_config(self.ckpt_dir))
        param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # fsdp gathers layers in bf16
        self.layout = Layout.build(mode, self.world, 1, self.device, param_dtype)
        self.model = load_pretrained(self.ckpt_dir, device=self._load_device())
        self.model.recompute, self.model.recompute_every = cfg.recompute, cfg.recompute_every
        self.model.train()
        prepare = getattr(self.objective, "prepare_model", None)
        if prepare is not None:
            prepare(self)
        self.train_model = self.layout.apply(self.model)
        self.micro_batch = cfg.micro_batch_size or cfg.batch_size // self.world
        """Examples per forward, in training and evaluation."""

    def _load_device(self) -> torch.device:
        return torch.device("cpu") if self.layout.mode == "fsdp" else self.device

    # ------------------------------------------------------------------ helpers for objectives
    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def frozen_input_model(self) -> torch.nn.Module:
        """The input checkpoint again, frozen (a reference model), spread like the policy: sharded under
        fsdp (FSDP2 only gathers it, layer by layer, in each forward), whole on each worker under ddp."""
        model = load_pretrained(self.ckpt_dir, device=self._load_device()).eval().requires_grad_(False)
        if self.layout.mode == "fsdp":
            shard_fsdp(model, self.device, param_dtype=self.layout.param_dtype)
        return model

    def my_share(self, count: int) -> list[np.ndarray]:
        """This rank's indices of the first `count` examples, in chunks of the micro-batch. Every rank gets
        the same number of chunks, the last ones possibly empty: a sharded model's forward is collective,
        so a rank that has run out of examples still runs one (on `examples(.., empty chunk)`)."""
        mine = np.arange(count)[self.rank :: self.world]
        size = max(self.micro_batch, 1)
        chunks = -(-len(range(0, count, self.world)) // size)  # rank 0 holds the most
        return [mine[i * size : (i + 1) * size] for i in range(chunks)]

    @staticmethod
    def examples(examples: list, chunk: np.ndarray) -> list:
        """The examples of a `my_share` chunk; for an empty chunk the first example, whose results go unused."""
        return [examples[i] for i in chunk] or examples[:1]

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
            parts = make_batch(self, step)
        else:
            examples = [self.train_examples[i] for i in self.batch_indices(step)]
            parts = self.objective.micro_batches(examples, self)
        started = time.perf_counter()
        metrics = _summed(accumulate(self.layout, self.train_model, self.model, parts, self._forward))
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.layout.clip_grad_norm_(self.model, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        averaged = self.all_sum(torch.stack(list(metrics.values()))) / self.world
        self.step = step
        seconds = time.perf_counter() - started
        return dict(zip(metrics, averaged.tolist(), strict=True)) | {
            "lr": lr,
            "grad_norm": grad_norm,
            "examples_per_s": cfg.batch_size / seconds,
        }

    def _forward(self, part) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = self.objective.loss(self.train_model, part, self)
        logged = {"loss": loss} | metrics
        return loss, {name: value.detach().float().reshape(()).to(self.device) for name, value in logged.items()}

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = self.objective.evaluate(self)
        reshard(self.model)
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ bookkeeping
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
        """Collective: every rank writes its shards of the model and optimizer, rank 0 the rest."""
        extra = {
            "step": self.step,
            "cursor": self.step * self.cfg.batch_size,
            "rng": train_state.rng_state(),
            "history": self.history,
            "fingerprint": self.job.fingerprint,
        }
        self.checkpointer.save(self.model, self.optimizer, extra)

    def _restore(self, extra: dict) -> None:
        """The non-tensor state; model and optimizer are already loaded (`train_state.load_sharded`)."""
        self.step, self.history = extra["step"], extra["history"]
        assert extra["cursor"] == self.step * self.cfg.batch_size, "data cursor and step disagree"
        train_state.set_rng_state(extra["rng"])

    def finish(self) -> None:
        """Final validation, then rank 0 hands Ray Train the HF checkpoint (gathered from the shards) + train state."""
        import ray.train

        final = self.evaluate()
        self.record(self.step, final, "val")
        summary = self.summary(final)
        self.save_state()
        weights = self.layout.full_state_dict(self.model, self.rank)  # collective
        if self.rank != 0:
            ray.train.report(summary)
            return
        weights = merged_lora(self.model, weights)  # adapters, if any, become part of the exported weights
        trained = model_from_state_dict(self.model.config, weights, "the trained model")

        def fill(directory: Path) -> None:
            save_pretrained(trained, directory)
            train_state.copy_state(self.job.state_dir, directory / "train_state")
            (directory / "train_state" / HISTORY_FILE).write_text(json.dumps(self.history) + "\n")

        launch.report_checkpoint(summary, fill)

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


def _summed(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The micro-batches' metric contributions added up (a metric only some report counts 0 in the others)."""
    totals: dict[str, torch.Tensor] = {}
    for metrics in parts:
        for name, value in metrics.items():
            totals[name] = totals[name] + value if name in totals else value
    return totals


def merged_lora(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model`'s full `state` with every LoRA adapter folded into its weight (W + scale B A, by the
    adapter's own forward), under the base model's names; `state` unchanged when there is none.

    Works on a gathered state dict, so it serves a sharded model as well as a whole one."""
    state = dict(state)
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for weight, chain in module.parametrizations.items():
            prefix = f"{module_name}.parametrizations.{weight}"
            delta = chain[0]
            if not isinstance(delta, LoRADelta):
                continue
            adapter = {name: state.pop(f"{prefix}.0.{name}") for name in ("A", "B")}
            with torch.no_grad():
                state[f"{module_name}.{weight}"] = functional_call(delta, adapter, (state.pop(f"{prefix}.original"),))
    return state
