"""Expert parallelism over 2 gloo ranks equals the single-process model: losses, logits, every gradient, state dicts.

One spawn of 2 CPU ranks runs every scenario and saves what it saw; the tests compare that
with the full model in this process. The reference for a step is the full model run on each
rank's half of the batch, objective = mean of the two half losses (what data parallel trains).
Routing is made uneven on purpose: different sequence lengths per rank, packed documents, a
layer whose router bias sends every slot to rank 0's experts (rank 1 receives none) and a VL
batch whose image sits on rank 0 only (rank 1's vision pool has no tokens).
"""

from __future__ import annotations

from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, spawn

from ernie import ErnieForCausalLM, get_preset
from ernie.expert_parallel import (
    expert_parameters,
    full_expert_state_dict,
    load_full_expert_state,
    reduce_expert_grads,
    shard_experts,
)

WORLD = 2
ATOL = 1e-5  # same math, other fp32 summation order
ROOT = Path(__file__).resolve().parents[1]
PATCH_DIM = 3 * 14 * 14
STEERED_LAYER, STEERED_EXPERTS = 1, (0, 1)  # rank 0's experts in the first MoE layer take every slot
SCENARIOS = ("moe", "moe_recompute", "vl")


# ---------------------------------------------------------------------------------------------- models and batches
def make_model(preset: str, seed: int = 0, num_experts: int | None = None) -> ErnieForCausalLM:
    """Seeded fp32 model with initializer_range 0.1, so routing and logits move by O(1)."""
    cfg = get_preset(preset)
    cfg.initializer_range = 0.1
    if num_experts is not None:
        cfg.moe.num_experts = num_experts
    model = ErnieForCausalLM(cfg)
    model.init_weights(seed)
    return model


def scenario_model(scenario: str, seed: int = 0) -> ErnieForCausalLM:
    model = make_model("tiny_vl" if scenario == "vl" else "tiny_moe", seed)
    bias = model.model.layers[STEERED_LAYER].mlp.text.gate.e_score_correction_bias
    bias[list(STEERED_EXPERTS)] = 10.0
    model.recompute = "mlp" if scenario == "moe_recompute" else "none"
    return model.train()


def random_ids(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Token ids that are never special tokens (tiny_vl's vision ids are 5..10)."""
    return torch.randint(11, 400, shape, generator=torch.Generator().manual_seed(seed))


def image_batch(seed: int) -> dict[str, torch.Tensor]:
    """One row: text, a 4x4-patch image (4 placeholder tokens), text; image tokens carry no target."""
    cfg = get_preset("tiny_vl")
    image = [cfg.image_start_token_id] + [cfg.image_token_id] * 4 + [cfg.image_end_token_id]
    ids = torch.cat([random_ids((5,), seed), torch.tensor(image), random_ids((7,), seed + 1)])[None]
    pixels = torch.randn(16, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    return dict(input_ids=ids, labels=labels, pixel_values=pixels, image_grid_thw=torch.tensor([[1, 4, 4]]))


def rank_batch(scenario: str, rank: int) -> dict[str, torch.Tensor]:
    """Each rank's half of the global batch: other lengths, other routing."""
    if scenario == "vl":
        if rank == 0:
            return image_batch(seed=3)
        ids = random_ids((1, 16), seed=4)
        return dict(input_ids=ids, labels=ids)
    if rank == 0:  # two rows, the first packs two documents
        ids = random_ids((2, 12), seed=1)
        documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
        return dict(input_ids=ids, labels=ids, document_ids=documents)
    ids = random_ids((1, 20), seed=2)
    return dict(input_ids=ids, labels=ids)


def is_expert(name: str) -> bool:
    return name.endswith(("experts.gate_up_proj", "experts.down_proj"))


# ---------------------------------------------------------------------------------------------- the EP ranks
def _ep_step(scenario: str, rank: int) -> dict:
    """One EP training step on this rank's half: loss, logits, gradients (before and after the reduction)."""
    model = scenario_model(scenario)
    shard_experts(model)
    out = model(**rank_batch(scenario, rank))
    out.loss.backward()
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if is_expert(n)}
    reduce_expert_grads(model, None, WORLD)
    experts = {id(p) for p in expert_parameters(model)}
    for p in model.parameters():  # what DDP does for the dense parameters
        if id(p) not in experts:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad / WORLD
    loads = {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_load")}
    grads = {n: p.grad for n, p in model.named_parameters()}
    return dict(loss=out.loss.detach(), logits=out.logits.detach(), grads=grads, summed=summed, loads=loads)


@torch.no_grad()
def _state_round_trip(rank: int) -> dict:
    """Gather the full state of an EP model, load it into a differently seeded EP model, run both."""
    model = scenario_model("moe").eval()
    shard_experts(model)
    full = full_expert_state_dict(model)
    fresh = scenario_model("moe", seed=1).eval()
    shard_experts(fresh)
    batch = rank_batch("moe", rank)
    before = fresh(**batch).logits
    load_full_expert_state(fresh, full)
    return dict(full=full, logits_before=before, logits_after=fresh(**batch).logits)


def _uneven_split_error() -> str:
    model = make_model("tiny_moe", num_experts=3)
    try:
        shard_experts(model)
    except ValueError as error:
        return str(error)
    return "no error"


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(2)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {scenario: _ep_step(scenario, rank) for scenario in SCENARIOS}
        results["state"] = _state_round_trip(rank)
        results["uneven_error"] = _uneven_split_error()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each EP rank saw, one spawn for the whole module."""
    out_dir = tmp_path_factory.mktemp("ep")
    with pytest.MonkeyPatch.context() as mp_patch:
        mp_patch.syspath_prepend(str(ROOT))  # the spawned ranks import this module as tests.test_expert_parallel
        spawn(_worker, free_port(), str(out_dir), nprocs=WORLD)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------- the reference
@cache
def reference(scenario: str, impl: str) -> dict:
    """The full model on both halves, one backward of the mean loss."""
    model = scenario_model(scenario)
    model.experts_impl = impl
    outs = [model(**rank_batch(scenario, r)) for r in range(WORLD)]
    (sum(o.loss for o in outs) / WORLD).backward()
    return dict(
        losses=[o.loss.detach() for o in outs],
        logits=[o.logits.detach() for o in outs],
        grads={n: p.grad for n, p in model.named_parameters()},
    )


def local_slice(full: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = full.shape[0] // WORLD
    return full[rank * per_rank : (rank + 1) * per_rank]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ep_step_equals_single_process(ranks, scenario, impl):
    ref = reference(scenario, impl)
    for rank, seen in enumerate(r[scenario] for r in ranks):
        assert max_diff(seen["loss"], ref["losses"][rank]) < ATOL, f"rank {rank} loss"
        assert max_diff(seen["logits"], ref["logits"][rank]) < ATOL, f"rank {rank} logits"
        assert seen["grads"].keys() == ref["grads"].keys()
        for name, grad in seen["grads"].items():
            expected = local_slice(ref["grads"][name], rank) if is_expert(name) else ref["grads"][name]
            if expected is None:  # a parameter neither half uses
                expected = torch.zeros_like(grad)
            assert max_diff(grad, expected) < ATOL, f"rank {rank} grad of {name}"
    assert max_diff(ref["losses"][0], ref["losses"][1]) > 1e-3  # the ranks' halves are told apart


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_expert_grads_need_the_division_by_world_size(ranks, scenario):
    """Before `reduce_expert_grads` an owning rank holds the sum over both ranks' losses: twice the mean's gradient."""
    ref = reference(scenario, "grouped")
    for rank, seen in enumerate(r[scenario] for r in ranks):
        for name, grad in seen["summed"].items():
            expected = local_slice(ref["grads"][name], rank)
            assert max_diff(grad, WORLD * expected) < ATOL, f"rank {rank} summed grad of {name}"


def test_routing_is_uneven_across_ranks(ranks):
    """The cases the exchange must survive really happen (router counts stay per rank)."""
    steered = f"model.layers.{STEERED_LAYER}.mlp.text.gate.expert_load"
    for seen in (r["moe"] for r in ranks):
        load = seen["loads"][steered]
        assert load[2:].sum() == 0 and load[:2].sum() > 0  # rank 1's experts receive no slot from anyone
    steered_experts = f"model.layers.{STEERED_LAYER}.mlp.text.experts.gate_up_proj"
    assert ranks[0]["moe"]["grads"][steered_experts].abs().max() > 0
    assert ranks[1]["moe"]["grads"][steered_experts].abs().max() == 0
    natural = [r["moe"]["loads"]["model.layers.2.mlp.text.gate.expert_load"] for r in ranks]
    assert not torch.equal(natural[0], natural[1])
    # VL: rank 1 has no image, so its vision pool sees no token, yet its vision experts learn from rank 0's
    vision = [r["vl"]["loads"]["model.layers.1.mlp.vision.gate.expert_load"] for r in ranks]
    assert vision[0].sum() > 0 and vision[1].sum() == 0
    assert ranks[1]["vl"]["grads"]["model.layers.1.mlp.vision.experts.down_proj"].abs().max() > 0


def test_full_state_dict_round_trip(ranks):
    expected = scenario_model("moe").state_dict()
    for rank, seen in enumerate(r["state"] for r in ranks):
        full = seen["full"]
        assert full.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(full[key], value), f"rank {rank}: {key}"
        reference_logits = reference("moe", "grouped")["logits"][rank]
        assert max_diff(seen["logits_before"], reference_logits) > 1e-2  # the fresh model was another one
        assert max_diff(seen["logits_after"], reference_logits) < ATOL


def test_uneven_expert_split_is_refused(ranks):
    message = ranks[0]["uneven_error"]
    assert "model.layers.1.mlp.text.experts" in message
    assert "3 experts" in message and "2 ranks" in message
