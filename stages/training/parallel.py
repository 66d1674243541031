"""Data-parallel wrapping shared by pretraining and post-training: DDP, or FSDP2 sharding."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

PARALLEL_MODES = ("fsdp", "ddp")


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over `model` on `device`.

    No buffer sync per forward: the router bias is identical on every rank and the expert-load
    counters are per-rank statistics. A VL model looks for unused parameters: a batch without
    images (every post-training chat, some pretraining micro-batches) leaves the vision encoder,
    the adapter and the vision experts out of the graph, on some ranks only, and the ranks'
    gradient buckets would otherwise disagree.
    """
    return DistributedDataParallel(
        model,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,
        find_unused_parameters=getattr(model.config, "vision", None) is not None,
    )


def shard_fsdp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) over all ranks: each decoder layer is one unit (its parameters are
    gathered just before it runs and freed after), the rest (embeddings, final norm, head, and in
    VL models the vision encoder and adapter) forms the root unit. Shards in place; returns `model`.

    Every rank must run the same forwards: parameters are all-gathered per unit, a collective. The
    vision parts stay in the root unit, which every forward gathers, so a rank whose micro-batch has
    no image does not skip a collective the others make; their gradients are zero on that rank.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    layers = list(model.model.layers)
    for i, layer in enumerate(layers):
        # the last layer's gradients are reduced right away, nothing is gained by keeping them gathered
        fully_shard(layer, mesh=mesh, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Collective for a sharded model: the whole state dict, on CPU, at rank 0 (empty elsewhere)."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else {}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
