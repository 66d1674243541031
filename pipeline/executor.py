"""Run stages on Ray: one actor per stage, with the resources its config asks for.

The driver connects to `RAY_ADDRESS` (or `cluster.address`) when set, else starts a local
Ray. Each stage runs inside a `StageActor`; the driver polls it for its progress (to draw a
bar) and for what the stage logged (written to the stage's MLflow run by the driver, the one
process that talks to the tracking store). The actor also runs the eval step after model
stages and puts the output in place, so files are written where the stage ran; the driver writes
the manifest once the stage has returned (`ArtifactStore.place` / `publish`), so a driver that dies
mid-stage publishes nothing.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from .contract import Progress, RelayLogger, StageContext, UserError


def connect(address: str, local_num_cpus: int) -> dict[str, float]:
    """Connect to the cluster (or start a local Ray); returns the cluster's resources."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        return ray.cluster_resources()
    env = {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        # Ray Train polls its workers every 2 s by default: seconds lost at each short stage
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"),
    }
    runtime_env = {"env_vars": env}
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(
                num_cpus=local_num_cpus,
                include_dashboard=False,
                runtime_env=runtime_env,
                log_to_driver=False,
                logging_level="ERROR",
            )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r} ({' '.join(str(err).split())[:300]}). "
            "Check RAY_ADDRESS / cluster.address (e.g. ray://host:10001 or host:6379) and that the head node is up, "
            "or unset it to run on a local Ray."
        ) from None
    return ray.cluster_resources()


def check_shared_root(root: str, is_local: bool, autoscaling: bool = False) -> None:
    """Refuse a local `artifacts.root` on a cluster of several nodes (or one that autoscales, which will have
    them): a stage on another node (or a Ray Train worker) would write where the others cannot read, or find
    nothing where it reads."""
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    if is_local and (nodes > 1 or autoscaling):
        what = f"{nodes} nodes" if nodes > 1 else "an autoscaling ceiling (cluster.max_cpus / max_gpus)"
        raise UserError(
            f"artifacts.root={root} is a local directory, but the Ray cluster has {what}: stages and "
            "workers on the other nodes cannot read or write it. Set artifacts.root=s3://BUCKET/PREFIX (or another "
            "fsspec store every node reaches, e.g. gs://...) and rerun (docs/cluster.md)."
        )


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """ray.init retries an unreachable address for minutes; a TCP probe answers in seconds."""
    import socket

    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS / cluster.address={address!r} is not host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise UserError(
            f"cannot reach the Ray cluster at {address!r} ({err.strerror or err}). Check RAY_ADDRESS / "
            "cluster.address and that the head node is up (`ray status` on it), or unset it to run on a local Ray."
        ) from None


@dataclass
class StageJob:
    """Everything the actor needs to run one stage (all picklable)."""

    stage: str
    module: str
    kind: str
    key: str
    context: StageContext
    eval_module: str | None
    eval_config: Any
    store_args: tuple[str, str]
    manifest_extra: dict


@ray.remote
class StageActor:
    def __init__(self) -> None:
        self.progress = Progress()
        self.log = RelayLogger()

    def poll(self) -> dict:
        """The stage's progress and what it logged since the last poll (the driver writes it to MLflow)."""
        return {"progress": self.progress.snapshot(), "log": self.log.drain()}

    def run(self, job: StageJob) -> dict:
        import importlib

        from .store import ArtifactStore

        store = ArtifactStore(*job.store_args)
        ctx = job.context
        ctx.progress, ctx.log = self.progress, self.log
        staged = None
        try:
            ctx.inputs = {name: store.fetch(a) for name, a in ctx.inputs.items()}
            ctx.output_dir = staged = store.staging_dir(job.stage, job.key)
            result = importlib.import_module(job.module).run(ctx)
            metrics = dict(result.metrics)
            if job.eval_module:
                self.progress.update(0, "eval")
                metrics.update(self._evaluate(job, ctx))
            manifest = store.place(
                job.stage,
                job.key,
                job.kind,
                ctx.output_dir,
                {**job.manifest_extra, "metrics": metrics, "summary": result.summary, **result.extra},
            )
        except BaseException as err:
            tb = traceback.format_exc()
            err = disk_full(err, job.stage, [staged, ctx.work_dir, store.local_root]) or err
            if staged is not None:
                _discard(staged)
            raise StageFailure(job.stage, err, tb) from None
        return {"manifest": manifest, "metrics": metrics, "summary": result.summary}

    def _evaluate(self, job: StageJob, ctx: StageContext) -> dict[str, float]:
        import dataclasses
        import importlib

        from .contract import Artifact

        model_art = Artifact(kind=job.kind, uri=str(ctx.output_dir), cache_key=job.key, local_path=str(ctx.output_dir))
        eval_dir = ctx.output_dir.parent / f".eval-{ctx.output_dir.name}"
        eval_dir.mkdir(parents=True, exist_ok=True)
        eval_ctx = dataclasses.replace(
            ctx,
            stage="eval",
            config=job.eval_config,
            output_dir=eval_dir,
            inputs={"model": model_art, "dataset": ctx.inputs["dataset"]},
        )
        metrics = importlib.import_module(job.eval_module).run(eval_ctx).metrics
        eval_metrics = {f"eval/{k}": v for k, v in metrics.items()}
        ctx.log.metrics(eval_metrics)
        import shutil

        shutil.rmtree(eval_dir, ignore_errors=True)
        return eval_metrics


class DiskFull(OSError):
    """A stage's write failed for want of space (ENOSPC / EDQUOT): names the file, when the error
    does, and the free space where the stage writes."""


def disk_full(err: BaseException, stage: str, places: list) -> DiskFull | None:
    """`err` as a `DiskFull` if it, or an error it wraps (a cause, a Ray task's error), is ENOSPC."""
    found = _no_space(err, set())
    if found is None:
        return None
    space, devices = [], set()
    for place in (p for p in places if p is not None):
        path = Path(place)
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            device, usage = path.stat().st_dev, shutil.disk_usage(path)
        except OSError:
            continue
        if device not in devices:  # one line per filesystem
            devices.add(device)
            space.append(f"{_size(usage.free)} free of {_size(usage.total)} at {place}")
    target = found.filename2 or found.filename  # a copy's error names its source, then its destination
    written = f" writing {target}" if target else ""
    return DiskFull(
        found.errno,
        f"no space left on device{written} (stage {stage}; {'; '.join(space)}). The partial output was deleted "
        "and no manifest written. Free some space, or point artifacts.root / artifacts.local_root at a larger "
        "disk, and rerun the same command",
    )


def _no_space(err: BaseException | None, seen: set[int]) -> OSError | None:
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err
    # causes, a Ray task's error, the errors of Ray Train's workers (WorkerGroupError.worker_failures), the user
    # error each of those wraps (UserExceptionWithTraceback._base_exc) and torch.distributed.checkpoint's per-rank
    # failures (CheckpointException.failures: (error, traceback) pairs)
    inner_errors = [err.__cause__, err.__context__, getattr(err, "cause", None), getattr(err, "_base_exc", None)]
    for name in ("worker_failures", "failures"):
        failures = getattr(err, name, None)
        if isinstance(failures, dict):
            inner_errors += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    for inner in inner_errors:
        found = _no_space(inner, seen)
        if found is not None:
            return found
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.1f} {unit}"


def _discard(staged: Path) -> None:
    """A failed attempt's output (and its eval scratch directory): never an artifact, so no disk holds it."""
    shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(staged.parent / f".eval-{staged.name}", ignore_errors=True)


class StageFailure(Exception):
    """A stage raised; carries its own traceback so the driver can summarise it."""

    def __init__(self, stage: str, error: BaseException, tb: str) -> None:
        super().__init__(f"{stage}: {type(error).__name__}: {error}")
        self.stage, self.error_type, self.message, self.tb = stage, type(error).__name__, str(error), tb
        self.user_error = isinstance(error, UserError)

    def __reduce__(self):
        return (_rebuild_failure, (self.stage, self.error_type, self.message, self.tb, self.user_error))


def _rebuild_failure(stage, error_type, message, tb, user_error):
    failure = StageFailure.__new__(StageFailure)
    Exception.__init__(failure, f"{stage}: {error_type}: {message}")
    failure.stage, failure.error_type, failure.message, failure.tb = stage, error_type, message, tb
    failure.user_error = user_error
    return failure


# How long a refused tracking write waits for a stage that is ending anyway, so a failure it raised just after
# logging its last line is the one reported, not the refusal.
_OWN_ERROR_GRACE_S = 10.0


def run_stage(job: StageJob, resources: Any, on_progress, logger) -> dict:
    """Run the job in a fresh actor holding `resources`, calling `on_progress(snapshot)` while it works and
    replaying what the stage logs into `logger` (its MLflow run), up to its last line even when it fails.

    A training stage's actor holds what its config's `actor_resources()` says (it may only launch
    and watch its Ray Train workers, which reserve their own).
    """
    options: dict[str, Any] = {
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "max_concurrency": 2,
    }
    if resources.memory_gb:
        options["memory"] = int(resources.memory_gb * 2**30)
    if getattr(resources, "custom", None):
        options["resources"] = dict(resources.custom)
    actor = StageActor.options(**options).remote()
    ref = actor.run.remote(job)
    try:
        try:
            return _relay(ref, actor, job.stage, on_progress, logger)
        except StageFailure:  # the tracking store refused a write: the stage may be failing this very moment,
            # having logged its last line, and then its own error is the one to report
            if ray.wait([ref], timeout=_OWN_ERROR_GRACE_S)[0]:
                ray.get(ref)
            raise
    except ray.exceptions.RayTaskError as err:
        cause = err.cause if isinstance(getattr(err, "cause", None), StageFailure) else None
        if cause is None:
            raise StageFailure(job.stage, RuntimeError(str(err).splitlines()[0]), str(err)) from None
        raise cause from None
    except ray.exceptions.RayActorError as err:
        raise StageFailure(job.stage, RuntimeError(f"the stage's worker process died ({err})"), str(err)) from None
    finally:
        ray.kill(actor)
        time.sleep(0)


def _relay(ref, actor, stage: str, on_progress, logger) -> dict:
    """Take what the stage logs while it runs, then its last lines, then its result (or its error)."""
    pending = None  # a poll not yet answered: its events are taken when it is, never dropped
    while True:
        done = bool(ray.wait([ref], timeout=0.5)[0])
        if pending is None:
            pending = actor.poll.remote()
        if done:  # what the stage logged last: the answer to a poll sent after it returned
            _take(stage, ray.get(pending), on_progress, logger)
            _take(stage, ray.get(actor.poll.remote()), on_progress, logger)
            return ray.get(ref)
        if ray.wait([pending], timeout=5)[0]:
            polled, pending = pending, None
            try:
                report = ray.get(polled)
            except ray.exceptions.RayActorError:
                continue  # the run's own reference says why, on the next turn
            _take(stage, report, on_progress, logger)


def _take(stage: str, report: dict, on_progress, logger) -> None:
    """Write what the stage logged, then draw its progress. The tracking store refusing a write stops the run
    (as it did when stages wrote to it themselves): nothing logged is dropped without a word."""
    try:
        logger.replay(report["log"])
    except Exception as err:  # noqa: BLE001 - any client error: the stage's run is marked failed
        message = f"writing what the stage logged to the MLflow run {logger.run_id} failed: {err}"
        raise StageFailure(stage, RuntimeError(message), traceback.format_exc()) from None
    try:
        on_progress(report["progress"])
    except Exception:  # noqa: BLE001 - a progress bar must not stop the run
        pass
