"""num_workers=0: Ray Train's local mode, the training function as the one rank of this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from stage_runs import local_ray

from pipeline.contract import UserError, requested
from stages.posttrain import sft
from stages.pretrain.config import Config as PretrainConfig
from stages.training import launch


@pytest.fixture(scope="module")
def ray_local():
    yield from local_ray()


def _train(config: dict) -> None:
    """One rank: a collective, a message for the stage, and a checkpoint holding what it saw."""
    import ray.train

    total = torch.tensor([3.0])
    dist.all_reduce(total)
    context = ray.train.get_context()
    seen = {
        "pid": os.getpid(),
        "rank": context.get_world_rank(),
        "world": dist.get_world_size(),
        "total": total.item(),
        "threads": torch.get_num_threads(),
    }
    config["sink"].put((1, {"loss": 0.5}))

    def fill(directory: Path) -> None:
        (directory / "seen.json").write_text(json.dumps(seen))

    launch.report_checkpoint({"steps": 1.0}, fill)


def _fail(config: dict) -> None:
    raise RuntimeError("the loss went to nan at step 3")


def _fit(train_fn, tmp_path: Path, messages: list, cpus: float = 1.0):
    return launch.fit(
        train_fn,
        {},
        num_workers=0,
        cpus_per_worker=cpus,
        gpus_per_worker=0,
        max_failures=1,
        storage=tmp_path / "ray",
        on_message=lambda step, metrics: messages.append((step, metrics)),
    )


def test_the_function_runs_here_as_the_only_rank_and_its_checkpoint_reaches_the_artifact(ray_local, tmp_path):
    threads = torch.get_num_threads()
    messages: list = []
    result = _fit(_train, tmp_path, messages, cpus=1.0)
    assert messages == [(1, {"loss": 0.5})]
    assert result.metrics == {"steps": 1.0}
    made = Path(result.checkpoint.path)
    launch.copy_checkpoint(result, tmp_path / "out", tmp_path / "ray")
    seen = json.loads((tmp_path / "out" / "seen.json").read_text())
    assert seen == {"pid": os.getpid(), "rank": 0, "world": 1, "total": 3.0, "threads": 1}
    assert not made.exists(), "the checkpoint directory local mode reported is left behind"
    assert not dist.is_initialized(), "the single-rank process group outlived the run"
    assert torch.get_num_threads() == threads


def test_a_failing_function_raises_its_own_error_and_leaves_no_process_group(ray_local, tmp_path):
    with pytest.raises(RuntimeError, match="nan at step 3"):
        _fit(_fail, tmp_path, [])
    assert not dist.is_initialized()


def test_a_negative_worker_count_is_refused(ray_local, tmp_path):
    with pytest.raises(ValueError, match="num_workers=-1"):
        launch.fit(_train, {}, num_workers=-1, cpus_per_worker=1, gpus_per_worker=0, max_failures=0,
                   storage=tmp_path, on_message=lambda *a: None)  # fmt: skip
    with pytest.raises(UserError, match=r"pretrain.num_workers=-1 must not be negative"):
        PretrainConfig(num_workers=-1).validate()
    with pytest.raises(UserError, match=r"posttrain.sft.num_workers=-1 must not be negative"):
        sft.Config(num_workers=-1).validate()


def test_the_stage_actor_holds_one_workers_share_when_it_trains_itself():
    local = PretrainConfig(num_workers=0, cpus_per_worker=2.0, batch_size=6)
    local.resources.num_gpus = 1
    local.validate()  # any batch size splits over one rank
    assert local.ranks == 1
    need, actor = requested(local), local.actor_resources()
    assert (need.cpus, need.gpus) == (2.0, 1.0) and "num_workers=0" in need.terms
    assert (actor.num_cpus, actor.num_gpus) == (2.0, 1.0)
    workers = PretrainConfig(num_workers=4, cpus_per_worker=2.0)
    workers.resources.num_gpus = 1
    assert (workers.actor_resources().num_cpus, workers.actor_resources().num_gpus) == (0.0, 0.0)
