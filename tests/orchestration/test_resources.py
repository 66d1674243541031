"""What each stage holds on the cluster at once, and the refusal of a stage that can never be placed."""

from __future__ import annotations

import pytest

from pipeline.config import PipelineConfig
from pipeline.contract import Request, UserError, check_fits, requested
from stages import serve
from stages.posttrain import rlvr
from stages.pretrain.config import Config as PretrainConfig


def test_training_counts_every_worker_and_its_gpus_but_no_gpu_for_the_stage_actor():
    cfg = PretrainConfig(num_workers=4, cpus_per_worker=2.0)
    cfg.resources.num_gpus = 1
    need = requested(cfg)
    assert (need.cpus, need.gpus) == (8.0, 4.0)


def test_rlvr_adds_its_rollout_actors_to_the_learners():
    cfg = rlvr.Config(num_workers=2, cpus_per_worker=1.0, rollout_workers=3, rollout_cpus=2.0)
    need = requested(cfg)
    assert (need.cpus, need.gpus) == (8.0, 0.0)
    assert "rollout_workers=3" in need.terms and "rollout_cpus=2" in need.terms


def test_serve_counts_its_replicas_gpus():
    cfg = serve.Config(num_replicas=2, replica_cpus=1.0, replica_gpus=1.0)
    need = requested(cfg)
    assert (need.cpus, need.gpus) == (2.5, 2.0)


def test_a_section_without_workers_asks_for_its_actor_only():
    need = requested(PipelineConfig().eval)
    assert (need.cpus, need.gpus) == (1.0, 0.0)


def test_check_fits_names_the_stage_the_settings_and_what_the_cluster_has():
    need = requested(rlvr.Config(num_workers=2, rollout_workers=1))
    check_fits(need, {"CPU": 3.0}, "posttrain.rlvr")  # exactly enough
    with pytest.raises(UserError, match=r"posttrain.rlvr asks for 3 CPU\(s\) at once \(.*rollout_workers=1.*has 2\."):
        check_fits(need, {"CPU": 2.0}, "posttrain.rlvr")
    with pytest.raises(UserError, match=r"x asks for 1 GPU\(s\).*has 0\..*dry_run=true"):
        check_fits(Request(cpus=0, gpus=1, terms="t"), {"CPU": 4.0}, "x")


def test_an_autoscaling_cluster_is_judged_by_its_ceiling_not_its_size_at_rest():
    from types import SimpleNamespace

    from pipeline.runner import check_resources

    cfg = PipelineConfig()
    cfg.pretrain.resources.num_gpus = 1
    cfg.pretrain.num_workers = 8
    planned = [SimpleNamespace(run=True, node=SimpleNamespace(config_path="pretrain"))]
    at_rest = {"CPU": 8.0, "GPU": 0.0}  # the head alone
    with pytest.raises(UserError, match="but the Ray cluster has 0"):
        check_resources(cfg, planned, at_rest)
    cfg.cluster.max_gpus = 64
    check_resources(cfg, planned, at_rest)
    cfg.cluster.max_gpus = 4
    with pytest.raises(UserError, match="but the Ray cluster has 4"):
        check_resources(cfg, planned, at_rest)


def test_a_custom_resource_no_node_offers_is_refused_unless_the_cluster_autoscales():
    from types import SimpleNamespace

    from pipeline.contract import check_custom_resources
    from pipeline.runner import check_resources

    cfg = PipelineConfig()
    cfg.serve.resources.custom = {"gpu_serve": 1.0}
    planned = [SimpleNamespace(run=True, node=SimpleNamespace(config_path="serve"))]
    check_resources(cfg, planned, {"CPU": 8.0, "gpu_serve": 2.0})
    with pytest.raises(
        UserError, match=r"serve asks for 1 of the custom resource 'gpu_serve' .* offer 0\. Start a node"
    ):
        check_resources(cfg, planned, {"CPU": 8.0})
    cfg.cluster.max_cpus = 64  # an autoscaler may add the node type that has it
    check_resources(cfg, planned, {"CPU": 8.0})
    for bad, message in (({"CPU": 1.0}, "ask for it with num_cpus"), ({"gpu_serve": 0.0}, "must be > 0")):
        cfg.serve.resources.custom = bad
        with pytest.raises(UserError, match=message):
            check_custom_resources(cfg.serve.resources, None, "serve")
