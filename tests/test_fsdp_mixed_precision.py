"""bf16 training under FSDP2 (`Layout(param_dtype=bf16)`) on 2 gloo ranks: decoder layers are
gathered and computed in bf16 with fp32 shards and fp32 gradient reduction, the run follows the
autocast-only DDP run, and a forward keeps no bf16 copy of the layers' weights for backward."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, spawn

from ernie import get_preset

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS = 2, 3


def _kept_bytes(model: torch.nn.Module, train_model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the storages autograd holds for backward once the forward is over (a storage FSDP2
    freed after its unit ran counts 0), parameters excluded."""
    storages: dict[int, torch.UntypedStorage] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storages.setdefault(id(tensor.untyped_storage()), tensor.untyped_storage())
        return tensor

    params = {getattr(p, "_local_tensor", p).untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = train_model(input_ids=ids, labels=ids)
    kept = sum(s.nbytes() for s in storages.values() if s.nbytes() and s.data_ptr() not in params)
    out.loss.backward()
    return kept


def _train(rank: int, port: int, name: str, mode: str, out: str, fp8: bool = False) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from ernie import ErnieForCausalLM, get_preset
    from stages.training.optim import build_optimizer
    from stages.training.parallel import Layout

    torch.manual_seed(0)
    cfg = get_preset(name)
    model = ErnieForCausalLM(cfg)
    layout = Layout.build(mode, WORLD, 1, torch.device("cpu"), torch.bfloat16 if mode == "fsdp" else None)
    fp8_linears = 0
    if fp8:
        from stages.training.fp8 import apply_fp8

        fp8_linears = apply_fp8(model)
    train_model = layout.apply(model)
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    compute_dtypes: set[torch.dtype] = set()
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: compute_dtypes.add(module.weight.dtype)
    )
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (4, 32), generator=g) for _ in range(STEPS)]
    losses = []
    for step in range(STEPS):
        ids = batches[step][rank * 2 : rank * 2 + 2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ = train_model(input_ids=ids, labels=ids)
        out_.loss.backward()
        layout.clip_grad_norm_(model, 1.0)
        grad_dtypes = {p.grad.dtype for p in model.parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        loss = out_.loss.detach().float().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
    hook.remove()
    kept = _kept_bytes(model, train_model, batches[0][rank * 2 : rank * 2 + 2])
    optimizer.zero_grad()
    layer_params = sum(p.numel() for p in model.model.layers.parameters()) * (WORLD if mode == "fsdp" else 1)
    if rank == 0:
        record = {
            "losses": losses,
            "compute": sorted(str(d) for d in compute_dtypes),
            "params": sorted({str(p.dtype) for p in model.parameters()}),
            "grads": sorted(str(d) for d in grad_dtypes),
            "kept": kept,
            "layer_params": layer_params,
            "fp8_linears": fp8_linears,
        }
        torch.save(record, Path(out) / f"{name}-{mode}{'-fp8' if fp8 else ''}.pt")
    del train_model, model, optimizer
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["tiny_dense", "tiny_moe"])
def test_fsdp_gathers_layers_in_bf16_and_follows_the_autocast_run(tmp_path, name):
    runs = {}
    for mode in ("fsdp", "ddp"):
        spawn(_train, free_port(), name, mode, str(tmp_path), nprocs=WORLD)
        runs[mode] = torch.load(tmp_path / f"{name}-{mode}.pt", weights_only=True)
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    assert fsdp["compute"] == ["torch.bfloat16"] and ddp["compute"] == ["torch.float32"]
    assert fsdp["params"] == ["torch.float32"] and fsdp["grads"] == ["torch.float32"], "fp32 shards and grads"
    # both run the matmuls in bf16; fsdp also reads bf16-rounded norm and router weights (measured: 1.3e-4)
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-3)
    # autocast keeps a bf16 cast of every layer weight (2 bytes a parameter); gathered units are freed
    assert ddp["kept"] - fsdp["kept"] > 1.5 * ddp["layer_params"], (ddp["kept"], fsdp["kept"])


def test_fp8_linears_train_under_fsdp_close_to_bf16(tmp_path):
    """torchao's Float8Linear in every eligible decoder-layer linear (PyTorch runs FP8 matmuls on CPU
    too): the run trains and its losses stay within FP8's rounding of the bf16 run's."""
    runs = {}
    for fp8 in (False, True):
        spawn(_train, free_port(), "tiny_dense", "fsdp", str(tmp_path), fp8, nprocs=WORLD)
        runs[fp8] = torch.load(tmp_path / f"tiny_dense-fsdp{'-fp8' if fp8 else ''}.pt", weights_only=True)
    layers = get_preset("tiny_dense").num_layers
    assert runs[True]["fp8_linears"] == 7 * layers, "q, k, v, o and the MLP's gate, up, down of every layer"
    assert runs[True]["losses"] == pytest.approx(runs[False]["losses"], rel=5e-3)
    assert runs[True]["losses"][-1] != runs[False]["losses"][-1], "the FP8 run is not the bf16 run"
