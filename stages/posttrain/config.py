"""The post-training stages' settings: `TrainConfig`, which SFT, DPO, RLVR and UPO extend, and theirs (without
torch: the CLI reads and checks configs without loading a model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ernie.config import LORA_TARGETS
from ernie.config import RECOMPUTE_POLICIES as POLICIES
from pipeline.contract import Request, UserError
from stages.training.config import PARALLEL_MODES, TrainingConfig


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


LOSS_IMPLS = ("logits", "chunked")
LOSS_TYPES = ("sigmoid", "ipo")
PAIR_SOURCES = ("offline", "online", "both")


@dataclass
class SFTConfig(TrainConfig):
    """SFT: AdamW steps on chat examples, loss on assistant tokens only."""

    steps: int = 100
    lr: float = 1e-3
    pack: bool = False
    """Pack each step's chats several to a row of max_length (first fit, longest first) instead of
    one padded row each: the same assistant-token loss on fewer padding tokens."""
    lora_rank: int = 0
    """0: tune every weight. > 0: train low-rank adapters of this rank on `lora_targets` only, the
    base weights frozen; they are merged into the weights of the output checkpoint."""
    lora_alpha: float = 16.0
    """Adapter scale: the update is (lora_alpha / lora_rank) * B @ A."""
    lora_targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    """Which weights get adapters: attention (q/k/v/o), mlp (dense SwiGLU layers), experts (each routed expert)."""
    loss_impl: str = "logits"
    """logits (the full [tokens, vocab] logits, then cross-entropy) or chunked (projection + cross-entropy
    a chunk of tokens at a time: the same loss and gradients without holding the logits)."""

    OPERATIONAL: ClassVar[set[str]] = TrainConfig.OPERATIONAL | {"loss_impl"}

    def validate(self, stage: str = "sft") -> None:
        super().validate(stage)
        if self.lora_rank < 0:
            raise UserError(f"posttrain.{stage}.lora_rank={self.lora_rank} must not be negative (0 = no LoRA)")
        if self.lora_rank and self.lora_alpha <= 0:
            raise UserError(f"posttrain.{stage}.lora_alpha={self.lora_alpha} must be positive")
        if self.loss_impl not in LOSS_IMPLS:
            raise UserError(f"posttrain.{stage}.loss_impl={self.loss_impl!r} must be one of {LOSS_IMPLS}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if self.lora_rank and (unknown or not self.lora_targets):
            raise UserError(
                f"posttrain.{stage}.lora_targets={list(self.lora_targets)}: each must be one of {LORA_TARGETS}"
            )


@dataclass
class DPOConfig(TrainConfig):
    """DPO: AdamW steps on preference pairs against the frozen input model."""

    steps: int = 80
    lr: float = 1e-3
    beta: float = 0.1
    """Strength of the KL anchor to the reference: rewards are beta * (log pi - log ref)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO, with optional label_smoothing) or ipo (squared loss toward a margin of 1 / (2 beta))."""
    label_smoothing: float = 0.0
    """sigmoid only: the probability that a pair's preference label is flipped (conservative DPO), in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an added NLL loss on the chosen answers (per answer token; RPO-style), which keeps
    DPO from lowering the likelihood of the chosen answers along with the rejected ones."""

    def validate(self, stage: str = "dpo") -> None:
        super().validate(stage)
        if self.beta <= 0:
            raise UserError(f"posttrain.{stage}.beta={self.beta!r} must be positive")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"posttrain.{stage}.loss_type={self.loss_type!r} must be one of {LOSS_TYPES}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"posttrain.{stage}.label_smoothing={self.label_smoothing!r} must lie in [0, 0.5)")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise UserError(
                f"posttrain.{stage}.label_smoothing applies to loss_type=sigmoid only, not {self.loss_type!r}"
            )
        if self.sft_weight < 0:
            raise UserError(f"posttrain.{stage}.sft_weight={self.sft_weight!r} must not be negative")

    def forward_rows(self) -> int:
        """A pair is two rows (chosen and rejected) in the same forward."""
        return 2 * super().forward_rows()


@dataclass
class RLVRConfig(TrainConfig):
    """RLVR: GRPO steps on verifiable prompts, sampled by Ray rollout actors."""

    steps: int = 60
    batch_size: int = 8
    """Prompts per step (global); each is sampled group_size times."""
    lr: float = 2e-4
    warmup_steps: int = 5
    group_size: int = 8
    """Completions sampled per prompt; advantages are relative to the group."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (validation answers are greedy)."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts: the smallest set of tokens holding this much probability."""
    max_new_tokens: int = 16
    """Tokens sampled per completion (and generated per validation answer)."""
    clip_eps: float = 0.2
    """PPO ratio clipping: the surrogate ignores ratio moves beyond 1 +- clip_eps."""
    kl_coef: float = 0.02
    """Weight of the k3 KL estimate to the input model in the loss (0: no reference model)."""
    scale_advantages: bool = True
    """Divide each group's centred rewards by the group's std (GRPO); false keeps them centred only."""
    updates_per_rollout: int = 1
    """Optimizer steps per rollout round: one round samples the prompts of this many steps with the
    round's first weights, so later steps learn off-policy and the ratio clipping engages."""
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward functions `(completion, record) -> float` by dotted path (bare names: stages.posttrain.rewards)."""
    reward_weights: list[float] = field(default_factory=list)
    """One weight per reward (empty: all 1)."""
    enable_thinking: bool = False
    """Render prompts with an open think block (thinking mode) instead of an empty one."""
    eval_samples: int = 4
    """Completions sampled per validation prompt at the rollout temperature (val_reward is their mean
    reward; a greedy answer is scored too, as val_greedy_reward). 0: greedy only."""
    rollout_workers: int = 1
    """Ray actors sampling completions, each with its own copy of the policy."""
    rollout_cpus: float = 1.0
    """CPUs each rollout actor reserves (also its torch thread count)."""

    OPERATIONAL: ClassVar[set[str]] = TrainConfig.OPERATIONAL | {"rollout_workers", "rollout_cpus", "eval_samples"}

    def requested(self) -> Request:
        """The learners plus the rollout actors (each holds `resources.num_gpus` too)."""
        learners = super().requested()
        return Request(
            cpus=learners.cpus + self.rollout_workers * self.rollout_cpus,
            gpus=learners.gpus + self.rollout_workers * self.resources.num_gpus,
            terms=f"{learners.terms} + rollout_workers={self.rollout_workers} x "
            f"(rollout_cpus={self.rollout_cpus:g}, resources.num_gpus={self.resources.num_gpus:g})",
        )

    def validate(self, stage: str = "rlvr") -> None:
        super().validate(stage)
        key = f"posttrain.{stage}"
        if self.eval_samples < 0:
            raise UserError(f"{key}.eval_samples={self.eval_samples} must not be negative (0 = greedy only)")
        for name in ("group_size", "max_new_tokens", "updates_per_rollout", "rollout_workers"):
            if getattr(self, name) <= 0:
                raise UserError(f"{key}.{name}={getattr(self, name)!r} must be positive")
        if self.group_size < 2:
            raise UserError(f"{key}.group_size={self.group_size} must be at least 2 (advantages compare a group)")
        if self.temperature <= 0:
            raise UserError(f"{key}.temperature={self.temperature!r} must be positive (rollouts sample)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"{key}.top_p={self.top_p!r} must lie in (0, 1]")
        if self.clip_eps <= 0 or self.kl_coef < 0 or self.rollout_cpus <= 0:
            raise UserError(f"{key}: clip_eps and rollout_cpus must be positive and kl_coef non-negative")
        if self.reward_weights and len(self.reward_weights) != len(self.rewards):
            raise UserError(
                f"{key}.reward_weights has {len(self.reward_weights)} weights for {len(self.rewards)} rewards"
            )
        if self.max_new_tokens >= self.max_length:
            raise UserError(f"{key}.max_new_tokens={self.max_new_tokens} leaves no room for a prompt in max_length")
        for name in ("steps", "checkpoint_every"):
            if getattr(self, name) % self.updates_per_rollout:
                raise UserError(
                    f"{key}.{name}={getattr(self, name)} must be a multiple of updates_per_rollout="
                    f"{self.updates_per_rollout} (train states are written at rollout-round boundaries)"
                )

    def weights(self) -> list[float]:
        return list(self.reward_weights) or [1.0] * len(self.rewards)

    def forward_rows(self) -> int:
        """Each prompt of a micro-batch brings its group_size completions."""
        return self.group_size * super().forward_rows()

    def keeps_reference(self) -> bool:
        """The KL term's reference."""
        return self.kl_coef > 0


@dataclass
class UPOConfig(RLVRConfig):
    """UPO: RLVR's GRPO steps plus a DPO term on offline and/or online preference pairs."""

    dpo_weight: float = 1.0
    """Weight of the mean DPO pair loss next to the GRPO loss."""
    pairs: str = "both"
    """offline (preferences/train.jsonl), online (best vs worst sampled completion of a group) or both."""
    pairs_per_step: int = 8
    """Offline pairs per step (global; split over the workers)."""
    beta: float = 0.1
    """DPO's beta: rewards are beta * (log pi - log ref)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO, with optional label_smoothing) or ipo, for the preference pairs (as posttrain.dpo)."""
    label_smoothing: float = 0.0
    """sigmoid only: the probability that a pair's preference label is flipped, in [0, 0.5)."""

    def validate(self, stage: str = "upo") -> None:
        super().validate(stage)
        key = f"posttrain.{stage}"
        if self.pairs not in PAIR_SOURCES:
            raise UserError(f"{key}.pairs={self.pairs!r} must be one of {PAIR_SOURCES}")
        if self.dpo_weight < 0 or self.beta <= 0:
            raise UserError(f"{key}: dpo_weight must not be negative and beta must be positive")
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"{key}.loss_type={self.loss_type!r} must be one of {LOSS_TYPES}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"{key}.label_smoothing={self.label_smoothing!r} must lie in [0, 0.5)")
        if self.pairs != "online" and (self.pairs_per_step <= 0 or self.pairs_per_step % self.ranks):
            raise UserError(
                f"{key}.pairs_per_step={self.pairs_per_step} must be positive and divisible by "
                f"num_workers={self.num_workers}"
            )

    def keeps_reference(self) -> bool:
        """DPO's rewards (of online pairs too) are measured against the input model."""
        return True

    def forward_rows(self) -> int:
        """A micro-batch's rollouts and its share of the step's offline pairs (two rows each)."""
        rollouts = super().forward_rows()
        if self.pairs == "online":
            return rollouts
        per_worker = self.batch_size // self.ranks
        parts = per_worker // (self.micro_batch_size or per_worker)
        return rollouts + 2 * -(-(self.pairs_per_step // self.ranks) // parts)
