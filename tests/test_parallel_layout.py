"""`stages.training.parallel.Layout` on 2 gloo ranks: FSDP2 / DDP with and without expert parallelism
train the same, a sharded train state written under expert parallelism resumes exactly, gradient
accumulation over micro-batches (`stages.pretrain.loop.forward_backward`) trains like the whole
batch at once, and a VL model, whose workers do not all see images, trains the same under both."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, spawn

from ernie import get_preset
from pipeline.contract import UserError
from pipeline.memory import GiB, training_memory
from stages import pretrain
from stages.pretrain.loop import LOSS_NAMES

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS, SAVE_AFTER = 2, 4, 2
LAYOUTS = [("fsdp", 1), ("fsdp", 2), ("ddp", 2), ("ddp", 1)]


def _train(
    rank: int, port: int, mode: str, ep: int, out: str, checkpoint: str, model_name: str, compiled: bool
) -> None:
    """STEPS AdamW steps on fixed batches, each rank its half; rank 0 writes what it saw."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from ernie import ErnieForCausalLM
    from stages.training import train_state
    from stages.training.optim import build_optimizer
    from stages.training.parallel import Layout, compile_layers

    torch.manual_seed(0)
    cfg = get_preset(model_name)
    model = ErnieForCausalLM(cfg)
    if compiled:
        compile_layers(model)
    layout = Layout.build(mode, WORLD, ep, torch.device("cpu"))
    train_model = layout.apply(model)
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (4, 16), generator=g) for _ in range(STEPS)]
    state_dir, start = Path(out) / "state", 0
    if checkpoint == "load":
        start = train_state.load_sharded(state_dir, {"run": 1}, model, optimizer, layout)["step"]
    checkpointer = train_state.ShardedCheckpointer(state_dir, rank, layout, background=checkpoint != "save-sync")
    losses, norms = [], []
    for step in range(start, STEPS):
        ids = batches[step][rank * 2 : rank * 2 + 2]
        out_ = train_model(input_ids=ids, labels=ids)
        out_.loss.backward()
        layout.reduce_expert_grads(model)
        norms.append(layout.clip_grad_norm_(model, 0.5))
        optimizer.step()
        optimizer.zero_grad()
        loss = out_.loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / WORLD)
        if checkpoint.startswith("save") and step + 1 == SAVE_AFTER:
            extra = {"step": SAVE_AFTER, "cursor": [0, 0], "fingerprint": {"run": 1}}
            checkpointer.save(model, optimizer, extra)  # "save": written in the background while the next steps run
        checkpointer.commit_finished()
    checkpointer.close()
    weights = layout.full_state_dict(model, rank)
    state_bytes = _state_bytes(model, optimizer)
    if rank == 0:
        name = f"{model_name}-{mode}-{ep}-{checkpoint}-{compiled}.pt"
        record = {"losses": losses, "norms": norms, "weights": weights, "state_bytes": state_bytes}
        torch.save(record, Path(out) / name)
    del train_model, model, optimizer, checkpointer
    _close_group()


def _close_group() -> None:
    """Every rank done, and the wrappers that hold the group (DDP's reducer) freed, before the group
    goes: gloo threads still owning work at interpreter exit abort the process."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def _state_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes this rank holds for parameters, their gradients (same size) and the AdamW moments."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(local(p) for p in model.parameters())
    moments = sum(local(v) for state in optimizer.state.values() for v in state.values() if v.dim() > 0)
    return 2 * params + moments


def run_layout(
    tmp_path: Path, mode: str, ep: int, checkpoint: str = "none", model: str = "tiny_moe", compiled: bool = False
) -> dict:
    args = (free_port(), mode, ep, str(tmp_path), checkpoint, model, compiled)
    spawn(_train, *args, nprocs=WORLD)
    return torch.load(tmp_path / f"{model}-{mode}-{ep}-{checkpoint}-{compiled}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("layouts")
    return {(mode, ep): run_layout(root, mode, ep) for mode, ep in LAYOUTS}


def test_every_layout_trains_the_same(runs):
    reference = runs[("ddp", 1)]
    for layout, run in runs.items():
        assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5), layout
        assert run["norms"] == pytest.approx(reference["norms"], rel=1e-4), layout
        assert run["weights"].keys() == reference["weights"].keys(), layout
        for name, tensor in reference["weights"].items():  # AdamW steps of 1e-2: 1e-4 is 1% of one update
            torch.testing.assert_close(run["weights"][name], tensor, atol=1e-4, rtol=0, msg=f"{layout} {name}")
    assert reference["losses"][0] != reference["losses"][-1], "the steps train"
    assert max(reference["norms"]) > 0.5, "clipping is exercised"


def test_planned_state_memory_matches_what_each_worker_holds(runs):
    """`plan`'s parameter + gradient + optimizer bytes per worker, from the same layout decision."""
    cfg = get_preset("tiny_moe")
    for (mode, ep), run in runs.items():
        plan = training_memory(cfg, WORLD, 2, 16, shard=mode == "fsdp", expert_parallel=ep, precision="fp32")
        planned = (plan.params_gb + plan.grads_gb + plan.optimizer_gb) * GiB
        assert abs(planned - run["state_bytes"]) <= 0.02 * run["state_bytes"], (mode, ep, planned, run["state_bytes"])
    assert runs[("fsdp", 2)]["state_bytes"] < 0.6 * runs[("ddp", 1)]["state_bytes"], "sharding saves memory"


@pytest.mark.parametrize("save", ["save", "save-sync"])
def test_expert_parallel_train_state_resumes_exactly(runs, tmp_path, save):
    uninterrupted = runs[("fsdp", 2)]
    saved = run_layout(tmp_path, "fsdp", 2, save)
    assert saved["losses"] == uninterrupted["losses"]
    meta = json.loads((tmp_path / "state" / "meta.json").read_text())
    assert meta["step"] == SAVE_AFTER and len(list((tmp_path / "state" / meta["dir"]).glob("*.distcp"))) == WORLD
    resumed = run_layout(tmp_path, "fsdp", 2, "load")
    assert resumed["losses"] == uninterrupted["losses"][SAVE_AFTER:]
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name


@pytest.mark.slow
def test_compiled_decoder_layers_under_fsdp2_train_like_eager(tmp_path):
    eager = run_layout(tmp_path, "fsdp", 1, model="tiny_dense")
    compiled = run_layout(tmp_path, "fsdp", 1, model="tiny_dense", compiled=True)
    # inductor fuses and reorders fp32 reductions: equal up to rounding, not bit for bit
    assert compiled["losses"] == pytest.approx(eager["losses"], abs=1e-4)
    for name, tensor in eager["weights"].items():
        torch.testing.assert_close(compiled["weights"][name], tensor, atol=2e-4, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("overrides", "model", "message"),
    [
        ({"expert_parallel": 3}, "tiny_moe", "expert_parallel=3 must divide pretrain.num_workers=2"),
        ({"expert_parallel": 2}, "tiny_dense", "needs an MoE model"),
        ({"expert_parallel": 2, "num_workers": 6, "batch_size": 12}, "tiny_moe", None),
        ({}, "tiny_vl", None),  # VL models shard too (`ErnieForCausalLM.every_part_runs`)
        ({"parallel": "zero3"}, "tiny_moe", "pretrain.parallel='zero3' must be one of"),
    ],
)
def test_layout_settings_are_checked(overrides, model, message):
    config = pretrain.Config(**overrides)
    cfg = get_preset(model)
    if message is None:  # a valid layout, for contrast
        config.validate()
        assert config.parallel_for(cfg) == "fsdp"
        return
    with pytest.raises(UserError, match=message):
        config.validate()
        config.parallel_for(cfg)


def test_expert_parallel_must_divide_every_pool():
    cfg = get_preset("tiny_moe")
    experts = cfg.moe.num_experts
    config = pretrain.Config(expert_parallel=experts * 2, num_workers=experts * 2, batch_size=experts * 2)
    config.validate()
    with pytest.raises(UserError, match=f"must divide the {experts} experts"):
        config.parallel_for(cfg)


# ---------------------------------------------------------------------- gradient accumulation
ACCUMULATE_STEPS, WORKER_ROWS, SEQ = 3, 4, 16


def _rows(cfg, step: int, rank: int) -> list[dict]:
    """This rank's rows of a step, as the data stage stores them: packed documents (so rows hold
    different numbers of supervised tokens) and, for a VL model, image rows beside text-only ones
    (rank 0 has both, rank 1 none: under DDP its vision parameters are unused in every micro-batch,
    under FSDP2 they run on a blank image with zero gradients)."""
    from ernie.positions import vl_position_ids

    rng = np.random.default_rng(100 * step + rank)
    rows = []
    for i in range(WORKER_ROWS):
        ids = rng.integers(11, 200, SEQ)
        documents = np.cumsum(rng.random(SEQ) < 0.2)
        row = {"input_ids": ids, "labels": ids.copy(), "document_ids": documents, "position_ids": np.arange(SEQ)}
        if cfg.vision is not None:
            image = rank == 0 and i % 2 == 0
            if image:
                ids[2:8] = [cfg.image_start_token_id] + [cfg.image_token_id] * 4 + [cfg.image_end_token_id]
                row["labels"] = np.where(ids == cfg.image_token_id, -100, ids)
            grid = np.array([[1, 4, 4]] if image else np.zeros((0, 3)), dtype=np.int64)
            positions = vl_position_ids(torch.from_numpy(ids)[None], cfg, torch.from_numpy(grid))
            row["position_ids"] = positions.squeeze(1).numpy()
            row["pixel_values"] = rng.integers(0, 256, (16 if image else 0, cfg.vision.patch_dim), dtype=np.uint8)
            row["image_grid_thw"] = grid
        rows.append(row)
    return rows


def _accumulate(rank: int, world: int, port: int, case: str, mode: str, ep: int, out: str) -> None:
    """ACCUMULATE_STEPS AdamW steps with the whole batch (micro-batch 0), then from the same start
    with micro-batches of 1 row; rank 0 writes both runs' losses, norms, router counts and weights."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ernie import ErnieForCausalLM
    from ernie.moe import update_router_biases
    from stages.pretrain.loop import forward_backward
    from stages.pretrain.router_stats import RouterLoad
    from stages.training.optim import build_optimizer
    from stages.training.parallel import Layout

    cfg = ACCUMULATE_CASES[case][0]()
    runs = {}
    for micro in (0, 1):
        torch.manual_seed(0)
        model = ErnieForCausalLM(cfg)
        layout = Layout.build(mode, world, ep, torch.device("cpu"))
        train_model = layout.apply(model)
        optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
        router = RouterLoad(cfg, torch.device("cpu"))
        losses, norms = [], []
        for step in range(ACCUMULATE_STEPS):
            rows = _rows(cfg, step, rank)
            values, _ = forward_backward(
                train_model, model, layout, rows, micro, torch.device("cpu"), on_routing=router.add
            )
            norms.append(layout.clip_grad_norm_(model, 0.5))
            optimizer.step()
            optimizer.zero_grad()
            update_router_biases(model, 1e-2)
            dist.all_reduce(values)
            losses.append((values / world).tolist())
        dist.all_reduce(router.window)
        weights = layout.full_state_dict(model, rank)
        runs[micro] = {"losses": losses, "norms": norms, "router": router.window, "weights": weights}
    if rank == 0:
        torch.save(runs, Path(out) / f"accumulate-{case}-{mode}-{ep}-{world}.pt")
    del train_model, model, optimizer
    _close_group()


def _without(name: str, *weights: str, **loss):
    """Router losses that are per micro-batch, not exact, left out of the trained loss: the load-balance
    loss (E * mean prob * dispatch share, a product of means) always; in a VL model also z and
    orthogonal, averaged over the pools a batch routes to (a micro-batch without an image has no
    vision pool). The LM loss and every other part accumulate to the whole batch's."""
    cfg = get_preset(name)
    return cfg.replace(loss=dataclasses.replace(cfg.loss, **dict.fromkeys(weights, 0.0), **loss))


ACCUMULATE_CASES = {  # the config, and the loss components that match the whole batch's
    "moe": (lambda: _without("tiny_moe", "aux_loss_weight"), ("loss", "lm", "z", "orthogonal")),
    "dense-token-mean": (lambda: _without("tiny_dense", token_balanced=False), ("loss", "lm")),
    "vl": (lambda: _without("tiny_vl", "aux_loss_weight", "z_loss_weight", "orthogonal_loss_weight"), ("loss", "lm")),
}
"""moe: token-balanced LM loss (micro-batches weigh by rows); dense-token-mean: by supervised tokens."""


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """`_accumulate`'s runs by (case, world, mode, ep), each spawned once for the module."""
    root, done = tmp_path_factory.mktemp("accumulate"), {}

    def run(case: str, world: int, mode: str, ep: int) -> dict:
        key = (case, world, mode, ep)
        if key not in done:
            spawn(_accumulate, world, free_port(), case, mode, ep, str(root), nprocs=world)
            done[key] = torch.load(root / f"accumulate-{case}-{mode}-{ep}-{world}.pt", weights_only=True)
        return done[key]

    return run


@pytest.mark.parametrize(
    ("case", "world", "mode", "ep"),
    [
        ("moe", 1, "fsdp", 1),
        ("moe", 2, "fsdp", 2),
        ("dense-token-mean", 2, "fsdp", 1),
        ("vl", 2, "ddp", 1),
        ("vl", 2, "fsdp", 1),
    ],
)
def test_micro_batches_accumulate_to_the_whole_batch_step(accumulated, case, world, mode, ep):
    """Micro-batches of 1 row (4 per worker and step, gradients synced after the last only under
    DDP, expert gradients reduced after the last) give the losses, gradient norms, router counts
    and weights of the whole worker batch at once."""
    runs = accumulated(case, world, mode, ep)
    whole, micro = runs[0], runs[1]
    exact = [LOSS_NAMES.index(name) for name in ACCUMULATE_CASES[case][1]]
    np.testing.assert_allclose(np.array(micro["losses"])[:, exact], np.array(whole["losses"])[:, exact], rtol=1e-5)
    assert micro["norms"] == pytest.approx(whole["norms"], rel=1e-4)
    assert torch.equal(micro["router"], whole["router"]), "every micro-batch's routing is counted"
    # AdamW divides by the gradient's running RMS, so rounding in an entry whose gradient is near zero
    # moves it by a visible share of a step (1e-2): single entries up to ~2e-4 here, the rest below 1e-5
    for name, tensor in whole["weights"].items():
        torch.testing.assert_close(micro["weights"][name], tensor, atol=5e-4, rtol=0, msg=name)
    assert whole["losses"][0] != whole["losses"][-1], "the steps train"


def test_vl_model_trains_the_same_sharded_and_replicated(accumulated):
    """FSDP2 over a VL model whose rank 1 never sees an image (there the vision encoder, adapter and
    vision experts run on a blank image / no tokens, zero gradients) trains like DDP, which leaves
    them out of that rank's graph: same losses, norms and weights, whole batch and micro-batches."""
    sharded, replicated = accumulated("vl", 2, "fsdp", 1), accumulated("vl", 2, "ddp", 1)
    for micro in (0, 1):
        np.testing.assert_allclose(sharded[micro]["losses"], replicated[micro]["losses"], rtol=1e-5)
        assert sharded[micro]["norms"] == pytest.approx(replicated[micro]["norms"], rel=1e-4)
        assert torch.equal(sharded[micro]["router"], replicated[micro]["router"])
        # all-reduce vs reduce-scatter round apart; AdamW magnifies that where a gradient is near zero (as
        # above): one entry of an adapter weight moves ~1.3e-4, everything else stays below 2e-5
        for name, tensor in replicated[micro]["weights"].items():
            torch.testing.assert_close(sharded[micro]["weights"][name], tensor, atol=5e-4, rtol=0, msg=name)


# ---------------------------------------------------------------------- every part runs (FSDP2, VL)
@pytest.mark.parametrize(("image", "impl"), [(False, "auto"), (False, "loop"), (True, "auto")])
def test_every_part_runs_changes_no_loss_and_no_gradient(image, impl):
    """`every_part_runs` (set for FSDP2) adds the vision parts a batch does not need to the graph, and
    nothing else: the losses and every gradient stay bit for bit, the added gradients are zeros."""
    from ernie import ErnieForCausalLM
    from ernie.batching import collate

    cfg = get_preset("tiny_vl")
    rows = _rows(cfg, step=0, rank=0 if image else 1)
    torch.manual_seed(0)
    model = ErnieForCausalLM(cfg)
    model.experts_impl = impl
    runs = {}
    for every_part_runs in (False, True):
        model.every_part_runs = every_part_runs
        model.zero_grad(set_to_none=True)
        out = model(**collate(rows))
        out.loss.backward()
        runs[every_part_runs] = out.losses, {name: p.grad for name, p in model.named_parameters()}
    (losses, grads), (all_losses, all_grads) = runs[False], runs[True]
    assert losses.keys() == all_losses.keys(), "router losses count only pools that saw tokens"
    assert all(torch.equal(all_losses[name], value) for name, value in losses.items())
    assert all(grad is not None for grad in all_grads.values()), "every parameter has a gradient"
    unused = {name for name, grad in grads.items() if grad is None}
    assert bool(unused) == (not image), unused
    for name, grad in grads.items():
        expected = torch.zeros_like(all_grads[name]) if name in unused else grad
        assert torch.equal(all_grads[name], expected), name
