"""The training loop every Ray Train worker runs (one data-parallel rank; FSDP2 or DDP).

Every rank writes its shards of the train state (torch.distributed.checkpoint); rank 0 alone
sends per-step metrics to the stage process (which logs them and moves the progress bar) and
hands the final checkpoint to Ray Train.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist

from ernie import ErnieConfig, ErnieForCausalLM
from ernie.batching import collate
from ernie.checkpoint import model_from_state_dict, save_pretrained
from ernie.flops import peak_flops, training_flops_per_token
from ernie.losses import shifted_targets
from ernie.moe import update_router_biases
from pipeline.contract import UserError
from stages.training import launch, train_state
from stages.training.accumulate import LOSS_NAMES, LMShare, accumulate, lm_shares, split_rows, weighted_lm_loss
from stages.training.fp8 import apply_fp8
from stages.training.optim import build_optimizer, lr_at, set_lr
from stages.training.parallel import Layout, compile_layers

from .config import Config
from .data import Row, TrainReader, load_val_rows
from .router_stats import RouterLoad

HISTORY_FILE = "history.json"


@dataclass
class Job:
    """What every worker gets (picklable; workers read the dataset's shards themselves)."""

    config: Config
    model: ErnieConfig
    seed: int
    dataset_dir: str
    """The dataset artifact: a directory every worker can read (local, shared, or an fsspec URL)."""
    unit_rows: int
    """Train rows that pass the shuffle buffer together (the data stage's balance groups, or 1)."""
    data_streams: int
    """Row streams the train split is dealt into (a multiple of the worker count; see TrainReader)."""
    state_dir: str
    """The sharded train state: a local directory every worker can reach, or an fsspec URL."""
    fingerprint: dict
    sink: Any = None  # ray.util.queue.Queue for (step, metrics) messages, or None


def train_worker(loop_config: dict) -> None:
    """Ray Train entry point: train to `config.steps`, resuming from the train state if there is one."""
    job = loop_config["job"]
    loop = WorkerLoop(dataclasses.replace(job, sink=loop_config.get("sink", job.sink)))
    cfg = loop.cfg
    if loop.step == 0:
        loop.record(0, {"val_loss": loop.evaluate()})
    else:
        loop.record(loop.step, {"resumed_from_step": float(loop.step)})
    while loop.step < cfg.steps:
        metrics = loop.train_step()
        step = loop.step
        if step % cfg.router_stats_every == 0 or step == cfg.steps:
            metrics.update(loop.router_report())
        if step % cfg.eval_every == 0 and step < cfg.steps:
            metrics["val_loss"] = loop.evaluate()
        loop.record(step, metrics)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            loop.save_state()
    loop.finish()


def forward_backward(
    train_model: torch.nn.Module,
    model: ErnieForCausalLM,
    layout: Layout,
    rows: list[Row],
    micro_batch: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    on_routing: Callable[[list], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Forward + backward over one worker's `rows`, `micro_batch` rows at a time (0 = all at once).

    The gradients left on `model` (data-parallel and expert-parallel reductions done) are those of
    the whole batch's loss: the LM loss is a mean over supervised tokens, so a micro-batch's weighs
    by its share of them; under `token_balanced` (ERNIE's default) its gradient divides by the
    prediction slots instead, so there, like the router losses (means over all tokens), it weighs
    by the micro-batch's share of rows (`stages.training.accumulate.lm_shares`). The load-balance
    loss, a product of two means, is the one part that is per micro-batch rather than exact.
    `on_routing` sees every micro-batch's routing. Returns the batch's loss components (LOSS_NAMES
    order, the same weighting) and its row length.
    """
    batches = [collate(part) for part in split_rows(rows, micro_batch)]
    shares = lm_shares(batches, model.config.loss.token_balanced, layout)  # collective: the step's counts

    def forward(part: tuple[dict, LMShare]) -> tuple[torch.Tensor, torch.Tensor]:
        batch, share = part
        with autocast():
            out = train_model(**{name: value.to(device) for name, value in batch.items()})
        if on_routing is not None:
            on_routing(out.routing)
        return weighted_lm_loss(out, share)

    totals = torch.zeros(len(LOSS_NAMES), device=device)
    for values in accumulate(layout, train_model, model, list(zip(batches, shares, strict=True)), forward):
        totals += values
    return totals, batches[0]["input_ids"].shape[1]


class WorkerLoop:
    """Model, optimizer, data and history of one rank."""

    def __init__(self, job: Job) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.job = job
        self.cfg = cfg = job.config
        torch.manual_seed(job.seed)
        self.model = ErnieForCausalLM(job.model).to(self.device)
        self.model.recompute = cfg.recompute
        self.model.recompute_every = cfg.recompute_every
        self.model.loss_impl = cfg.loss_impl
        if cfg.fp8:
            apply_fp8(self.model)
        if cfg.compile:
            compile_layers(self.model)
        param_dtype = torch.bfloat16 if cfg.precision == "bf16" else None  # fsdp gathers layers in bf16
        mode = cfg.parallel_for(job.model)
        self.layout = Layout.build(mode, self.world, cfg.expert_parallel, self.device, param_dtype)
        self.train_model = self.layout.apply(self.model)
        # after sharding: the optimizer holds this rank's shards of the parameters
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.step = 0
        self.history: dict[str, Any] = {"step": [], "val_step": [], "tokens": 0, "seconds": 0.0, "router": None}
        self.history.update({name: [] for name in LOSS_NAMES + ("val_loss",)})
        self.router = RouterLoad(job.model, self.device)
        self.reader = TrainReader(
            f"{job.dataset_dir}/train",
            self.rank,
            self.world,
            job.seed,
            cfg.shuffle_buffer,
            cfg.batch_size // self.world,
            job.unit_rows,
            streams=job.data_streams,
        )
        extra = train_state.load_sharded(job.state_dir, job.fingerprint, self.model, self.optimizer, self.layout)
        self.checkpointer = train_state.ShardedCheckpointer(
            job.state_dir, self.rank, self.layout, background=cfg.async_checkpoint
        )
        if extra is not None:
            self._restore(extra)
        self.micro_batch = cfg.micro_batch_size or cfg.batch_size // self.world
        """Rows per forward (train and eval): activation memory follows it, not the worker's batch."""
        self.flops_per_token: float | None = None  # known once the first batch shows the row length
        self.peak_flops = peak_flops(self.device)
        self.batches = self.reader.batches(self.step)
        self.val_rows = load_val_rows(f"{job.dataset_dir}/val", cfg.eval_rows)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step + 1
        lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_fraction)
        set_lr(self.optimizer, lr)
        rows = next(self.batches)
        started = time.perf_counter()
        losses, seq_len = forward_backward(
            self.train_model,
            self.model,
            self.layout,
            rows,
            self.micro_batch,
            self.device,
            self._autocast,
            self.router.add,
        )
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.layout.clip_grad_norm_(self.model, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.router_bias_rate > 0:  # collective: every rank, every step (loads counted over all micro-batches)
            update_router_biases(self.model, cfg.router_bias_rate)
        self.checkpointer.commit_finished()
        losses = self._mean_over_ranks(list(losses))
        seconds = time.perf_counter() - started
        self.step = step
        tokens = cfg.batch_size * seq_len
        self.history["tokens"] += tokens
        self.history["seconds"] += seconds
        metrics = dict(zip(LOSS_NAMES, losses, strict=True))
        throughput = {"tokens_per_s": tokens / seconds}
        # achieved FLOP/s per device (every rank does the same work), and MFU where the peak is known
        if self.flops_per_token is None:
            self.flops_per_token = training_flops_per_token(self.model, seq_len)
        throughput["tflops_per_device"] = self.flops_per_token * tokens / seconds / self.world / 1e12
        if self.peak_flops:
            throughput["mfu"] = throughput["tflops_per_device"] * 1e12 / self.peak_flops
        return metrics | {"lr": lr, "grad_norm": float(grad_norm), "memory_gb": self._memory_gb()} | throughput

    def _memory_gb(self) -> float:
        """Peak device memory of this worker (GPU: allocated by torch; CPU: the process's resident set)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return psutil.Process().memory_info().rss / 2**30

    def _mean_over_ranks(self, values: list[torch.Tensor]) -> list[float]:
        stacked = torch.stack([v.detach().float() for v in values])
        dist.all_reduce(stacked)
        return (stacked / self.world).tolist()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted LM loss over the validation rows, split over the ranks (collective).

        Every rank runs the same number of forwards (FSDP2 gathers parameters in each): a rank
        that runs out of rows repeats its first one with weight 0.
        """
        mine = self.val_rows[self.rank :: self.world]
        per_batch = max(self.micro_batch, 1)
        batches = -(-len(self.val_rows[:: self.world]) // per_batch)  # rank 0 holds the most rows
        totals = torch.zeros(2, device=self.device)
        self.model.eval()
        for start in range(0, batches * per_batch, per_batch):
            rows = mine[start : start + per_batch]
            batch = collate(rows or self.val_rows[:1], self.device)
            with self._autocast():
                out = self.train_model(**batch)
            _, weight = shifted_targets(batch["labels"], None, batch["document_ids"])
            if rows:
                totals += torch.stack([out.losses["lm"].float() * weight.sum(), weight.sum()])
        self.model.train()
        dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def router_report(self) -> dict[str, float]:
        metrics, counts = self.router.report()
        if counts.numel():
            previous = self.history["router"]
            total = counts if previous is None else counts + torch.tensor(previous)
            self.history["router"] = total.tolist()
        return metrics

    # ------------------------------------------------------------------ bookkeeping (rank 0)
    def record(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if "loss" in metrics:
            self.history["step"].append(step)
            for name in LOSS_NAMES:
                self.history[name].append(metrics[name])
        if "val_loss" in metrics:
            if self.history["val_step"][-1:] == [step]:  # a rerun of a finished run evaluates again
                self.history["val_step"].pop()
                self.history["val_loss"].pop()
            self.history["val_step"].append(step)
            self.history["val_loss"].append(metrics["val_loss"])
        if self.job.sink is not None:
            self.job.sink.put_nowait((step, metrics))

    def save_state(self) -> None:
        """Collective: every rank writes its shards of the train state (router counts since the last report summed)."""
        router_window = self.router.window.clone()
        dist.all_reduce(router_window)
        extra = {
            "step": self.step,
            "cursor": list(self.reader.cursor(self.step)),
            "rng": train_state.rng_state(),
            "history": self.history,
            "router_window": router_window.cpu(),
            "fingerprint": self.job.fingerprint,
        }
        self.checkpointer.save(self.model, self.optimizer, extra)

    def _restore(self, extra: dict) -> None:
        """The non-tensor state; model and optimizer are already loaded (`train_state.load_sharded`)."""
        self.step, self.history = extra["step"], extra["history"]
        cursor = list(self.reader.cursor(self.step))
        if list(extra["cursor"]) != cursor:
            raise UserError(
                f"the train state in {self.job.state_dir} was at (epoch, row) {list(extra['cursor'])} of the train "
                f"split after step {self.step}, but this dataset puts step {self.step} at {cursor}: the dataset "
                "changed under the run; delete the train state to start over"
            )
        train_state.set_rng_state(extra["rng"])
        if self.rank == 0:  # the window holds every rank's counts; the next report sums over ranks
            self.router.window.copy_(extra["router_window"])

    def finish(self) -> None:
        """Final validation, then rank 0 hands Ray Train the HF checkpoint + train state."""
        import ray.train

        val_loss = self.evaluate()
        self.record(self.step, {"val_loss": val_loss})
        summary = self.summary(val_loss)
        self.save_state()
        self.checkpointer.close()  # the final state is on disk before it is copied into the checkpoint
        weights = self.layout.full_state_dict(self.model, self.rank)  # collective
        if self.rank != 0:
            ray.train.report(summary)
            return
        trained = model_from_state_dict(self.job.model, weights, "the trained model")

        def fill(directory: Path) -> None:
            save_pretrained(trained, directory)
            train_state.copy_state(self.job.state_dir, directory / "train_state")
            (directory / "train_state" / HISTORY_FILE).write_text(json.dumps(self.history) + "\n")

        launch.report_checkpoint(summary, fill)

    def summary(self, val_loss: float) -> dict[str, float]:
        h = self.history
        last = h["loss"][-10:] if h["loss"] else [float("nan")]
        return {
            "steps": float(self.step),
            "loss_first": h["loss"][0] if h["loss"] else float("nan"),
            "loss_last10": sum(last) / len(last),
            "val_loss_initial": h["val_loss"][0] if h["val_loss"] else float("nan"),
            "val_loss": val_loss,
            "tokens_per_s": h["tokens"] / max(h["seconds"], 1e-9),
            **self._flops_summary(h["tokens"] / max(h["seconds"], 1e-9)),
        }

    def _flops_summary(self, tokens_per_s: float) -> dict[str, float]:
        if self.flops_per_token is None:  # no step ran (a finished run evaluated again)
            return {}
        flops = self.flops_per_token * tokens_per_s / self.world
        return {"tflops_per_device": flops / 1e12} | ({"mfu": flops / self.peak_flops} if self.peak_flops else {})
