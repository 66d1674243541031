"""Per-GPU memory estimate of a training stage, for `plan` (an estimate, printed as such).

What the training stages hold: fp32 parameters, fp32 gradients and AdamW's two fp32 moments
(16 bytes per parameter; bf16 runs autocast and keep these in fp32), sharded over the
data-parallel workers when the stage shards (FSDP2), experts over the expert-parallel group
instead when there is one.

Activations are counted from the tensors one decoder layer saves for backward, per token, from
the model's dimensions (`layer_activation_elements`): the norms' inputs and outputs and the
residual stream (3 x hidden per sublayer), SDPA's q, k, v, output and log-sum-exp, and the
SwiGLU's gate, up, activation and product, per routed expert a token visits plus the shared
experts. An element is 4 bytes in fp32 and 3 on average under bf16 autocast (matmul outputs
are bf16, the residual stream and norms stay fp32). Recomputation keeps less and pays with one
layer (or one MLP) recomputed at a time during backward; the loss keeps fp32 logits of every
token, or of one chunk with `loss_impl=chunked`.

bf16 without FSDP2 also keeps autocast's bf16 copy of every weight a kept matmul used (2 bytes a
parameter, counted with the parameters); FSDP2 gathers its units in bf16 instead
(`MixedPrecisionPolicy`) and frees them after each forward, so only the units in use exist.
tests/test_memory_plan.py holds the kept bytes to what autograd saves.
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
    recompute: str = "none",
    loss_impl: str = "logits",
    recompute_every: int = 1,
) -> MemoryPlan:
    total, active = count_params(model_cfg)
    expert_params = _expert_params(model_cfg)
    dense_params = total - expert_params
    shards = max(workers, 1) if shard else 1
    # as `stages.training.parallel.Layout` places them: FSDP2 shards the experts with everything else,
    # unless expert parallelism splits them (then FSDP2 leaves them alone)
    experts_per_gpu = expert_params / expert_parallel if expert_parallel > 1 else expert_params / shards
    per_gpu = dense_params / shards + experts_per_gpu
    kept, transient = activation_bytes(
        model_cfg, micro_batch * seq_len, precision, recompute, loss_impl, recompute_every
    )
    local_experts = experts_per_gpu if expert_parallel > 1 else 0.0
    copies = sum(working_copy_bytes(model_cfg, total, precision, recompute, shard, local_experts, recompute_every))
    return MemoryPlan(
        total_params=total,
        active_params=active,
        params_gb=(per_gpu * 4 + copies) / GiB,
        grads_gb=per_gpu * 4 / GiB,
        optimizer_gb=per_gpu * 8 / GiB,
        activations_gb=(kept + transient) / GiB,
    )


LOSS_CHUNK_TOKENS = 4096
"""`ernie.chunked_loss`'s default chunk: the logits `loss_impl=chunked` holds at a time."""


def activation_bytes(
    cfg: ErnieConfig,
    tokens: int,
    precision: str = "bf16",
    recompute: str = "none",
    loss_impl: str = "logits",
    recompute_every: int = 1,
) -> tuple[float, float]:
    """(bytes kept for backward through one forward of `tokens` tokens, bytes live only while one
    checkpointed part runs again in backward). `recompute` applies to every `recompute_every`-th layer."""
    element = 3.0 if precision == "bf16" else 4.0
    kept, transient = 0.0, 0.0
    for i in range(cfg.num_layers):
        attention, mlp = layer_activation_elements(cfg, i)
        policy = recompute if i % recompute_every == 0 else "none"
        if policy == "layers":  # the layer keeps its fp32 input and is rebuilt whole in backward
            kept += 4.0 * cfg.hidden_size
            transient = max(transient, element * (attention + mlp))
        elif policy == "mlp":  # attention's activations stay, and the fp32 norm and residual before the MLP
            kept += element * attention + 4.0 * 3 * cfg.hidden_size
            transient = max(transient, element * mlp)
        elif policy == "none":
            kept += element * (attention + mlp)
        else:
            raise ValueError(f"unknown recompute policy {recompute!r}")
    kept += 4.0 * 3 * cfg.hidden_size  # the final norm's input and output, the head's input (fp32)
    logits = 4.0 * cfg.vocab_size * (min(tokens, LOSS_CHUNK_TOKENS) if loss_impl == "chunked" else tokens)
    if loss_impl == "chunked":
        return kept * tokens, transient * tokens + logits
    return kept * tokens + logits, transient * tokens


def working_copy_bytes(
    cfg: ErnieConfig,
    total_params: int,
    precision: str,
    recompute: str,
    shard: bool,
    local_experts: float = 0.0,
    recompute_every: int = 1,
) -> tuple[float, float]:
    """(bytes of bf16 weight copies kept from a forward to its backward, bytes alive only while one
    part runs). Autocast casts each weight a matmul uses and autograd keeps the cast; a recomputed
    part keeps none (its casts live while it runs again). Under FSDP2 the units gathered in bf16 are
    the copies: the root (embeddings, head) and about two layers at a time; expert slices FSDP2
    leaves to expert parallelism (`local_experts` parameters) are cast by autocast."""
    if precision != "bf16":
        return 0.0, 0.0
    h = cfg.hidden_size
    head = cfg.vocab_size * h
    layer = (total_params - head) / cfg.num_layers
    recomputed = 0.0 if recompute == "none" else len(range(0, cfg.num_layers, recompute_every)) / cfg.num_layers
    if shard:
        return 2.0 * local_experts * (1 - recomputed), 2.0 * (head + 2 * layer)
    attention = h * (2 * cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim)
    kept_of_recomputed = {"none": layer, "mlp": attention, "layers": 0.0}[recompute]
    kept = head + cfg.num_layers * ((1 - recomputed) * layer + recomputed * kept_of_recomputed)
    return 2.0 * kept, 2.0 * layer * (recompute != "none")


def layer_activation_elements(cfg: ErnieConfig, layer: int) -> tuple[int, int]:
    """(attention, MLP) elements one token leaves saved for backward in decoder layer `layer`."""
    h = cfg.hidden_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = 3 * h + 2 * q + 2 * kv + cfg.num_heads
    if cfg.moe is None or layer not in cfg.moe_layers:
        return attention, 3 * h + 4 * cfg.intermediate_size
    m = cfg.moe
    shared = 4 * m.num_shared_experts * m.intermediate_size
    routed = m.num_experts + m.top_k * (3 * h + 4 * m.intermediate_size)
    return attention, 3 * h + routed + shared


GPU_GIB = 80
"""The GPU `plan` sizes deployments for (H100 / A100 80 GB)."""


def serving_weights_gb(
    model_cfg: ErnieConfig, bits: int, group_size: int, skip: list[str], module_bits: dict[str, int] | None = None
) -> float:
    """GiB of one replica's weights as the quantize stage packs them: the quantized linears and experts
    at their width (`bits`, or the first matching pattern of `module_bits`) plus an fp16 scale and a uint8
    zero point per group; embeddings, norms, routers and the modules of `skip` in bf16."""
    from stages.quantize.rtn import bits_of, is_skipped

    with torch.device("meta"):
        model = ErnieForCausalLM(model_cfg)
    total = 0.0
    for name, param in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        packed = param.ndim >= 2 and not is_skipped(module, skip)
        packed = packed and "embed_tokens" not in name and not module.endswith(".gate")
        bits_per_weight = bits_of(module, module_bits or {}, bits) + (16 + 8) / group_size
        total += param.numel() * (bits_per_weight / 8 if packed else 2)
    return total / GiB


def min_gpus(weights_gb: float, gpu_gib: float = GPU_GIB, usable: float = 0.9) -> int:
    """GPUs whose memory (a `usable` share of each, the rest for the runtime) holds the weights."""
    return max(1, -int(-weights_gb // (usable * gpu_gib)))


def _expert_params(cfg: ErnieConfig) -> int:
    if cfg.moe is None:
        return 0
    m = cfg.moe
    per_layer = m.num_experts * 3 * cfg.hidden_size * m.intermediate_size
    per_layer += m.vision_num_experts * 3 * cfg.hidden_size * m.vision_intermediate_size
    return per_layer * len(cfg.moe_layers)
