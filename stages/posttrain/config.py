"""Settings shared by the post-training stages (SFT, DPO, RLVR and UPO extend `TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ernie.recompute import POLICIES
from pipeline.contract import UserError
from stages.training.config import TrainingConfig
from stages.training.parallel import PARALLEL_MODES


@dataclass
class TrainConfig(TrainingConfig):
    """A fixed number of AdamW steps on `num_workers` Ray Train workers, from the input checkpoint."""

    max_length: int = 256
    """Tokens per example; longer chats are truncated (examples left without answer tokens are dropped)."""
    eval_examples: int = 0
    """Examples evaluated per split (the first ones; 0 = all): the val set, and for DPO the train pairs too."""
    parallel: str = "auto"
    """How the workers share the model: fsdp (FSDP2: parameters, gradients and AdamW states sharded
    over the workers, each decoder layer gathered just before it runs; LoRA adapters are sharded
    with their frozen weights), ddp (a full replica per worker) or auto (fsdp)."""
    micro_batch_size: int = 0
    """Examples (chats, pairs, prompts with their group_size completions) each worker runs forward +
    backward at a time: a step accumulates gradients over (batch_size / num_workers) /
    micro_batch_size micro-batches before its one optimizer step, each weighted by its share of the
    step's loss, so activation memory follows the micro-batch and the step stays the whole batch's
    up to float rounding. Evaluation runs micro-batches of this size too. 0 = all of the worker's
    examples at once."""
    recompute: str = "none"
    """Activation recomputation in training forwards: none, layers (whole decoder layers) or mlp (the
    FFN / MoE part only); the same results for more compute."""
    recompute_every: int = 1
    """Recompute every this-many-th decoder layer (1 = all)."""

    OPERATIONAL: ClassVar[set[str]] = TrainingConfig.OPERATIONAL | {
        "eval_examples",
        "micro_batch_size",
        "recompute",
        "recompute_every",
    }

    def validate(self, stage: str) -> None:
        """Raise `UserError` naming the first bad field (`posttrain.<stage>.<field>=<value>`)."""
        key = f"posttrain.{stage}"
        self.check(key, positive=("max_length", "recompute_every"))
        if self.eval_examples < 0:
            raise UserError(f"{key}.eval_examples={self.eval_examples} must not be negative (0 = all)")
        if self.parallel not in ("auto", *PARALLEL_MODES):
            raise UserError(f"{key}.parallel={self.parallel!r} must be one of {('auto', *PARALLEL_MODES)}")
        if self.recompute not in POLICIES:
            raise UserError(f"{key}.recompute={self.recompute!r} must be one of {POLICIES}")
        if self.micro_batch_size < 0:
            raise UserError(f"{key}.micro_batch_size={self.micro_batch_size} must not be negative (0 = all at once)")
        examples = self.batch_size // self.ranks
        if examples % (self.micro_batch_size or examples):
            raise UserError(
                f"{key}.micro_batch_size={self.micro_batch_size} must divide the {examples} examples each worker "
                f"takes a step ({key}.batch_size={self.batch_size} / {key}.num_workers={self.num_workers})"
            )

    def parallel_for(self, model) -> str:
        """The data-parallel mode the workers use for `model` (`parallel`, auto resolved: fsdp)."""
        return "fsdp" if self.parallel == "auto" else self.parallel

    def forward_rows(self) -> int:
        """Rows (sequences of up to max_length tokens) in one training forward of a worker."""
        return self.micro_batch_size or max(self.batch_size // self.ranks, 1)

    def keeps_reference(self) -> bool:
        """Whether the workers keep the frozen input model beside the policy (a KL or DPO reference)."""
        return False
