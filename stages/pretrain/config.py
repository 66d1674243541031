"""The pretrain stage's typed config and the checks that turn bad values into a `UserError`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ernie.config import RECOMPUTE_POLICIES as POLICIES
from pipeline.contract import UserError
from stages.training.config import PARALLEL_MODES, TrainingConfig

LOSS_IMPLS = ("logits", "chunked")


@dataclass
class Config(TrainingConfig):
    """Pretraining: a fixed number of AdamW steps on the packed rows, on `num_workers` Ray Train workers."""

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
    recompute_every: int = 1
    """Recompute every this-many-th decoder layer (1 = all; 2 = layers 0, 2, 4, ...: about half
    the activation memory saved for half the extra compute)."""
    router_bias_rate: float = 1e-3
    """Aux-loss-free balancing: after every step each MoE router's selection bias moves this much
    toward its under-used experts (`ernie.moe.update_router_biases`); 0 turns it off."""
    parallel: str = "auto"
    """How the workers share the model: fsdp (FSDP2: parameters, gradients and optimizer states
    sharded over the workers, each decoder layer gathered just before it runs), ddp (a full
    replica per worker) or auto (fsdp, text and VL models alike). A VL model under fsdp runs its
    vision parts in every forward, on a blank image with zero effect when a micro-batch has none
    (`ErnieForCausalLM.every_part_runs`), so every worker reduces the same gradients."""
    micro_batch_size: int = 0
    """Rows each worker runs forward + backward at a time: a step accumulates gradients over
    (batch_size / num_workers) / micro_batch_size micro-batches before its one optimizer step, so
    activation memory follows the micro-batch while the step stays the whole batch's up to float
    rounding (bar the load-balance loss, taken per micro-batch). 0 = all of the worker's rows at once."""
    shuffle_buffer: int = 256
    """Train rows each worker holds to shuffle its shard stream (0 = file order); with the shards
    dealt anew each epoch this is the whole shuffle, so more rows mix better and cost memory."""

    loss_impl: str = "logits"
    """logits (the output projection's full [tokens, vocab] logits, then cross-entropy) or chunked
    (projection + cross-entropy a chunk of tokens at a time, in forward and backward: the same loss
    and gradients without the largest activation of a 100k-vocabulary model)."""
    fp8: bool = False
    """FP8 training linears in the decoder layers (torchao float8, dynamic per-tensor scales; routers,
    output projection and routed experts stay bf16): stages/training/fp8.py. Needs precision=bf16."""
    compile: bool = False
    """torch.compile each decoder layer (same results up to kernel-fusion rounding; the first steps
    pay the compilation, minutes for large models)."""
    async_checkpoint: bool = True
    """Write the train state in the background: each worker copies its shards to memory and
    training goes on while a thread writes them (the state counts once written)."""
    expert_parallel: int = 1
    """Workers each MoE pool's experts are split over (consecutive ranks: keep a group inside a
    node); tokens reach their experts by all-to-all. Must divide num_workers and every pool's
    expert count; 1 = every worker holds every expert. A run resumes under another value."""
    data_streams: int = 0
    """Independent row streams the train split is dealt into; each worker reads data_streams /
    num_workers of them. The rows of every step depend on this, not on num_workers, so a run
    resumes (and gives the same global batches) under any worker count that divides it. 0: the
    worker count of the run's first start."""

    OPERATIONAL: ClassVar[set[str]] = TrainingConfig.OPERATIONAL | {
        "eval_rows",
        "router_stats_every",
        "compile",
        "loss_impl",
        "async_checkpoint",
        "micro_batch_size",
        "expert_parallel",
        "recompute",
        "recompute_every",
    }
    """num_workers is operational: the data order follows data_streams (data_streams=0 resolves to
    the first start's worker count, which the train state records). So is expert_parallel: the train
    state holds expert tensors and their AdamW moments whole and the optimizer's settings by
    parameter, so it loads under any expert split (tests/test_train_state_remote.py)."""

    def validate(self) -> None:
        """Raise `UserError` naming the first bad field (`pretrain.<field>=<value>`)."""
        self.check("pretrain", positive=("router_stats_every", "expert_parallel", "recompute_every"))
        if self.ranks % self.expert_parallel:
            raise UserError(
                f"pretrain.expert_parallel={self.expert_parallel} must divide pretrain.num_workers={self.num_workers}"
            )
        if self.parallel not in ("auto", *PARALLEL_MODES):
            raise UserError(f"pretrain.parallel={self.parallel!r} must be one of {('auto', *PARALLEL_MODES)}")
        if self.loss_impl not in LOSS_IMPLS:
            raise UserError(f"pretrain.loss_impl={self.loss_impl!r} must be one of {LOSS_IMPLS}")
        if self.recompute not in POLICIES:
            raise UserError(f"pretrain.recompute={self.recompute!r} must be one of {POLICIES}")
        if self.fp8 and self.precision != "bf16":
            raise UserError(
                "pretrain.fp8=true runs FP8 matmuls inside bf16 training; "
                f"set pretrain.precision=bf16 (not {self.precision!r})"
            )
        zeros = {"eval_rows": "all", "shuffle_buffer": "file order", "router_bias_rate": "off"}
        zeros["data_streams"] = "the first start's worker count"
        zeros["micro_batch_size"] = "all of the worker's rows at once"
        for name, zero_means in zeros.items():
            value = getattr(self, name)
            if value < 0:
                raise UserError(f"pretrain.{name}={value} must not be negative (0 = {zero_means})")
        rows = self.batch_size // self.ranks
        if rows % (self.micro_batch_size or rows):
            raise UserError(
                f"pretrain.micro_batch_size={self.micro_batch_size} must divide the {rows} rows each worker takes a "
                f"step (pretrain.batch_size={self.batch_size} / pretrain.num_workers={self.num_workers})"
            )

    def check_streams(self, streams: int) -> None:
        """`streams` data streams must split evenly over the workers, and the batch over the streams."""
        if streams % self.ranks:
            raise UserError(
                f"pretrain.num_workers={self.num_workers} must divide the run's {streams} data streams "
                "(pretrain.data_streams, or the worker count the run started with): every worker reads "
                "whole streams"
            )
        if self.batch_size % streams:
            raise UserError(
                f"pretrain.batch_size={self.batch_size} must be divisible by the run's {streams} data streams "
                "(each stream gives the same rows a step)"
            )

    def parallel_for(self, model) -> str:
        """The data-parallel mode for `model` (`parallel`, with auto resolved); checks expert_parallel fits it."""
        if self.expert_parallel > 1:
            pools = [] if model.moe is None else [("text", model.moe.num_experts)]
            if model.moe is not None and model.vision is not None:
                pools.append(("vision", model.moe.vision_num_experts))
            if not pools:
                raise UserError(
                    f"pretrain.expert_parallel={self.expert_parallel} needs an MoE model; {model.name} is dense"
                )
            for pool, experts in pools:
                if experts % self.expert_parallel:
                    raise UserError(
                        f"pretrain.expert_parallel={self.expert_parallel} must divide the {experts} experts of "
                        f"{model.name}'s {pool} pool"
                    )
        return "fsdp" if self.parallel == "auto" else self.parallel
