"""The pretrain stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.contract import Resources, UserError


def _stage_actor_resources() -> Resources:
    # The stage actor only launches and watches the Ray Train workers; if it held a CPU, a
    # 2-CPU machine could not place the 2 workers (each asks for `cpus_per_worker`).
    return Resources(num_cpus=0)


@dataclass
class Config:
    """Pretraining: a fixed number of AdamW steps on the packed rows, on `num_workers` Ray Train workers (DDP)."""

    resources: Resources = field(default_factory=_stage_actor_resources)
    """The stage actor's CPUs (keep 0: it only waits on the workers) and GPUs *per worker*
    (`num_gpus > 0` trains on GPUs with NCCL, else CPU with gloo)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves (also its torch thread count)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Global rows per step, split evenly over the workers."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at `lr * min_lr_ratio`."""
    warmup_steps: int = 20
    """Linear warmup from 0 to `lr`."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (norms, biases and routers are not decayed)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; weights and optimizer states stay fp32)."""
    eval_every: int = 50
    """Validation loss every this many steps (and always at the end)."""
    eval_rows: int = 64
    """Validation rows evaluated (the first ones of the val shards; 0 = all)."""
    router_stats_every: int = 25
    """Log router load balance (max/mean dispatch per MoE layer) every this many steps."""
    checkpoint_every: int = 50
    """Write the resumable train state every this many steps (and at the end)."""
    max_failures: int = 1
    """Worker-group restarts Ray Train may make after a worker dies; each resumes from the last train state."""

    def validate(self) -> None:
        """Raise `UserError` naming the first bad field (`pretrain.<field>=<value>`)."""
        for name in ("steps", "batch_size", "num_workers", "eval_every", "checkpoint_every", "router_stats_every"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "must be positive")
        _require(
            self.batch_size % self.num_workers == 0,
            "batch_size",
            self.batch_size,
            f"must be divisible by pretrain.num_workers={self.num_workers} (rows are split evenly over workers)",
        )
        _require(self.lr > 0, "lr", self.lr, "must be positive")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must not be negative")
        _require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must not be negative (0 = off)")
        _require(self.eval_rows >= 0, "eval_rows", self.eval_rows, "must not be negative (0 = all)")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be positive")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, "must not be negative")
        _require(self.precision in ("fp32", "bf16"), "precision", self.precision, "must be fp32 or bf16")

    def fingerprint(self) -> dict:
        """The fields that change the trained weights: a train state is only resumed under the same ones."""
        operational = {
            "resources",
            "num_workers",
            "cpus_per_worker",
            "eval_every",
            "eval_rows",
            "router_stats_every",
            "checkpoint_every",
            "max_failures",
        }
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in operational}


def _require(ok: bool, name: str, value, why: str) -> None:
    if not ok:
        raise UserError(f"pretrain.{name}={value!r} {why}")
