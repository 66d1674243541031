"""`plan`'s memory estimates (pipeline.memory) against what training holds, measured on CPU.

Activations: the bytes of the tensors autograd saves for backward in one forward (parameters
excluded, each storage counted once), against `training_memory(...).activations_gb`. The
parameter, gradient and optimizer part is checked per worker layout in test_parallel_layout.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.config import RECOMPUTE_POLICIES as POLICIES
from pipeline.memory import (
    LOSS_CHUNK_TOKENS,
    GiB,
    activation_bytes,
    min_gpus,
    serving_weights_gb,
    training_memory,
    working_copy_bytes,
)

MARGIN = 0.25
"""Stated margin: the estimate is within 25% of the measurement."""


def saved_activation_bytes(model: ErnieForCausalLM, input_ids: torch.Tensor, precision: str) -> int:
    storages: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        model(input_ids=input_ids, labels=input_ids)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def _wider(name: str):
    """The preset at proportions nearer the real models' (hidden 256, MLP 704, 8 heads of 32, 4 layers),
    where the layers' activations, not the 512-token vocabulary's logits, dominate."""
    cfg = get_preset(name)
    moe = dataclasses.replace(cfg.moe, intermediate_size=96) if cfg.moe else None
    return cfg.replace(
        hidden_size=256, intermediate_size=704, num_heads=8, num_kv_heads=2, head_dim=32, num_layers=4, moe=moe
    )


CONFIGS = {"tiny_dense": lambda: get_preset("tiny_dense"), "tiny_moe": lambda: get_preset("tiny_moe")}
CONFIGS |= {f"wider_{name[5:]}": (lambda name=name: _wider(name)) for name in ("tiny_dense", "tiny_moe")}


@pytest.mark.parametrize(("recompute", "every"), [(p, 1) for p in POLICIES] + [("layers", 2), ("mlp", 3)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kept_activations_are_within_the_margin_of_the_saved_tensors(name, precision, recompute, every):
    """Everything autograd keeps from one forward (activations, and under autocast its bf16 weight
    casts) against the plan's kept activations and working copies; measured at 16% or closer."""
    torch.manual_seed(0)
    cfg = CONFIGS[name]()
    model = ErnieForCausalLM(cfg)
    model.recompute, model.recompute_every = recompute, every
    batch, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = saved_activation_bytes(model, ids, precision)
    kept, _ = activation_bytes(cfg, batch * seq, precision, recompute, recompute_every=every)
    copies, _ = working_copy_bytes(cfg, model.num_params(), precision, recompute, False, recompute_every=every)
    planned = kept + copies
    print(f"\n{name} {precision} {recompute}/{every}: saved {measured / 2**20:.2f} MiB, plan {planned / 2**20:.2f} MiB")
    assert abs(planned - measured) <= MARGIN * measured


def test_the_chunked_loss_plans_one_chunk_of_logits():
    cfg = get_preset("ernie_0_3b")
    logits = training_memory(cfg, 1, 8, 4096, shard=True, loss_impl="logits").activations_gb
    chunked = training_memory(cfg, 1, 8, 4096, shard=True, loss_impl="chunked").activations_gb
    assert (logits - chunked) * GiB == pytest.approx(4 * cfg.vocab_size * (8 * 4096 - LOSS_CHUNK_TOKENS))


TRAINING_STAGES = ("pretrain", "sft", "dpo", "rlvr", "upo")


def planned_training(capsys, preset: str, *overrides: str) -> dict[str, tuple[str, float, float]]:
    """`plan`'s training rows for `preset`: stage -> (micro-batch column, activations GiB, total GiB)."""
    from pipeline.config import load
    from pipeline.plan import _print_memory

    _print_memory(load(preset, list(overrides)))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    return {row[0]: (" ".join(row[2:5]), float(row[-2]), float(row[-1])) for row in rows if row[0] in TRAINING_STAGES}


def planned_pretrain(capsys, preset: str, *overrides: str) -> tuple[str, float, float]:
    """`plan`'s pretrain row for `preset`: (micro-batch column, activations GiB, total GiB)."""
    return planned_training(capsys, preset, *overrides)["pretrain"]


def test_planned_activations_follow_the_micro_batch_not_the_worker_batch(capsys):
    """ernie_0_3b: 256 rows a step over 8 workers, 32 rows each; micro_batch_size=0 plans all 32 at once
    (with the whole logits: the chunked loss holds one chunk whatever the micro-batch)."""
    whole = planned_pretrain(capsys, "ernie_0_3b", "pretrain.micro_batch_size=0", "pretrain.loss_impl=logits")
    two = planned_pretrain(capsys, "ernie_0_3b", "pretrain.micro_batch_size=2", "pretrain.loss_impl=logits")
    eight = planned_pretrain(capsys, "ernie_0_3b", "pretrain.micro_batch_size=8", "pretrain.loss_impl=logits")
    assert (whole[0], two[0], eight[0]) == ("32 x 4096", "2 x 4096", "8 x 4096")
    assert eight[1] == pytest.approx(4 * two[1], rel=1e-3) and whole[1] == pytest.approx(16 * two[1], rel=1e-3)
    assert whole[2] - whole[1] == pytest.approx(two[2] - two[1], abs=0.02), "weights, grads and AdamW states stay"


@pytest.mark.parametrize("preset", ["ernie_0_3b", "ernie_21b", "ernie_300b", "ernie_vl_28b", "ernie_vl_424b"])
def test_the_presets_micro_batches_fit_an_80_gib_gpu_with_the_activation_margin(capsys, preset):
    """Every training row: pretraining and each post-training method of the preset's recipe."""
    rows = planned_training(capsys, preset)
    assert {"pretrain", "sft", "dpo"} <= set(rows), rows
    for stage, (_, activations, total) in rows.items():
        assert total + MARGIN * activations < 80, (preset, stage, total, activations)


def test_posttraining_rows_follow_the_layout_and_the_forward_rows(capsys):
    """Post-training plans the layout its workers use (fsdp unless parallel=ddp) and one forward's rows:
    a chat, a pair's two rows, a prompt's group of completions (and a reference model beside them)."""
    fsdp = planned_training(capsys, "ernie_21b")
    ddp = planned_training(capsys, "ernie_21b", "posttrain.sft.parallel=ddp")
    assert ddp["sft"][2] - ddp["sft"][1] > 4 * (fsdp["sft"][2] - fsdp["sft"][1]), "a replica holds the whole state"
    assert (fsdp["sft"][0], fsdp["dpo"][0]) == ("1 x 8192", "2 x 8192")
    rl = ["posttrain.recipe=[sft,rlvr,upo]", "posttrain.rlvr.group_size=4", "posttrain.upo.group_size=4"]
    rl += ["posttrain.rlvr.micro_batch_size=2", "posttrain.upo.micro_batch_size=2", "posttrain.upo.pairs_per_step=16"]
    rows = planned_training(capsys, "tiny", *rl)
    # tiny: batch_size 8 prompts over 2 workers, 2 a forward; UPO adds 8 offline pairs a worker over its 2 parts
    assert (rows["rlvr"][0].split()[0], rows["upo"][0].split()[0]) == ("8", str(8 + 2 * 4))


@pytest.mark.parametrize(("bits", "published_gpus"), [(4, 4), (2, 2)])
def test_serving_plan_agrees_with_the_published_300b_deployments(bits, published_gpus):
    """ERNIE-4.5-300B-A47B is published serving W4 on 4 x 80 GB and W2 on 2 x 80 GB (weights and KV
    cache): the weights alone, packed as our quantize stage packs them, need no more GPUs than that."""
    cfg = get_preset("ernie_300b")
    weights = serving_weights_gb(cfg, bits, 32, ["lm_head", "vision_encoder", "adapter"])
    assert min_gpus(weights) <= published_gpus
    assert min_gpus(weights) >= published_gpus - 1, "the packed weights are most of a published deployment"
    vocab = 2 * 0.847e9  # input embedding and output projection (untied), kept in bf16
    assert weights == pytest.approx(((299.48e9 - vocab) * (bits + 24 / 32) / 8 + vocab * 2) / GiB, rel=0.01)


def test_serving_plan_counts_each_module_at_its_own_width():
    """Attention at 8 bits under 2-bit experts costs its extra 6 bits a weight, and no more."""
    cfg = get_preset("ernie_21b")
    skip = ["lm_head", "vision_encoder", "adapter"]
    int2 = serving_weights_gb(cfg, 2, 32, skip)
    mixed = serving_weights_gb(cfg, 2, 32, skip, {"*.self_attn": 8})
    assert serving_weights_gb(cfg, 2, 32, skip, {"*": 8}) == pytest.approx(serving_weights_gb(cfg, 8, 32, skip))
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
    attention = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert mixed - int2 == pytest.approx(attention * 6 / 8 / GiB, rel=1e-6)
