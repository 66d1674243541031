"""A stage's process logs into a `RelayLogger`; the driver drains it while it polls the stage and writes it to
the stage's MLflow run. Nothing logged may be lost: not the last burst before the stage returns, not what it
logged before it failed."""

from __future__ import annotations

import pickle

import pytest
from relay_stage import BURST

from pipeline.contract import RelayLogger, Resources, StageContext
from pipeline.store import ArtifactStore
from pipeline.tracking import PipelineTracker


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """MLflow's SQLite store keeps run artifacts under ./mlruns: the test's own directory."""
    monkeypatch.chdir(tmp_path)


def _stage_run(tmp_path):
    tracker = PipelineTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "relay")
    tracker.start("relay-test", {"conf": "test"}, "name: test\n")
    return tracker, tracker.stage("relayed", {}, {})


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += _artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(found)


def test_replay_writes_metrics_params_and_files_as_the_stage_logged_them(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    relay = RelayLogger()
    relay.metrics({"loss": 2.0, "skipped": float("nan")}, step=1)
    relay.metrics({"loss": 1.5}, step=2)
    relay.params({"train": {"steps": 3}, "api_token": "s3cr3t-value"})
    relay.text("hello\n", "notes/a.txt")
    figure = plt.figure()
    relay.figure(figure, "data/curve.png")
    plt.close(figure)
    folder = tmp_path / "folder"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "b.json").write_text("{}")
    relay.artifact(folder, "extra")
    tracker, logger = _stage_run(tmp_path)

    logger.replay(relay.drain())

    assert relay.drain() == []
    client = tracker.client
    history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss"))
    assert history == [(1, 2.0), (2, 1.5)]
    run = client.get_run(logger.run_id)
    assert "skipped" not in run.data.metrics
    assert run.data.params["train.steps"] == "3"
    assert "s3cr3t-value" not in run.data.params["api_token"]
    assert _artifacts(client, logger.run_id) == ["data/curve.png", "extra/inner/b.json", "notes/a.txt"]
    text = client.download_artifacts(logger.run_id, "notes/a.txt", str(tmp_path / "text"))
    assert open(text).read() == "hello\n"
    png = client.download_artifacts(logger.run_id, "data/curve.png", str(tmp_path / "png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_relay_logger_refuses_to_leave_its_process():
    with pytest.raises(TypeError, match="stays in the stage's process"):
        pickle.dumps(RelayLogger())


def test_a_file_name_that_climbs_out_is_refused(tmp_path):
    relay = RelayLogger()
    relay.text("x", "../outside.txt")
    _, logger = _stage_run(tmp_path)
    with pytest.raises(ValueError, match="leaves its directory"):
        logger.replay(relay.drain())


def _job(tmp_path, fail: bool, linger_s: float = 0.0):
    from pipeline import executor

    ctx = StageContext(
        stage="relayed", config={"fail": fail, "linger_s": linger_s}, model=None, inputs={}, output_dir=tmp_path
    )
    return executor.StageJob(
        stage="relayed",
        module="relay_stage",
        kind="dataset",
        key="k" * 16,
        context=ctx,
        eval_module=None,
        eval_config=None,
        store_args=(str(tmp_path / "artifacts"), str(tmp_path / "local")),
        manifest_extra={},
    )


@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_the_driver_writes_everything_a_stage_actor_logged(tmp_path, local_ray, fail):
    from pipeline import executor

    tracker, logger = _stage_run(tmp_path)
    job = _job(tmp_path, fail)
    seen = []
    if fail:
        with pytest.raises(executor.StageFailure, match="failed on purpose"):
            executor.run_stage(job, Resources(num_cpus=0), seen.append, logger)
    else:
        result = executor.run_stage(job, Resources(num_cpus=0), seen.append, logger)
        assert result["summary"] == "relayed"
        store = ArtifactStore(*job.store_args)
        assert store.find("relayed", job.key) is None  # the actor placed the output; only the driver publishes it
        assert store.publish("relayed", job.key, result["manifest"]) == store.find("relayed", job.key)
    client = tracker.client
    history = client.get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(BURST))
    run = client.get_run(logger.run_id)
    assert run.data.params["examples.train"] == "7"
    assert "s3cr3t-value" not in run.data.params["api_token"]
    assert _artifacts(client, logger.run_id) == ["notes/relay.txt", "plots/line.png"]
    assert seen and all(set(snapshot) == {"total", "done", "message"} for snapshot in seen)


class _RefusingStore:
    """A tracking store that refuses the write holding the stage's last metric, which the stage logs just before
    it returns or raises (so the driver meets the refusal after the stage has ended)."""

    run_id = "refused-run"

    def replay(self, events):
        if any(kind == "metrics" and event[1] == BURST - 1 for kind, *event in events):
            raise OSError("the tracking server said 503")


@pytest.mark.parametrize(
    ("fail", "linger_s", "reported"),
    [(False, 0.0, "said 503"), (True, 0.0, "failed on purpose"), (True, 1.5, "failed on purpose")],
    ids=["returns", "raises-at-once", "raises-after-the-driver-read-its-last-line"],
)
def test_a_store_that_refuses_fails_the_stage_but_never_hides_the_stages_own_error(
    tmp_path, local_ray, fail, linger_s, reported
):
    """The refusal may meet the driver after the stage ended or, when it lingers, while it still runs and is about
    to fail: either way the stage's own error is the one reported."""
    from pipeline import executor

    with pytest.raises(executor.StageFailure, match=reported) as failure:
        executor.run_stage(
            _job(tmp_path, fail, linger_s), Resources(num_cpus=0), lambda snapshot: None, _RefusingStore()
        )
    if not fail:
        assert "refused-run" in str(failure.value)
