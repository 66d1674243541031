"""The pretrain stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.contract import UserError
from stages.training.config import TrainingConfig


@dataclass
class Config(TrainingConfig):
    """Pretraining: a fixed number of AdamW steps on the packed rows, on `num_workers` Ray Train workers (DDP)."""

    steps: int = 300
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.1
    eval_every: int = 50
    checkpoint_every: int = 50
    eval_rows: int = 64
    """Validation rows evaluated (the first ones of the val shards; 0 = all)."""
    router_stats_every: int = 25
    """Log router load balance (max/mean dispatch per MoE layer) every this many steps."""

    OPERATIONAL: ClassVar[set[str]] = TrainingConfig.OPERATIONAL | {"eval_rows", "router_stats_every"}

    def validate(self) -> None:
        """Raise `UserError` naming the first bad field (`pretrain.<field>=<value>`)."""
        self.check("pretrain", positive=("router_stats_every",))
        if self.eval_rows < 0:
            raise UserError(f"pretrain.eval_rows={self.eval_rows} must not be negative (0 = all)")
