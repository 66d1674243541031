"""The pretrain stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ernie.recompute import POLICIES
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
    recompute: str = "none"
    """Activation recomputation: none, layers (whole decoder layers) or mlp (only the FFN / MoE
    part); trades compute for activation memory, results stay the same."""
    router_bias_rate: float = 1e-3
    """Aux-loss-free balancing: after every step each MoE router's selection bias moves this much
    toward its under-used experts (`ernie.moe.update_router_biases`); 0 turns it off."""
    shuffle_buffer: int = 256
    """Train rows each worker holds to shuffle its shard stream (0 = file order); with the shards
    dealt anew each epoch this is the whole shuffle, so more rows mix better and cost memory."""

    OPERATIONAL: ClassVar[set[str]] = (TrainingConfig.OPERATIONAL - {"num_workers"}) | {
        "eval_rows",
        "router_stats_every",
    }
    """num_workers is not operational here: each worker streams its own shards, so the worker
    count decides which rows form a step."""

    def validate(self) -> None:
        """Raise `UserError` naming the first bad field (`pretrain.<field>=<value>`)."""
        self.check("pretrain", positive=("router_stats_every",))
        if self.recompute not in POLICIES:
            raise UserError(f"pretrain.recompute={self.recompute!r} must be one of {POLICIES}")
        for name, zero_means in (("eval_rows", "all"), ("shuffle_buffer", "file order"), ("router_bias_rate", "off")):
            value = getattr(self, name)
            if value < 0:
                raise UserError(f"pretrain.{name}={value} must not be negative (0 = {zero_means})")
