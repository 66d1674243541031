"""Run a training function on Ray Train workers and relay rank 0's metrics to the stage.

The stage process (often a Ray actor holding no CPU) starts a `TorchTrainer`; rank 0 puts
(step, metrics) messages on a Ray queue that this process drains while `fit()` runs, so
metrics are logged and the progress bar moves from the stage's own logger and `Progress`.

`num_workers=0` is Ray Train's local mode: the function runs in the stage's own process as
the one rank of a single-process group, with no worker actors to start (seconds per run on
a small machine) and no restarts after a crash; its messages go through a queue in this process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.contract import LOCAL_RAY_CPUS, Request, check_fits

OnMessage = Callable[[int, dict], None]
_in_process = threading.local()  # .active: this thread runs a training function in local mode


def ensure_ray() -> None:
    """Connect to Ray if the orchestrator has not (RAY_ADDRESS, else a local instance)."""
    import ray

    if not ray.is_initialized():
        # at least the pipeline's local Ray's logical CPUs, so a stage that fits there fits when run
        # alone (a 2-core machine's 2 CPUs cannot hold 2 learners and a rollout actor)
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            **({"address": address} if address else {"num_cpus": max(LOCAL_RAY_CPUS, os.cpu_count() or 1)}),
            include_dashboard=False,
            log_to_driver=False,
        )


def check_cluster(request: Request, key: str) -> None:
    """Fail now, naming the settings, when the cluster can never hold the stage's workers and actors."""
    import ray

    ensure_ray()
    check_fits(request, ray.cluster_resources(), key)


def fit(
    train_fn: Callable[[dict], None],
    loop_config: dict,
    *,
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_failures: int,
    storage: Path | str,
    on_message: OnMessage,
):
    """Train with `num_workers` DDP workers (0: in this process, see the module's docstring); returns
    Ray Train's `Result` (its checkpoint is rank 0's last).

    `storage` is Ray Train's storage: a local directory (one node) or an fsspec URL (e.g. under the
    remote artifact root's `.work/`) that the workers on every node write the checkpoint to."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers} must not be negative (0 = train in this process)")
    # local mode hands the config over as it is: a queue in this process, not one more actor to start
    sink = queue.Queue() if num_workers == 0 else Queue(actor_options={"num_cpus": 0})
    resources = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker > 0 else {})
    name = f"run-{uuid.uuid4().hex[:8]}"
    storage_fs, storage_path = _storage(storage)
    if num_workers == 0:
        train_fn = _single_rank(train_fn, max(int(cpus_per_worker), 1))
        resources = None  # local mode reserves nothing: the caller holds this process's share
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={**loop_config, "sink": sink},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
    )
    # fit runs on a daemon thread while this one relays the workers' messages: an interrupt or a
    # timeout raised here ends the call at once instead of waiting for a run that may never finish
    outcome: dict = {}
    running = threading.Thread(target=_capture, args=(trainer.fit, outcome), name=name, daemon=True)
    try:
        running.start()
        while running.is_alive():
            _drain(sink, on_message, timeout=0.5)
        _drain(sink, on_message, timeout=0)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    finally:
        if num_workers:
            ray.kill(sink.actor)


def _single_rank(train_fn: Callable[[dict], None], threads: int) -> Callable[[dict], None]:
    """`train_fn` as the only rank of a process group of one (its collectives, DDP and FSDP work
    unchanged), on `threads` torch threads; the process's own group and thread count come back after."""

    def run(config: dict) -> None:
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError("num_workers=0 trains in this process, which already has a torch.distributed group")
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1)
        _in_process.active = True
        try:
            train_fn(config)
        finally:
            _in_process.active = False
            if dist.is_initialized():
                dist.destroy_process_group()
            torch.set_num_threads(previous_threads)

    return run


def report_checkpoint(summary: dict, fill: Callable[[Path], None]) -> None:
    """Rank 0's last report: `fill(directory)` writes the checkpoint Ray Train hands back in `Result`.

    Workers report a temporary directory that Ray Train copies to its storage; local mode keeps the
    directory itself, so there it stays until `copy_checkpoint` has copied it to the artifact."""
    import ray.train

    if getattr(_in_process, "active", False):
        path = Path(tempfile.mkdtemp(prefix="ernie-checkpoint-"))
        fill(path)
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        fill(Path(tmp))
        ray.train.report(summary, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _capture(call: Callable[[], object], outcome: dict) -> None:
    try:
        outcome["result"] = call()
    except BaseException as err:  # handed to the relaying thread, which raises it
        outcome["error"] = err


def _drain(sink, on_message: OnMessage, timeout: float) -> None:
    try:
        message = sink.get(block=timeout > 0, timeout=timeout or None)
        while True:
            on_message(*message)
            message = sink.get_nowait()
    except queue.Empty:  # ray.util.queue's Empty too
        return


def _storage(storage: Path | str):
    """(pyarrow filesystem or None, path) for Ray Train: an fsspec URL goes through fsspec, as the
    artifact store does (see storage.NodeFileSystem)."""
    if "://" not in str(storage):
        return None, str(storage)
    from .storage import ray_storage

    return ray_storage(str(storage))


def copy_checkpoint(result, output_dir: Path, storage: Path | str) -> None:
    """Copy the run's final checkpoint into `output_dir`, then drop Ray Train's copy of the run."""
    if result.checkpoint is None:
        raise RuntimeError("the training run ended without a final checkpoint")
    output_dir.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(str(output_dir))
    if result.path is None:  # local mode: the checkpoint is the directory `report_checkpoint` made
        shutil.rmtree(result.checkpoint.path, ignore_errors=True)
    if "://" not in str(storage):
        shutil.rmtree(storage, ignore_errors=True)
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(storage))
    with contextlib.suppress(Exception):  # best effort, as locally: the checkpoint is already copied
        fs.rm(path, recursive=True)


def relay(ctx, loss_key: str | None = None) -> OnMessage:
    """Log rank 0's (step, metrics) messages and advance the stage's progress bar to `step`."""
    seen = {"step": 0}

    def on_message(step: int, metrics: dict) -> None:
        ctx.log.metrics(metrics, step=step)
        if step > seen["step"]:
            message = f"step {step}"
            if loss_key and loss_key in metrics:
                message += f" {loss_key} {metrics[loss_key]:.3f}"
            ctx.progress.update(step - seen["step"], message=message)
            seen["step"] = step

    return on_message
