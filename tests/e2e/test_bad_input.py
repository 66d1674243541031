"""Bad input through the real CLI: one-paragraph error naming the problem, exit 2, nothing written."""

from __future__ import annotations

import pytest
from cli import clean_env, pipeline


@pytest.mark.parametrize(
    ("words", "needle"),
    [
        (["run", "conf=nope"], "unknown preset conf='nope'"),
        (["run", "conf=tiny", "pretrain.stepz=3"], "pretrain.stepz"),
        (["run", "conf=tiny", "pretrain.steps=many"], "pretrain.steps"),
        (["run", "conf=tiny", "model.moe.top_k=99"], "model.moe.top_k=99"),
        (["run", "conf=tiny", "data.vocab_size=2048"], "data.vocab_size=2048 must equal model.vocab_size"),
        (["run", "conf=tiny", "quantize.group_size=48"], "quantize.group_size=48"),
        (["run", "conf=tiny", "model=tiny_moe"], "image sources (scenes) but model tiny-moe has no vision encoder"),
        (["run", "conf=tiny", "data.sources=[{name:a,kind:jsonl}]"], "data.sources[0].path=''"),
        (["run", "conf=tiny", "stages=[pretrian]"], "unknown stage(s) ['pretrian']"),
        (["run", "pretrain.steps=3"], "missing conf=NAME"),
        (["plan", "conf=tiny", "from=serve", "until=data"], "nothing to run"),
        (["serve", "conf=tiny"], "no quantized model"),
        (["show", "nope"], "no pipeline run 'nope'"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, words, needle):
    result = pipeline(tmp_path, *words, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_unreachable_ray_address(tmp_path):
    env = clean_env()
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    result = pipeline(tmp_path, "run", "conf=tiny", env=env, timeout=60)
    assert result.returncode == 2
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in result.stderr
    assert "RAY_ADDRESS" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message", "cluster"),
    [
        (
            ["pretrain.resources.num_gpus=1"],
            "pretrain asks for 2 GPU(s) at once (resources.num_cpus=0 + num_workers=2",
            0,
        ),
        (
            ["posttrain.recipe=[rlvr]", "posttrain.rlvr.rollout_workers=3"],
            "posttrain.rlvr asks for 5 CPU(s) at once (resources.num_cpus=0 + num_workers=2 x (cpus_per_worker=1, "
            "resources.num_gpus=0) + rollout_workers=3 x (rollout_cpus=1",
            4,
        ),
    ],
)
def test_a_stage_the_cluster_can_never_place_is_refused_before_anything_runs(overrides, message, cluster, tmp_path):
    """Ray would wait forever for resources it does not have; the run stops first, naming the settings."""
    result = pipeline(tmp_path, "run", "conf=tiny", *overrides, timeout=180)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert f"but the Ray cluster has {cluster}." in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_explains_the_commands(tmp_path):
    result = pipeline(tmp_path, "--help", timeout=60)
    assert result.returncode == 0
    for word in ("run", "plan", "ls", "show", "serve", "dry_run=true", "stages=[quantize]"):
        assert word in result.stdout
