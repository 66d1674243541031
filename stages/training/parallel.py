"""Data-parallel wrapping shared by pretraining and post-training: DDP, or FSDP2 sharding; expert
parallelism for the MoE pools beside either (`Layout`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def wrap_ddp(model: torch.nn.Module, device: torch.device, ignore: list[str] = ()) -> DistributedDataParallel:
    """DDP over `model` on `device`.

    No buffer sync per forward: the router bias is identical on every rank and the expert-load
    counters are per-rank statistics. A VL model looks for unused parameters: a batch without
    images (every post-training chat, some pretraining micro-batches) leaves the vision encoder,
    the adapter and the vision experts out of the graph, on some ranks only, and the ranks'
    gradient buckets would otherwise disagree. `ignore`: parameter names DDP leaves alone (expert
    slices under expert parallelism, whose gradients `Layout` reduces itself).
    """
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignore))
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=getattr(model.config, "vision", None) is not None,
    )


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (names unchanged, so state dicts and FSDP2 units stay
    as they are); the first step of each new input shape pays the compilation."""
    for layer in model.model.layers:
        layer.compile()


def shard_fsdp(
    model: torch.nn.Module,
    device: torch.device,
    ignore: set[nn.Parameter] = frozenset(),
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """FSDP2 (`fully_shard`) over all ranks: each decoder layer is one unit (its parameters are
    gathered just before it runs and freed after), the rest (embeddings, final norm, head, and in
    VL models the vision encoder and adapter) forms the root unit. Shards in place; returns `model`.

    Every rank must run the same forwards and reduce the same gradients: parameters are all-gathered
    per unit and the gradients a unit has are reduce-scattered, collectives whose sizes must match.
    A rank whose micro-batch has no image would leave the vision encoder, the adapter (root unit) and
    each layer's vision experts without gradients, so a VL model is set to run every part in every
    forward (`ErnieForCausalLM.every_part_runs`: zero gradients there, outputs unchanged).
    `ignore`: parameters FSDP2 leaves alone (expert slices under expert parallelism).

    `param_dtype` (bf16 training): each decoder layer is gathered in that dtype and its gradients
    reduced in fp32 into the fp32 shards (`MixedPrecisionPolicy`). Under autocast alone every
    layer's bf16 weight casts would be kept for backward, a bf16 copy of the whole model on each
    worker; gathered in bf16 they are freed with the unit. Half the all-gather traffic too. The
    root unit stays fp32, so the embeddings, and with them the residual stream, stay fp32 as under
    autocast; the norms and the router (which computes in fp32) read bf16-rounded weights.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if getattr(model.config, "vision", None) is not None:
        model.every_part_runs = True
    with torch.no_grad():  # FSDP2 shards contiguous tensors only; a loaded checkpoint may hold transposed views
        for param in model.parameters():
            if not param.is_contiguous() and param not in ignore:
                param.data = param.data.contiguous()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # the last layer's gradients are reduced right away, nothing is gained by keeping them gathered
        mine = {p for p in layer.parameters() if p in ignore}
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=i < len(layers) - 1,
            ignored_params=mine or None,
            mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        )
    fully_shard(model, mesh=mesh, ignored_params=set(ignore) or None)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of `model` back to its shards (nothing for an unsharded model). A forward
    without gradients leaves the units FSDP2 keeps gathered for backward (the root, the last layer)
    gathered, and no backward comes to free them; an optimizer built then would hold the gathered
    tensors instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state_dict(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Collective for a sharded model: the whole state dict, on CPU, at rank 0 (empty elsewhere)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


@dataclass
class Layout:
    """How a training run spreads the model over its `world` workers.

    Dense parameters: `mode` fsdp (FSDP2 over all workers) or ddp (replicated). MoE experts, with
    `expert_parallel` = P > 1: every pool's experts are split over groups of P consecutive ranks
    (inside a node on GPUs), tokens reach them by all-to-all (`ernie.expert_parallel`); the world /
    P groups are replicas of each other. The 2-D mesh (replica, ep) names both.
    """

    mode: str
    world: int
    expert_parallel: int
    device: torch.device
    mesh: object = None
    """DeviceMesh (replica, ep) when expert_parallel > 1."""
    param_dtype: torch.dtype | None = None
    """fsdp: the dtype decoder layers are gathered and computed in (bf16 training), None = as stored."""

    @staticmethod
    def build(
        mode: str, world: int, expert_parallel: int, device: torch.device, param_dtype: torch.dtype | None = None
    ) -> Layout:
        layout = Layout(mode, world, expert_parallel, device, param_dtype=param_dtype)
        if expert_parallel > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (world // expert_parallel, expert_parallel)
            layout.mesh = init_device_mesh(device.type, shape, mesh_dim_names=("replica", "ep"))
        return layout

    # ------------------------------------------------------------------ wrapping
    def apply(self, model: nn.Module) -> nn.Module:
        """Shard the experts, then the dense parameters; returns the module to call for training."""
        experts: dict = {}
        if self.mesh is not None:
            from ernie.expert_parallel import named_expert_parameters, shard_experts

            shard_experts(model, self.mesh.get_group("ep"))
            experts = named_expert_parameters(model)
        if self.mode == "fsdp":
            return shard_fsdp(model, self.device, {param for param, _ in experts.values()}, self.param_dtype)
        return wrap_ddp(model, self.device, list(experts))

    # ------------------------------------------------------------------ gradients
    @contextlib.contextmanager
    def no_sync(self, train_model: nn.Module, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward + backward of a step that accumulates gradients.

        DDP: all-reduce only in the `last` micro-batch's backward (the others accumulate locally;
        a full replica's gradients are held either way). FSDP2: every micro-batch reduce-scatters
        into the sharded gradients; skipping it (`set_requires_gradient_sync(False)`) would keep
        every layer's unsharded gradient until the last micro-batch, the whole model's gradients
        on each worker, which defeats sharding. Expert slices are reduced by
        `reduce_expert_grads`, after the last micro-batch.
        """
        if last or not isinstance(train_model, DistributedDataParallel):
            yield
            return
        with train_model.no_sync():
            yield

    def reduce_expert_grads(self, model: nn.Module) -> None:
        """After backward: expert gradients become those of the mean loss (DDP/FSDP average the rest)."""
        if self.mesh is None:
            return
        from ernie.expert_parallel import reduce_expert_grads

        replicas = self.mesh.get_group("replica") if self.world > self.expert_parallel else None
        reduce_expert_grads(model, replicas, self.world)

    def over_ranks(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`values` summed (`op` "sum") or maxed ("max") over the ranks, as float32 on `values`' device.

        The ranks' gradients are averaged into one step, so a loss that is a mean over the step's units
        (supervised tokens, completion tokens, pairs) divides by their count over all ranks, not the
        rank's own: otherwise ranks holding fewer units weigh each of theirs more, and the step depends
        on the worker count."""
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"over_ranks op={op!r} must be one of {sorted(ops)}")
        values = values.detach().float()
        if self.world == 1:
            return values.clone()
        reduced = values.to(self.device).clone()
        dist.all_reduce(reduced, op=ops[op])
        return reduced.to(values.device)

    def per_rank_divisor(self, count: torch.Tensor | float) -> float:
        """The divisor of a rank's part of a mean over the step's units: their count over all ranks / the
        ranks (whose gradients are averaged), so the parts add up to the step's mean."""
        return float(self.over_ranks(torch.as_tensor(count, dtype=torch.float).reshape(1))[0]) / self.world

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> float:
        """Scale all gradients so their global norm is at most `max_norm`; returns the norm before."""
        if self.mesh is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        from torch.distributed.tensor import DTensor

        from ernie.expert_parallel import named_expert_parameters

        experts = {id(p) for p, _ in named_expert_parameters(model).values()}
        sharded, replicated, expert_slices = (torch.zeros((), device=self.device) for _ in range(3))
        for p in model.parameters():
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor):  # an FSDP2 shard: every rank's shards add up
                sharded += p.grad.to_local().float().pow(2).sum()
            elif id(p) in experts:  # this rank's experts: the EP group's slices add up
                expert_slices += p.grad.float().pow(2).sum()
            else:  # a DDP replica: the same on every rank
                replicated += p.grad.float().pow(2).sum()
        dist.all_reduce(sharded)
        dist.all_reduce(expert_slices, group=self.mesh.get_group("ep"))
        norm = float((sharded + replicated + expert_slices).sqrt())
        if math.isfinite(max_norm) and norm > max_norm:
            scale = max_norm / (norm + 1e-6)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    # ------------------------------------------------------------------ state
    def checkpoint_state(self, model: nn.Module, model_state: dict, optimizer_state: dict) -> None:
        """In place: expert slices (and their AdamW moments) become DTensors of the global expert tensors,
        so torch.distributed.checkpoint writes each slice once and can load them under another layout."""
        if self.mesh is None:
            return
        from torch.distributed.tensor import DTensor, Replicate, Shard

        from ernie.expert_parallel import named_expert_parameters

        def spread(t: torch.Tensor) -> DTensor:
            return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)

        for key in named_expert_parameters(model):
            model_state[key] = spread(model_state[key])
            if key in optimizer_state["state"]:  # a new dict: the old one may be the optimizer's own
                moments = optimizer_state["state"][key]
                optimizer_state["state"][key] = {
                    name: spread(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for name, v in moments.items()
                }

    def restored_state(self, model: nn.Module, model_state: dict, optimizer_state: dict) -> None:
        """In place: the inverse of `checkpoint_state` after a load (each DTensor back to this rank's slice)."""
        if self.mesh is None:
            return
        from torch.distributed.tensor import DTensor

        from ernie.expert_parallel import named_expert_parameters

        for key in named_expert_parameters(model):
            model_state[key] = model_state[key].to_local()
            if key in optimizer_state["state"]:
                moments = optimizer_state["state"][key]
                optimizer_state["state"][key] = {
                    name: v.to_local() if isinstance(v, DTensor) else v for name, v in moments.items()
                }

    def full_state_dict(self, model: nn.Module, rank: int) -> dict[str, torch.Tensor]:
        """Collective: the unsharded state dict (dense and experts), on CPU, at rank 0 (empty elsewhere)."""
        state = full_state_dict(model, rank)
        if self.mesh is not None:
            from ernie.expert_parallel import full_expert_tensors

            experts = full_expert_tensors(model)
            if rank == 0:
                state |= {k: v.cpu() for k, v in experts.items()}
        return state
