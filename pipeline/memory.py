"""Per-GPU memory estimate of a training stage, for `plan` (an estimate, printed as such).

What the training stages hold: fp32 parameters, fp32 gradients and AdamW's two fp32 moments
(16 bytes per parameter; bf16 runs autocast and keep these in fp32), sharded over the
data-parallel workers when the stage shards (FSDP2), experts over the expert-parallel group
instead when there is one;
activations of one micro-batch with SDPA attention and no recomputation: about 17 * seq * batch
* hidden elements per layer (Korthikanti et al. 2022's 34 bytes at 2 bytes an element), 4 bytes
each in fp32 and 3.5 on average under bf16 autocast (matmul outputs are bf16, the residual
stream and norms stay fp32). tests/test_memory_plan.py holds both to measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ernie import ErnieConfig, ErnieForCausalLM

GiB = 2**30


@dataclass
class MemoryPlan:
    total_params: int
    active_params: int
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float

    @property
    def total_gb(self) -> float:
        return self.params_gb + self.grads_gb + self.optimizer_gb + self.activations_gb


def micro_batch_rows(batch_size: int, workers: int, micro_batch_size: int = 0) -> int:
    """Rows one worker runs forward + backward at a time, which activation memory follows: the
    stage's micro_batch_size (gradient accumulation), else its whole share of the batch."""
    return micro_batch_size or max(batch_size // max(workers, 1), 1)


def count_params(model_cfg: ErnieConfig) -> tuple[int, int]:
    with torch.device("meta"):
        model = ErnieForCausalLM(model_cfg)
    return model.num_params(), model.num_active_params()


def training_memory(
    model_cfg: ErnieConfig,
    workers: int,
    micro_batch: int,
    seq_len: int,
    shard: bool,
    expert_parallel: int = 1,
    precision: str = "bf16",
) -> MemoryPlan:
    total, active = count_params(model_cfg)
    expert_params = _expert_params(model_cfg)
    dense_params = total - expert_params
    shards = max(workers, 1) if shard else 1
    # as `stages.training.parallel.Layout` places them: FSDP2 shards the experts with everything else,
    # unless expert parallelism splits them (then FSDP2 leaves them alone)
    experts_per_gpu = expert_params / expert_parallel if expert_parallel > 1 else expert_params / shards
    per_gpu = dense_params / shards + experts_per_gpu
    element = 3.5 if precision == "bf16" else 4.0  # autocast: matmul outputs bf16, residuals and norms fp32
    activations = 17 * element * seq_len * micro_batch * model_cfg.hidden_size * model_cfg.num_layers
    activations += 4 * seq_len * micro_batch * model_cfg.vocab_size  # fp32 logits for the loss
    return MemoryPlan(
        total_params=total,
        active_params=active,
        params_gb=per_gpu * 4 / GiB,
        grads_gb=per_gpu * 4 / GiB,
        optimizer_gb=per_gpu * 8 / GiB,
        activations_gb=activations / GiB,
    )


def _expert_params(cfg: ErnieConfig) -> int:
    if cfg.moe is None:
        return 0
    m = cfg.moe
    per_layer = m.num_experts * 3 * cfg.hidden_size * m.intermediate_size
    per_layer += m.vision_num_experts * 3 * cfg.hidden_size * m.vision_intermediate_size
    return per_layer * len(cfg.moe_layers)
