"""The sharded train state (`stages.training.train_state`) on 2 gloo ranks: written to S3 (a moto
server) in the background or in the foreground it resumes exactly, a write that never reached
`meta.json` is ignored and removed; and a state written under one layout (FSDP2 / DDP, expert
parallelism or not, 2 workers) resumes under another with the same weights and AdamW moments."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_workers import free_port, spawn
from s3_server import moto_s3

from ernie import get_preset

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AFTER, ROWS = 4, 2, 4
BUCKET = "states"
FINGERPRINT = {"run": 1}


def _model_config():
    """tiny_moe without the load-balance loss: a product of per-worker means, the one loss term that
    changes with the worker count (so 1 and 2 workers train alike up to rounding)."""
    cfg = get_preset("tiny_moe")
    return cfg.replace(loss=dataclasses.replace(cfg.loss, aux_loss_weight=0.0))


def _run(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """STEPS AdamW steps on fixed batches, each rank its share of the rows. spec["checkpoint"]: none,
    save / save-sync (the train state at spec["state"] after SAVE_AFTER steps, in the background or
    not), load (resume from it first), load-resave (and save the loaded step again at once, as a
    rerun of a finished run does). Rank 0 writes what it saw to out/spec["name"].pt."""
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ernie import ErnieForCausalLM
    from stages.training import train_state
    from stages.training.optim import build_optimizer
    from stages.training.parallel import Layout

    torch.manual_seed(0)
    cfg = _model_config()
    model = ErnieForCausalLM(cfg)
    layout = Layout.build(spec["mode"], world, spec["ep"], torch.device("cpu"))
    train_model = layout.apply(model)
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (ROWS, 16), generator=g) for _ in range(STEPS)]
    checkpoint, start, record = spec["checkpoint"], 0, {}
    if checkpoint.startswith("load"):
        start = train_state.load_sharded(spec["state"], FINGERPRINT, model, optimizer, layout)["step"]
        record["loaded"] = _full_state(model, optimizer, layout, rank)
    checkpointer = train_state.ShardedCheckpointer(spec["state"], rank, layout, background=checkpoint != "save-sync")
    if checkpoint == "load-resave":
        checkpointer.save(model, optimizer, {"step": start, "cursor": [0, 0], "fingerprint": FINGERPRINT})
    losses = []
    for step in range(start, STEPS):
        share = ROWS // world
        ids = batches[step][rank * share : (rank + 1) * share]
        loss = train_model(input_ids=ids, labels=ids).loss
        loss.backward()
        layout.reduce_expert_grads(model)
        layout.clip_grad_norm_(model, 0.5)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if checkpoint.startswith("save") and step + 1 == SAVE_AFTER:
            checkpointer.save(model, optimizer, {"step": SAVE_AFTER, "cursor": [0, 0], "fingerprint": FINGERPRINT})
            record["saved"] = _full_state(model, optimizer, layout, rank)  # the state the write holds
        checkpointer.commit_finished()
    checkpointer.close()
    record |= {"losses": losses, "weights": layout.full_state_dict(model, rank)}
    if rank == 0:
        torch.save(record, Path(out) / f"{spec['name']}.pt")
    del train_model, model, optimizer, checkpointer
    dist.barrier()  # every rank done and DDP's reducer freed before the group goes
    gc.collect()
    dist.destroy_process_group()


def _full_state(model, optimizer, layout, rank: int) -> dict:
    """Collective: every model and AdamW tensor at its global shape (expert slices and FSDP2 shards
    gathered) by flat key, plus each parameter's optimizer hyperparameters; at rank 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    model_state, optimizer_state = get_state_dict(model, optimizer)
    layout.checkpoint_state(model, model_state, optimizer_state)
    flat = {f"model.{key}": value for key, value in model_state.items()}
    for fqn, moments in optimizer_state["state"].items():
        flat |= {f"optimizer.{fqn}.{name}": value for name, value in moments.items()}
    tensors = {}
    for key in sorted(flat):  # the same order on every rank: full_tensor() is a collective
        value = flat[key]
        value = value.full_tensor() if isinstance(value, DTensor) else value
        tensors[key] = value.detach().cpu().clone()
    groups = {
        fqn: json.dumps({k: v for k, v in group.items() if k != "params"}, sort_keys=True, default=str)
        for group in optimizer_state["param_groups"]
        for fqn in group["params"]
    }
    return {"tensors": tensors, "groups": groups} if rank == 0 else {}


def run(tmp_path: Path, name: str, mode: str, ep: int, checkpoint: str = "none", state="", world: int = 2) -> dict:
    spec = {"name": name, "mode": mode, "ep": ep, "checkpoint": checkpoint, "state": str(state)}
    spawn(_run, world, free_port(), spec, str(tmp_path), nprocs=world)
    return torch.load(tmp_path / f"{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server that the spawned ranks reach through the environment, as pipeline workers do."""
    with moto_s3(BUCKET) as server, pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", server.endpoint)
        env.setenv("FSSPEC_S3_ENDPOINT_URL", server.endpoint)
        yield server


@pytest.fixture(scope="module")
def ep2_saved(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted (fsdp, expert_parallel=2) run that wrote its state after SAVE_AFTER steps."""
    root = tmp_path_factory.mktemp("ep2")
    return root / "state", run(root, "ep2", "fsdp", 2, "save-sync", root / "state")


def _assert_same_state(loaded: dict, saved: dict) -> None:
    expert_moments = [k for k in saved["tensors"] if k.endswith("experts.gate_up_proj.exp_avg_sq")]
    assert expert_moments and saved["tensors"][expert_moments[0]].abs().sum() > 0, "AdamW moments of the experts"
    assert loaded["tensors"].keys() == saved["tensors"].keys()
    for key, tensor in saved["tensors"].items():
        assert torch.equal(loaded["tensors"][key], tensor), key
    assert loaded["groups"] == saved["groups"]


# ---------------------------------------------------------------------- on S3
@pytest.mark.parametrize("save", ["save", "save-sync"])
def test_train_state_on_s3_resumes_exactly_and_drops_an_unfinished_write(s3, ep2_saved, tmp_path, save):
    _, uninterrupted = ep2_saved
    prefix = f"{BUCKET}/{save}/train_state"
    saved = run(tmp_path, "saved", "fsdp", 2, save, f"s3://{prefix}")
    assert saved["losses"] == uninterrupted["losses"]
    meta = json.loads(s3.fs.cat_file(f"{prefix}/meta.json"))
    assert meta["step"] == SAVE_AFTER and meta["dir"] == f"step-{SAVE_AFTER:08d}"
    assert len(s3.fs.glob(f"{prefix}/{meta['dir']}/*.distcp")) == 2 and s3.fs.exists(f"{prefix}/{meta['dir']}/extra.pt")
    assert not list(tmp_path.glob("**/*.distcp")), "nothing written to local disk"
    # a later write killed before its meta.json: shards without DCP's .metadata, never committed
    for shard in s3.fs.glob(f"{prefix}/{meta['dir']}/*.distcp"):
        s3.fs.copy(shard, shard.replace(meta["dir"], "step-00000003"))

    resumed = run(tmp_path, "resumed", "fsdp", 2, "load-resave" if save == "save" else "load", f"s3://{prefix}")
    assert resumed["losses"] == uninterrupted["losses"][SAVE_AFTER:]
    for name, tensor in uninterrupted["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name
    s3.fs.invalidate_cache()
    steps = sorted(p.rsplit("/", 1)[1] for p in s3.fs.ls(prefix) if "/step-" in p)
    if save == "save":  # the loaded step saved again: written beside the committed one, which then goes
        assert steps == [f"step-{SAVE_AFTER:08d}.2"]
        assert json.loads(s3.fs.cat_file(f"{prefix}/meta.json"))["dir"] == steps[0]
    else:
        assert steps == [meta["dir"]], "the unfinished write is removed"


def test_a_state_copied_from_s3_is_the_committed_one(s3, tmp_path):
    from stages.training import train_state

    prefix = f"{BUCKET}/copied/train_state"
    s3.fs.pipe(f"{prefix}/step-00000001/extra.pt", b"old")  # left by a killed write
    s3.fs.pipe(f"{prefix}/step-00000002/extra.pt", b"extra")
    s3.fs.pipe(f"{prefix}/step-00000002/__0_0.distcp", b"shard")
    s3.fs.pipe(f"{prefix}/meta.json", json.dumps({"step": 2, "dir": "step-00000002"}).encode())
    assert train_state.read_meta(f"s3://{prefix}")["step"] == 2
    train_state.copy_state(f"s3://{prefix}", tmp_path / "copy")
    files = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert files == ["meta.json", "step-00000002/__0_0.distcp", "step-00000002/extra.pt"]
    assert train_state.read_meta(f"s3://{BUCKET}/nothing/train_state") is None


# ---------------------------------------------------------------------- across layouts
@pytest.mark.parametrize(("mode", "ep", "world"), [("fsdp", 1, 2), ("ddp", 2, 2), ("fsdp", 1, 1)])
def test_a_state_saved_under_expert_parallelism_resumes_under_another_layout(ep2_saved, tmp_path, mode, ep, world):
    """Saved under (fsdp, expert_parallel=2) on 2 workers: the same global weights and AdamW moments
    once loaded, and the next steps' losses of the uninterrupted run."""
    state, uninterrupted = ep2_saved
    resumed = run(tmp_path, "resumed", mode, ep, "load", state, world)
    _assert_same_state(resumed["loaded"], uninterrupted["saved"])
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][SAVE_AFTER:], abs=1e-5)


def test_a_state_saved_without_expert_parallelism_resumes_under_it(ep2_saved, tmp_path):
    _, reference = ep2_saved
    saved = run(tmp_path, "ep1", "fsdp", 1, "save-sync", tmp_path / "state")
    assert saved["losses"] == pytest.approx(reference["losses"], abs=1e-5)  # every layout trains alike
    resumed = run(tmp_path, "resumed", "fsdp", 2, "load", tmp_path / "state")
    _assert_same_state(resumed["loaded"], saved["saved"])
    assert resumed["losses"] == pytest.approx(saved["losses"][SAVE_AFTER:], abs=1e-5)
