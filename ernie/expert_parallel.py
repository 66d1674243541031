"""Expert parallelism (EP) for the MoE pools: each rank of a process group keeps a slice of every pool's experts.

    shard_experts(model, group)            # once, before the optimizer and any DDP/FSDP wrapping
    loss = model(**batch).loss; loss.backward()
    reduce_expert_grads(model, replica_group, world_size)   # expert grads; DDP/FSDP handle the dense ones
    state = full_expert_state_dict(model)  # collective: the unsharded state dict, for export / checkpoints

A pool's forward routes as usual, then sends each slot to the rank that owns its expert (all-to-all),
runs the local experts there and sends the results back (all-to-all), so outputs equal the
single-process model's. Every rank of the group must call every pool in the same order, with
zero tokens if it has none (`MoE.forward` does that when EP is on).

Shape legend (as in `ernie.moe`): T tokens, H hidden, K top-k, N = T*K slots sent, M slots
received, E experts in the pool, P ranks in the EP group, L = E / P local experts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from .moe import ExpertsImpl, GroupedExperts, count_per_expert

EXPERT_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertShard:
    """Where a pool's experts live: this rank holds experts [first_expert, first_expert + num_local_experts)."""

    group: ProcessGroup | None  # None: the default (world) group
    rank: int  # rank inside `group`
    size: int
    num_global_experts: int
    first_expert: int

    @property
    def num_local_experts(self) -> int:
        return self.num_global_experts // self.size


# ---------------------------------------------------------------------------------------------- sharding
def shard_experts(model: nn.Module, group: ProcessGroup | None = None) -> None:
    """Keep only this rank's slice of every pool's experts (copies, so the full tensors can be freed).

    Every pool is checked before any is changed, so an uneven split leaves the model untouched.
    """
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    pools = _expert_modules(model)
    for name, experts in pools:
        if experts.ep is not None:
            raise ValueError(f"{name} is already expert-parallel")
        if experts.gate_up_proj.shape[0] % size != 0:
            raise ValueError(
                f"{name}: {experts.gate_up_proj.shape[0]} experts do not split evenly over an "
                f"expert-parallel group of {size} ranks"
            )
    for _, experts in pools:
        E = experts.gate_up_proj.shape[0]
        shard = ExpertShard(group, rank, size, E, rank * (E // size))
        for param_name in EXPERT_PARAMS:
            full = getattr(experts, param_name)
            local = _local_slice(full.detach(), shard).clone().contiguous()
            setattr(experts, param_name, nn.Parameter(local, requires_grad=full.requires_grad))
        experts.ep = shard


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The sharded expert parameters: keep them out of DDP (their gradients need `reduce_expert_grads`)."""
    return [getattr(experts, name) for _, experts in _sharded(model) for name in EXPERT_PARAMS]


def reduce_expert_grads(model: nn.Module, replica_group: ProcessGroup | None, world_size: int) -> None:
    """Turn the expert gradients into those of the mean loss over all `world_size` data-parallel ranks.

    The all-to-all backward already sums every EP-group rank's loss gradient into the owning rank;
    `replica_group` (the ranks holding the same experts in other EP groups, None when there is one
    EP group) adds the other groups' sums; dividing by `world_size` makes it a mean like DDP's.
    """
    for param in expert_parameters(model):
        if param.grad is None:  # every rank must join the all-reduce, even one whose loss skipped the experts
            param.grad = torch.zeros_like(param)
        if replica_group is not None:
            dist.all_reduce(param.grad, group=replica_group)
        param.grad.div_(world_size)


# ---------------------------------------------------------------------------------------------- state dicts
def named_expert_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, ExpertShard]]:
    """State-dict key -> (this rank's slice, where the slice sits) of every sharded expert tensor."""
    return {
        _key(name, param_name): (getattr(experts, param_name), experts.ep)
        for name, experts in _sharded(model)
        for param_name in EXPERT_PARAMS
    }


def full_expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every sharded expert tensor all-gathered to its full [E, ...] shape, by state-dict key (collective)."""
    full = {}
    for key, (param, shard) in named_expert_parameters(model).items():
        local = param.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(shard.size)]
        dist.all_gather(parts, local, group=shard.group)
        full[key] = torch.cat(parts)
    return full


def full_expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every expert tensor all-gathered to its full [E, ...] shape (collective).

    Keys and shapes are those of the unsharded model, so export and checkpoint code take it unchanged.
    """
    return model.state_dict() | full_expert_tensors(model)


def load_full_expert_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (strictly) into an EP-sharded model, each rank taking its experts."""
    local = dict(state_dict)
    for name, experts in _sharded(model):
        for param_name in EXPERT_PARAMS:
            key = _key(name, param_name)
            full = state_dict[key]
            if full.shape[0] != experts.ep.num_global_experts:
                raise ValueError(
                    f"{key}: {full.shape[0]} experts in the state dict, the pool has {experts.ep.num_global_experts}"
                )
            local[key] = _local_slice(full, experts.ep)
    model.load_state_dict(local)


# ---------------------------------------------------------------------------------------------- forward
def ep_forward(
    experts: GroupedExperts,
    x_TH: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    impl: ExpertsImpl = "auto",
) -> torch.Tensor:
    """`GroupedExperts.forward` with the experts spread over the EP group (always the grouped path; `impl`
    is accepted for the same signature). Differentiable; every rank of the group must call it, T may be 0.
    """
    ep = experts.ep
    assert ep is not None
    K = topk_ids_TK.shape[1]
    # 1. dispatch: order the slots by global expert, so each destination rank's slots are contiguous
    expert_of_slot_N = topk_ids_TK.flatten()
    order_N = torch.argsort(expert_of_slot_N, stable=True)
    token_of_slot_N = order_N // K
    sent_PL = count_per_expert(expert_of_slot_N, ep.num_global_experts).view(ep.size, ep.num_local_experts)
    received_PL = _exchange_counts(sent_PL, ep)
    send_splits, recv_splits = sent_PL.sum(1).tolist(), received_PL.sum(1).tolist()
    x_MH = _AllToAll.apply(x_TH[token_of_slot_N], send_splits, recv_splits, ep.group)
    # 2. experts: received slots come by (source rank, local expert); regroup them by local expert
    by_expert_M = _local_expert_order(received_PL, sum(recv_splits))
    y_sorted_MH = experts.run_experts(x_MH[by_expert_M], received_PL.sum(0))
    y_MH = y_sorted_MH[torch.argsort(by_expert_M)]
    y_NH = _AllToAll.apply(y_MH, recv_splits, send_splits, ep.group)
    # 3. combine: weight each slot and add it back to its token, as `_forward_grouped` does
    y_NH = y_NH * topk_weights_TK.flatten()[order_N, None]
    return torch.zeros_like(x_TH).index_add_(0, token_of_slot_N, y_NH.to(x_TH.dtype))


def _exchange_counts(sent_PL: torch.Tensor, ep: ExpertShard) -> torch.Tensor:
    """received[s, l]: slots source rank s sends to this rank's local expert l (row p of `sent` goes to rank p)."""
    received_PL = torch.empty_like(sent_PL)
    dist.all_to_all_single(received_PL, sent_PL.contiguous(), group=ep.group)
    return received_PL


def _local_expert_order(received_PL: torch.Tensor, num_received: int) -> torch.Tensor:
    """Permutation [M] that groups the received slots by local expert, keeping source-rank order inside each."""
    P, L = received_PL.shape
    local_expert_M = torch.arange(L, device=received_PL.device).repeat(P)
    local_expert_M = local_expert_M.repeat_interleave(received_PL.flatten(), output_size=num_received)
    return torch.argsort(local_expert_M, stable=True)


def _all_to_all(x_NH: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out_MH = x_NH.new_empty((sum(recv_splits), *x_NH.shape[1:]))
    dist.all_to_all_single(out_MH, x_NH.contiguous(), recv_splits, send_splits, group=group)
    return out_MH


class _AllToAll(torch.autograd.Function):
    """Variable-split all-to-all of rows whose backward is the reverse all-to-all.

    Own Function because `torch.distributed.nn.functional.all_to_all_single` is deprecated
    (a FutureWarning on every call) in the torch this project pins.
    """

    @staticmethod
    def forward(ctx, x_NH: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all(x_NH, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_MH: torch.Tensor):
        return _all_to_all(grad_MH, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


# ---------------------------------------------------------------------------------------------- helpers
def _expert_modules(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, GroupedExperts)]


def _sharded(model: nn.Module) -> list[tuple[str, GroupedExperts]]:
    return [(name, m) for name, m in _expert_modules(model) if m.ep is not None]


def _local_slice(full: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    return full[shard.first_expert : shard.first_expert + shard.num_local_experts]


def _key(module_name: str, param_name: str) -> str:
    return f"{module_name}.{param_name}" if module_name else param_name
