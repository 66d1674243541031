"""Settings every training stage has (pretrain, sft, dpo extend `TrainingConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from pipeline.contract import Request, Resources, UserError

SCHEDULES = ("cosine", "wsd")
"""Learning-rate schedules after warmup (`stages.training.optim.lr_at`)."""
PARALLEL_MODES = ("fsdp", "ddp")
"""How workers share the dense weights (`stages.training.parallel`)."""


def _stage_actor_resources() -> Resources:
    # The stage actor only launches and watches the Ray Train workers; if it held a CPU, a
    # 2-CPU machine could not place the 2 workers (each asks for `cpus_per_worker`).
    return Resources(num_cpus=0)


@dataclass
class TrainingConfig:
    """A fixed number of AdamW steps on `num_workers` Ray Train workers (DDP)."""

    resources: Resources = field(default_factory=_stage_actor_resources)
    """The stage actor's CPUs (keep 0: it only waits on the workers) and GPUs *per worker*
    (`num_gpus > 0` trains on GPUs with NCCL, else CPU with gloo)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks). 0: Ray Train's local mode, one rank in the stage's own
    process (it then holds `cpus_per_worker` CPUs and `resources.num_gpus` GPUs): no worker actors
    to start, which saves seconds per run on a small machine, and no restarts after a crash."""
    cpus_per_worker: float = 1.0
    """CPUs each Ray Train worker reserves (also its torch thread count)."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Global rows / examples per step, split evenly over the workers."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """The decay ends at `lr * min_lr_ratio`."""
    schedule: str = "cosine"
    """After warmup: cosine (decay over all remaining steps) or wsd (warmup-stable-decay: constant, then
    a linear decay over the last `decay_fraction` of the steps)."""
    decay_fraction: float = 0.2
    """wsd only: share of the steps spent decaying."""
    warmup_steps: int = 10
    """Linear warmup from 0 to `lr`."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay on matrices (norms, biases and routers are not decayed)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: str = "fp32"
    """fp32, or bf16 (autocast; weights and optimizer states stay fp32)."""
    eval_every: int = 25
    """Validation every this many steps (and at the end)."""
    checkpoint_every: int = 25
    """Write the resumable train state every this many steps (and at the end)."""
    max_failures: int = 1
    """Worker-group restarts Ray Train may make after a worker dies; each resumes from the last train state."""

    OPERATIONAL: ClassVar[set[str]] = {
        "resources",
        "num_workers",
        "cpus_per_worker",
        "eval_every",
        "checkpoint_every",
        "max_failures",
    }
    """Fields that do not change the trained weights (a train state resumes across them)."""

    @property
    def ranks(self) -> int:
        """Data-parallel ranks: the workers, or the stage's own process under num_workers=0."""
        return max(self.num_workers, 1)

    def requested(self) -> Request:
        """The stage actor plus the Ray Train workers (`resources.num_gpus` is per worker)."""
        r = self.resources
        ranks = (
            f"num_workers={self.num_workers}" if self.num_workers else "1 rank in the stage's process (num_workers=0)"
        )
        return Request(
            cpus=r.num_cpus + self.ranks * self.cpus_per_worker,
            gpus=self.ranks * r.num_gpus,
            terms=f"resources.num_cpus={r.num_cpus:g} + {ranks} x "
            f"(cpus_per_worker={self.cpus_per_worker:g}, resources.num_gpus={r.num_gpus:g})",
        )

    def actor_resources(self) -> Resources:
        """What the stage's own actor reserves: `resources.num_cpus` when it only watches the workers;
        one worker's CPUs and GPUs on top under num_workers=0, where it trains itself."""
        r = self.resources
        if self.num_workers:
            return dataclasses.replace(r, num_gpus=0)
        return dataclasses.replace(r, num_cpus=r.num_cpus + self.cpus_per_worker)

    def check(self, key: str, positive: tuple[str, ...] = ()) -> None:
        """Raise `UserError` naming the first bad shared field (`<key>.<field>=<value>`)."""

        def require(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise UserError(f"{key}.{name}={getattr(self, name)!r} {why}")

        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", *positive):
            require(getattr(self, name) > 0, name, "must be positive")
        require(self.num_workers >= 0, "num_workers", "must not be negative (0 = train in the stage's own process)")
        require(
            self.batch_size % self.ranks == 0,
            "batch_size",
            f"must be divisible by {key}.num_workers={self.num_workers} (split evenly over workers)",
        )
        require(self.lr > 0, "lr", "must be positive")
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
        require(self.warmup_steps >= 0, "warmup_steps", "must not be negative")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
        require(0 < self.decay_fraction <= 1, "decay_fraction", "must lie in (0, 1]")
        require(self.grad_clip >= 0, "grad_clip", "must not be negative (0 = off)")
        require(self.cpus_per_worker > 0, "cpus_per_worker", "must be positive")
        require(self.max_failures >= 0, "max_failures", "must not be negative")
        require(self.precision in ("fp32", "bf16"), "precision", "must be fp32 or bf16")

    def fingerprint(self) -> dict:
        """The fields that change the trained weights: a train state is only resumed under the same ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.OPERATIONAL}
