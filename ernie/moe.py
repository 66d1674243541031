"""Mixture-of-experts layers of ERNIE 4.5, including the VL models' modality-isolated pools.

Shape legend used in names below:
    T tokens, H hidden size, E experts in a pool, K top-k, I expert width,
    N = T * K routed slots (one per token-expert pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ErnieConfig
from .layers import SwiGLU
from .recompute import recomputing

if TYPE_CHECKING:
    from .expert_parallel import ExpertShard

ExpertsImpl = Literal["auto", "grouped", "loop", "gather"]


@dataclass
class RouterOutput:
    """One pool's routing decision for its tokens, kept for the router losses and stats."""

    pool: str  # "text" or "vision"
    logits_TE: torch.Tensor  # fp32
    probs_TE: torch.Tensor  # fp32 softmax
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    orthogonal: torch.Tensor | None
    """The router weight's orthogonality loss, computed in the router's forward: a sharded model
    (FSDP2) frees the gathered weight once the layer has run. None under no_grad (inference)."""


class Router(nn.Module):
    """ERNIE top-k softmax router.

    softmax over the fp32 logits, top-k selection on `probs + e_score_correction_bias`
    (the aux-free balancing bias only changes *which* experts are chosen), mixing weights
    from the unbiased probabilities renormalised over the chosen k (ERNIE_FACTS §2.3).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_min: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Tokens dispatched per expert since the last balancing step (aux-free bias update).
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.top_k, self.norm_min = top_k, norm_min

    def forward(self, x_TH: torch.Tensor) -> RouterOutput:
        from .losses import orthogonal_loss  # losses imports this module

        with torch.autocast(device_type=x_TH.device.type, enabled=False):
            logits_TE = F.linear(x_TH.float(), self.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            biased_TE = probs_TE + self.e_score_correction_bias.float()
            topk_ids_TK = torch.topk(biased_TE, self.top_k, dim=-1).indices
            topk_probs_TK = probs_TE.gather(-1, topk_ids_TK)
            topk_weights_TK = topk_probs_TK / topk_probs_TK.sum(-1, keepdim=True).clamp(min=self.norm_min)
        if self.training and not recomputing():  # a recomputed forward must not count its tokens twice
            with torch.no_grad():
                self.expert_load += count_per_expert(topk_ids_TK, self.weight.shape[0]).float()
        return RouterOutput(
            pool="text",
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            topk_ids_TK=topk_ids_TK,
            topk_weights_TK=topk_weights_TK.to(x_TH.dtype),
            orthogonal=orthogonal_loss(self.weight) if torch.is_grad_enabled() else None,
        )


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots per expert [E] (int64); a fixed-size scatter, so torch.compile keeps one graph."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    return counts.scatter_add_(0, expert_ids.flatten(), torch.ones_like(expert_ids.flatten()))


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Where torch._grouped_mm runs: bf16 on CPU and Hopper+ GPUs; fp32 on CPU in eager mode
    only (its compile-time shape function insists on bf16)."""
    return grouped_mm_runs(x.dtype, x.device, compiled=torch.compiler.is_compiling())


def grouped_mm_runs(dtype: torch.dtype, device: torch.device, compiled: bool) -> bool:
    """`grouped_mm_supported` for tensors of `dtype` on `device`, in a compiled graph or eagerly."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype == torch.bfloat16 or (dtype == torch.float32 and not compiled)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj [E, 2I, H] (gate rows first), down_proj [E, H, I].

    Three paths with equal outputs: `loop` (the readable reference: one masked matmul per
    expert), `grouped` (sort slots by expert, then two grouped GEMMs through
    `torch._grouped_mm`, or one matmul per contiguous expert segment where that op is
    not supported) and `gather` (each slot's expert weights gathered, two batched
    matrix-vector products: no shape depends on the routing, so a compiled decode step keeps
    one graph; it reads a weight copy per slot, so it is for a few tokens only).

    With expert parallelism (`ernie.expert_parallel.shard_experts`) the parameters hold only
    this rank's experts, `ep` says which, and forward exchanges slots with the other ranks.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.ep: ExpertShard | None = None

    def forward(
        self,
        x_TH: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        impl: ExpertsImpl = "auto",
    ) -> torch.Tensor:
        if self.ep is not None:
            from .expert_parallel import ep_forward

            return ep_forward(self, x_TH, topk_ids_TK, topk_weights_TK, impl)
        if impl == "loop":
            return self._forward_loop(x_TH, topk_ids_TK, topk_weights_TK)
        if impl == "gather":
            return self._forward_gather(x_TH, topk_ids_TK, topk_weights_TK)
        return self._forward_grouped(x_TH, topk_ids_TK, topk_weights_TK)

    def _swiglu(self, h_N2I: torch.Tensor) -> torch.Tensor:
        gate, up = h_N2I.split(self.intermediate, dim=-1)
        return F.silu(gate) * up

    def _forward_loop(self, x_TH, topk_ids_TK, topk_weights_TK) -> torch.Tensor:
        out_TH = torch.zeros_like(x_TH)
        for e in range(self.num_experts):
            token_idx, k_pos = torch.where(topk_ids_TK == e)
            if token_idx.numel() == 0:
                continue
            h = self._swiglu(F.linear(x_TH[token_idx], self.gate_up_proj[e]))
            y = F.linear(h, self.down_proj[e]) * topk_weights_TK[token_idx, k_pos, None]
            out_TH.index_add_(0, token_idx, y.to(out_TH.dtype))
        return out_TH

    def _forward_gather(self, x_TH, topk_ids_TK, topk_weights_TK) -> torch.Tensor:
        T, K = topk_ids_TK.shape
        expert_of_slot_N = topk_ids_TK.flatten()
        x_N1H = x_TH.repeat_interleave(K, dim=0)[:, None, :]
        h_N2I = torch.bmm(x_N1H, self.gate_up_proj[expert_of_slot_N].transpose(1, 2))[:, 0]
        y_NH = torch.bmm(self._swiglu(h_N2I)[:, None, :], self.down_proj[expert_of_slot_N].transpose(1, 2))[:, 0]
        y_TKH = y_NH.view(T, K, -1) * topk_weights_TK[..., None]
        return y_TKH.sum(dim=1).to(x_TH.dtype)

    def _forward_grouped(self, x_TH, topk_ids_TK, topk_weights_TK) -> torch.Tensor:
        T, K = topk_ids_TK.shape
        # 1. dispatch: order the N = T*K slots by expert
        expert_of_slot_N = topk_ids_TK.flatten()
        order_N = torch.argsort(expert_of_slot_N, stable=True)
        token_of_slot_N = order_N // K
        tokens_per_expert_E = count_per_expert(expert_of_slot_N, self.num_experts)
        x_NH = x_TH[token_of_slot_N]
        # 2. experts: two grouped GEMMs over contiguous expert segments
        y_NH = self.run_experts(x_NH, tokens_per_expert_E)
        # 3. combine: weight each slot and add it back to its token
        y_NH = y_NH * topk_weights_TK.flatten()[order_N, None]
        return torch.zeros_like(x_TH).index_add_(0, token_of_slot_N, y_NH.to(x_TH.dtype))

    def run_experts(self, x_NH: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Each stored expert's SwiGLU on its contiguous segment of x_NH (slots sorted by expert; E here is
        the experts this module holds: all of them, or this rank's under expert parallelism)."""
        if grouped_mm_supported(x_NH):
            offsets_E = torch.cumsum(tokens_per_expert_E, dim=0, dtype=torch.int32)
            h_N2I = torch._grouped_mm(x_NH, self.gate_up_proj.transpose(-2, -1), offs=offsets_E)
            return torch._grouped_mm(self._swiglu(h_N2I), self.down_proj.transpose(-2, -1), offs=offsets_E)
        segments = x_NH.split(tokens_per_expert_E.tolist())
        return torch.cat(
            [
                F.linear(self._swiglu(F.linear(seg, self.gate_up_proj[e])), self.down_proj[e])
                for e, seg in enumerate(segments)
            ]
        )


class ExpertPool(nn.Module):
    """A router and the experts it routes to (the whole MoE of a text model; one modality's in VL)."""

    def __init__(self, hidden: int, num_experts: int, intermediate: int, top_k: int, norm_min: float, name: str):
        super().__init__()
        self.name = name
        self.gate = Router(hidden, num_experts, top_k, norm_min)
        self.experts = GroupedExperts(num_experts, hidden, intermediate)

    def forward(self, x_TH: torch.Tensor, impl: ExpertsImpl) -> tuple[torch.Tensor, RouterOutput]:
        routing = self.gate(x_TH)
        routing.pool = self.name
        return self.experts(x_TH, routing.topk_ids_TK, routing.topk_weights_TK, impl), routing


class MoE(nn.Module):
    """ERNIE 4.5 MoE feed-forward block.

    Forward, per token:
        1. route: the token's modality pool (text, or vision for image/video tokens in VL
           models) scores its experts and picks the top k (`Router`);
        2. dispatch: slots are sorted by expert;
        3. experts: each expert's SwiGLU runs on its contiguous slots (grouped GEMM);
        4. combine: expert outputs are weighted and summed back per token;
        5. shared: the shared-expert MLP output is added for every token, any modality.
    Text tokens never reach vision experts nor the vision router, and vice versa. A pool with no
    tokens is skipped, unless `_runs_without_tokens` (expert parallelism, `every_pool_runs`).
    """

    def __init__(self, config: ErnieConfig) -> None:
        super().__init__()
        m = config.moe
        assert m is not None
        H = config.hidden_size
        self.text = ExpertPool(H, m.num_experts, m.intermediate_size, m.top_k, m.norm_min, "text")
        self.vision = None
        if config.vision is not None:
            self.vision = ExpertPool(H, m.vision_num_experts, m.vision_intermediate_size, m.top_k, m.norm_min, "vision")
        self.shared_experts = None
        if m.num_shared_experts > 0:
            self.shared_experts = SwiGLU(H, m.intermediate_size * m.num_shared_experts)
        self.every_pool_runs = False
        """Run each pool even when no token is of its modality (set by `ErnieForCausalLM.every_part_runs`):
        its parameters then join the graph with zero gradients, as FSDP2 needs; outputs are unchanged."""

    def forward(
        self, x_BSH: torch.Tensor, vision_mask_BS: torch.Tensor | None = None, impl: ExpertsImpl = "auto"
    ) -> tuple[torch.Tensor, list[RouterOutput]]:
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(-1, H)
        vision_always = self.vision is not None and self._runs_without_tokens(self.vision)
        if vision_always and vision_mask_BS is None:
            vision_mask_BS = torch.zeros(B, S, dtype=torch.bool, device=x_BSH.device)
        if self.vision is None or vision_mask_BS is None or not (vision_always or bool(vision_mask_BS.any())):
            out_TH, routing = self.text(x_TH, impl)
            routings = [routing]
        else:
            is_vision_T = vision_mask_BS.reshape(-1)
            text_idx, vision_idx = (~is_vision_T).nonzero().squeeze(1), is_vision_T.nonzero().squeeze(1)
            out_TH = torch.zeros_like(x_TH)
            routings = []
            for pool, idx in ((self.text, text_idx), (self.vision, vision_idx)):
                if idx.numel() == 0 and not self._runs_without_tokens(pool):
                    continue
                # a pool with every token takes x_TH as it is: the text-only path's gradient sums, bit for bit
                every_token = idx.numel() == x_TH.shape[0]
                # the loop reference skips experts without slots: an empty pool's weights would miss the graph
                pool_out, routing = pool(x_TH if every_token else x_TH[idx], impl if idx.numel() > 0 else "grouped")
                out_TH = out_TH + pool_out if every_token else out_TH.index_copy(0, idx, pool_out)
                if idx.numel() > 0:  # the router losses average over the pools that saw tokens
                    routings.append(routing)
        if self.shared_experts is not None:
            out_TH = out_TH + self.shared_experts(x_TH)
        return out_TH.view(B, S, H), routings

    def _runs_without_tokens(self, pool: ExpertPool) -> bool:
        """Whether `pool` runs on a forward with none of its modality's tokens: under expert parallelism
        (its all-to-alls are collective, every rank joins them) and under `every_pool_runs`."""
        return self.every_pool_runs or pool.experts.ep is not None


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float) -> None:
    """Aux-loss-free balancing, after each optimizer step: every router's selection bias moves by
    `rate` toward its under-used experts, `bias += rate * sign(mean(load) - load)`, from the tokens
    dispatched since the last update (summed over data-parallel ranks), then the counts restart.

    Only the top-k selection sees the bias; the combine weights stay the unbiased probabilities.
    Collective when torch.distributed is initialised: every rank calls it at the same step, and all
    ranks end with the same biases.
    """
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        return
    loads = torch.cat([r.expert_load for r in routers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    for router, load in zip(routers, loads.split([r.expert_load.numel() for r in routers]), strict=True):
        if load.sum() > 0:
            router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
        router.expert_load.zero_()
