"""A committed train state records what its files held (local: sha256; S3: size and ETag); a resume refuses a state
whose files changed since."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist

from pipeline.contract import UserError
from stages.training import train_state


@pytest.fixture
def one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_resume_verifies_the_digests_and_refuses_a_damaged_state(one_rank, tmp_path):
    state = tmp_path / "train_state"
    model, optimizer = _model_and_optimizer(0)
    extra = {"step": 3, "cursor": 12, "fingerprint": {"lr": 1e-2}}
    train_state.ShardedCheckpointer(state, rank=0).save(model, optimizer, extra)
    meta = json.loads((state / train_state.META_FILE).read_text())
    step_dir = state / meta["dir"]
    assert set(meta["sha256"]) == {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()}

    fresh, fresh_optimizer = _model_and_optimizer(1)
    assert train_state.load_sharded(state, {"lr": 1e-2}, fresh, fresh_optimizer)["step"] == 3
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)

    shard = next(p for p in sorted(step_dir.rglob("*.distcp")))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of a shard
    shard.write_bytes(bytes(data))
    again, again_optimizer = _model_and_optimizer(2)
    with pytest.raises(UserError, match=rf"damaged: {shard.relative_to(step_dir).as_posix()} of {meta['dir']}"):
        train_state.load_sharded(state, {"lr": 1e-2}, again, again_optimizer)
    shard.unlink()  # a file gone altogether
    with pytest.raises(UserError, match="no longer match the sha256"):
        train_state.load_sharded(state, {"lr": 1e-2}, again, again_optimizer)


def test_a_resume_from_s3_refuses_a_state_whose_objects_changed_since_the_commit(one_rank, monkeypatch, request):
    """On an object store the commit records each object's size and ETag (one listing); a resume lists again."""
    import s3fs
    from s3_server import moto_s3

    with moto_s3("state-checks") as s3:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": s3.endpoint,  # read when a client is made (fsspec reads its own variables at import)
        }.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        request.addfinalizer(s3fs.S3FileSystem.clear_instance_cache)  # no cached client of this server outlives it
        url = "s3://state-checks/run/train_state"
        model, optimizer = _model_and_optimizer(0)
        extra = {"step": 3, "cursor": 12, "fingerprint": {"lr": 1e-2}}
        train_state.ShardedCheckpointer(url, rank=0).save(model, optimizer, extra)
        s3.fs.invalidate_cache()
        meta = json.loads(s3.fs.cat_file("state-checks/run/train_state/meta.json"))
        step_dir = f"state-checks/run/train_state/{meta['dir']}"
        objects = sorted(p.removeprefix(step_dir + "/") for p in s3.fs.find(step_dir))
        assert sorted(meta["objects"]) == objects and any(name.endswith(".distcp") for name in objects)

        fresh, fresh_optimizer = _model_and_optimizer(1)
        assert train_state.load_sharded(url, {"lr": 1e-2}, fresh, fresh_optimizer)["step"] == 3
        torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)

        shard = next(name for name in objects if name.endswith(".distcp"))
        data = bytearray(s3.fs.cat_file(f"{step_dir}/{shard}"))
        data[len(data) // 2] ^= 0xFF  # the same size, other bytes: only the ETag tells
        s3.fs.pipe_file(f"{step_dir}/{shard}", bytes(data))
        again, again_optimizer = _model_and_optimizer(2)
        with pytest.raises(UserError, match=rf"damaged: {shard} of {meta['dir']} no longer match the objects"):
            train_state.load_sharded(url, {"lr": 1e-2}, again, again_optimizer)
        s3.fs.rm(f"{step_dir}/{shard}")
        with pytest.raises(UserError, match="no longer match the objects recorded"):
            train_state.load_sharded(url, {"lr": 1e-2}, again, again_optimizer)
