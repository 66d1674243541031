"""Post-training's `WorkerLoop` on 2 gloo ranks (no Ray): SFT (with and without LoRA) and DPO steps
under FSDP2 give DDP's losses, gradient norms and weights; micro-batches give the whole batch's
step; DPO's reference log-probs and the evaluation (ranks with uneven shares run the same number
of forwards) agree; a sharded train state resumes exactly; bf16 gathers layers in bf16; one worker
takes the steps of two.

One spawn runs every case (each rank builds a loop per case in turn), so the processes start once.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, spawn

from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import load_pretrained, save_pretrained
from pipeline.contract import UserError
from stages.posttrain import dpo, sft
from stages.posttrain.chat import Tokenised
from stages.posttrain.loop import Job, WorkerLoop, merged_lora

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS = 2, 2
ROUTER_LOSSES = ("aux_loss_weight", "z_loss_weight", "orthogonal_loss_weight")
CASES = [  # (method, parallel, micro_batch_size, lora, router losses); batch: 4 examples a worker
    ("sft", "ddp", 0, False, True),
    ("sft", "fsdp", 0, False, True),
    ("sft", "fsdp", 0, False, False),
    ("sft", "fsdp", 1, False, False),
    ("dpo", "ddp", 0, False, True),
    ("dpo", "fsdp", 0, False, True),
    ("dpo", "fsdp", 0, False, False),
    ("dpo", "fsdp", 2, False, False),
    ("sft", "ddp", 0, True, False),
    ("sft", "fsdp", 1, True, False),
]
"""Router losses are means over a forward's tokens, padding included, so per micro-batch they are
not exact (docs/posttraining.md): micro-batches are compared with them off (weights 0)."""


def _chat(rng: np.random.Generator, vocab: int) -> Tokenised:
    """A chat of 6..20 tokens whose last 2..5 (the answer) are supervised: rows of different lengths and
    different numbers of supervised tokens, so padding and the token shares matter."""
    n = int(rng.integers(6, 21))
    answer = int(rng.integers(2, 6))
    return Tokenised(rng.integers(20, vocab, n).tolist(), [0] * (n - answer) + [1] * answer)


def _examples(vocab: int) -> dict[str, list]:
    rng = np.random.default_rng(3)
    chats = [_chat(rng, vocab) for _ in range(16)]
    pairs = [dpo.Pair(i, _chat(rng, vocab), _chat(rng, vocab)) for i in range(16)]
    return {"sft": (chats, chats[:5]), "dpo": (pairs, pairs[:5])}  # 5 val examples: uneven over 2 ranks


def _config(method: str, parallel: str, micro: int, lora: bool, world: int = WORLD, **extra):
    common = dict(num_workers=world, batch_size=8, lr=1e-3, warmup_steps=0, steps=STEPS, parallel=parallel)
    common |= dict(micro_batch_size=micro, **extra)
    if method == "sft":
        return sft.Config(**common, lora_rank=4 if lora else 0, lora_targets=["attention", "experts"])
    return dpo.Config(**common, beta=0.5, sft_weight=0.1)


class _WithoutRouterLosses:
    """An objective whose model trains with the router loss weights at 0 (set before it is spread)."""

    def prepare_model(self, loop) -> None:
        loss = dataclasses.replace(loop.model.config.loss, **dict.fromkeys(ROUTER_LOSSES, 0.0))
        loop.model.config = loop.model.config.replace(loss=loss)
        getattr(super(), "prepare_model", lambda loop: None)(loop)


class _SFT(_WithoutRouterLosses, sft.SFTObjective):
    pass


class _DPO(_WithoutRouterLosses, dpo.DPOObjective):
    pass


def _objective(method: str, config, routers: bool = True):
    if method == "sft":
        return (sft.SFTObjective if routers else _SFT)(config.lora_rank, config.lora_alpha, config.lora_targets)
    return (dpo.DPOObjective if routers else _DPO)(config.beta, config.sft_weight, config.loss_type)


def _loop(rank: int, root: str, method: str, config, state: str, routers: bool = True) -> WorkerLoop:
    objective = _objective(method, config, routers)
    job = Job(config, objective, f"{root}/ckpt", 0, None, None, f"{root}/{state}", {"run": state})
    train, val = _examples(get_preset("tiny_moe").vocab_size)[method]
    return WorkerLoop(job, rank, config.num_workers, torch.device("cpu"), train, val)


def _run_case(
    rank: int, root: str, method: str, parallel: str, micro: int, lora: bool, routers: bool, world: int = WORLD
) -> dict:
    name = f"{method}-{parallel}-{micro}-{lora}-{routers}-{world}"
    loop = _loop(rank, root, method, _config(method, parallel, micro, lora, world), name, routers)
    record = {"val": loop.evaluate(), "steps": []}
    if method == "dpo":
        record["reference"] = loop.objective.reference["train"].clone()
    for _ in range(STEPS):
        record["steps"].append(loop.train_step())
        if loop.step == 1:
            loop.save_state()
    weights = loop.layout.full_state_dict(loop.model, rank)  # collective; rank 0 holds them
    record["weights"] = merged_lora(loop.model, weights) if rank == 0 else {}
    if (method, parallel, micro, lora, routers) == ("sft", "fsdp", 0, False, True):  # resume from the step-1 state
        resumed = _loop(rank, root, method, _config(method, parallel, micro, lora), name)
        record["resumed_step"] = resumed.step
        record["resumed"] = [resumed.train_step()]
        record["resumed_weights"] = resumed.layout.full_state_dict(resumed.model, rank)
    return record


def _spawned(rank: int, port: int, root: str) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    records = {case: _run_case(rank, root, *case) for case in CASES}
    bf16 = _loop(rank, root, "sft", _config("sft", "fsdp", 0, False, precision="bf16"), "bf16")
    records["bf16"] = {"param_dtype": str(bf16.layout.param_dtype)}
    if rank == 0:
        torch.save(records, Path(root) / "records.pt")
    del bf16
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


ALONE = ("sft", "ddp", 0, False, False)
"""The case run again on one worker (router losses off: means over a forward's tokens, padding included)."""


def _spawned_alone(rank: int, port: int, root: str) -> None:
    """SFT on one worker: the 2 ranks' 8 chats of each step, in one batch."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=1)
    torch.set_num_threads(1)
    torch.save(_run_case(rank, root, *ALONE, world=1), Path(root) / "alone.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("posttrain-parallel")
    torch.manual_seed(0)
    save_pretrained(ErnieForCausalLM(get_preset("tiny_moe")), root / "ckpt")
    spawn(_spawned, free_port(), str(root), nprocs=WORLD)
    spawn(_spawned_alone, free_port(), str(root), nprocs=1)
    alone = torch.load(root / "alone.pt", weights_only=True)
    return torch.load(root / "records.pt", weights_only=True) | {"root": root, "alone": alone}


@pytest.fixture(scope="module")
def input_weights(records) -> dict[str, torch.Tensor]:
    return load_pretrained(records["root"] / "ckpt").state_dict()


def _same_steps(ours: dict, theirs: dict, what: str) -> None:
    for name in ("loss", "lm", "dpo_loss", "reward_margin"):
        if name in theirs["steps"][0]:
            assert [s[name] for s in ours["steps"]] == pytest.approx([s[name] for s in theirs["steps"]], abs=1e-5), (
                what,
                name,
            )
    assert [s["grad_norm"] for s in ours["steps"]] == pytest.approx([s["grad_norm"] for s in theirs["steps"]], rel=1e-4)
    assert ours["val"] == pytest.approx(theirs["val"], abs=1e-5), what
    assert ours["weights"].keys() == theirs["weights"].keys(), what
    for key, tensor in theirs["weights"].items():  # AdamW steps of 1e-3: 1e-5 is 1% of one update
        torch.testing.assert_close(ours["weights"][key], tensor, atol=1e-5, rtol=0, msg=f"{what} {key}")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_fsdp_steps_give_the_ddp_steps(records, method):
    ddp, fsdp = records[(method, "ddp", 0, False, True)], records[(method, "fsdp", 0, False, True)]
    _same_steps(fsdp, ddp, f"{method} fsdp vs ddp")
    assert ddp["steps"][0]["loss"] != ddp["steps"][-1]["loss"], "the steps train"
    if method == "dpo":  # from the input model, before any step, whatever the layout
        torch.testing.assert_close(fsdp["reference"], ddp["reference"], atol=1e-5, rtol=0)
        assert ddp["steps"][0]["reward_margin"] == pytest.approx(0.0, abs=1e-6), "step 1: policy = reference"


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_micro_batches_give_the_whole_batch_step(records, method):
    micro = 1 if method == "sft" else 2
    whole, parts = records[(method, "fsdp", 0, False, False)], records[(method, "fsdp", micro, False, False)]
    _same_steps(parts, whole, f"{method} micro-batches of {micro}")


def test_one_worker_takes_the_steps_of_two(records):
    """The ranks' chats hold different numbers of answer tokens and pad to different lengths: the step's
    token mean (and the token-balanced gradient's slots) are counted over both ranks, so the step does not
    depend on how many workers share it."""
    two = records[("sft", "fsdp", 0, False, False)]
    _same_steps(records["alone"], two, "sft on 1 worker vs 2")


def test_lora_under_fsdp_trains_like_ddp_and_exports_merged_weights(records, input_weights):
    """Adapters sharded with their frozen weights (and micro-batches of 1): DDP's steps; the exported
    weights carry the base model's names and differ from the input only where adapters sat."""
    ddp, fsdp = records[("sft", "ddp", 0, True, False)], records[("sft", "fsdp", 1, True, False)]
    _same_steps(fsdp, ddp, "lora fsdp vs ddp")
    assert fsdp["weights"].keys() == input_weights.keys()
    changed = {k for k, v in input_weights.items() if not torch.equal(fsdp["weights"][k], v)}
    assert any("q_proj" in k for k in changed) and any("experts" in k for k in changed), sorted(changed)
    assert all(any(t in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "experts")) for k in changed)


def test_a_sharded_train_state_resumes_exactly(records):
    run = records[("sft", "fsdp", 0, False, True)]
    assert run["resumed_step"] == 1
    assert run["resumed"][0]["loss"] == run["steps"][1]["loss"]
    for key, tensor in run["weights"].items():
        assert torch.equal(run["resumed_weights"][key], tensor), key


def test_bf16_gathers_the_layers_in_bf16_under_fsdp(records):
    assert records["bf16"]["param_dtype"] == "torch.bfloat16"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parallel": "zero3"}, "posttrain.sft.parallel='zero3' must be one of"),
        ({"micro_batch_size": 3}, "posttrain.sft.micro_batch_size=3 must divide the 8 examples each worker takes"),
        ({"micro_batch_size": -1}, "posttrain.sft.micro_batch_size=-1 must not be negative"),
        ({"recompute": "all"}, "posttrain.sft.recompute='all' must be one of"),
        ({"loss_impl": "fast"}, "posttrain.sft.loss_impl='fast' must be one of"),
        ({"micro_batch_size": 4, "parallel": "ddp", "recompute": "mlp", "loss_impl": "chunked"}, None),
    ],
)
def test_posttraining_layout_settings_are_checked(overrides, message):
    config = sft.Config(**overrides)  # 16 chats a step over 2 workers
    if message is None:
        config.validate("sft")
        assert config.parallel_for(get_preset("tiny_moe")) == overrides.get("parallel", "fsdp")
        return
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config.validate("sft")
    assert sft.Config().parallel_for(get_preset("tiny_vl")) == "fsdp", "auto: fsdp, VL and LoRA runs too"
