"""Settings shared by the post-training stages (SFT and DPO extend `TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pipeline.contract import UserError
from stages.training.config import TrainingConfig


@dataclass
class TrainConfig(TrainingConfig):
    """A fixed number of AdamW steps on `num_workers` Ray Train workers (DDP), from the input checkpoint."""

    max_length: int = 256
    """Tokens per example; longer chats are truncated (examples left without answer tokens are dropped)."""
    eval_examples: int = 0
    """Examples evaluated per split (the first ones; 0 = all): the val set, and for DPO the train pairs too."""

    OPERATIONAL: ClassVar[set[str]] = TrainingConfig.OPERATIONAL | {"eval_examples"}

    def validate(self, stage: str) -> None:
        """Raise `UserError` naming the first bad field (`posttrain.<stage>.<field>=<value>`)."""
        self.check(f"posttrain.{stage}", positive=("max_length",))
        if self.eval_examples < 0:
            raise UserError(f"posttrain.{stage}.eval_examples={self.eval_examples} must not be negative (0 = all)")
