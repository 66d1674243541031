"""How long a training stage waits for Ray Train before its training function runs: ours vs Ray Train as is.

Both sides start the same training function, which (as every stage's does) lives in a module that imports
torch and the training stack, on the same local Ray, alternating run by run. The function does no
training: rank 0 sends one message to the stage and returns, so the wall time of a run is start-up,
the message and shut-down alone.

  ours       `stages.training.launch.fit`, which every training stage calls: in local mode (num_workers=0)
             rank 0's messages go through a queue in the stage's process; with workers, through a
             `ray.util.queue.Queue` actor.
  ray-train  `TorchTrainer(train_fn, train_loop_config=...)` as Ray Train's docs write it, the messages going
             through a `ray.util.queue.Queue` actor in local mode too.

With workers the two sides are the same calls: their figures are Ray Train's own start-up (controller,
placement group, worker processes, torch's process group), which no stage can shorten but by training in
local mode where one process is enough.

    python bench/train_start.py                  # 2 workers and local mode, 3 runs of each side
    python bench/train_start.py --workers 2 --repeats 5

Writes JSON (each run's seconds, and the medians) to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages.pretrain.loop  # noqa: E402,F401 - the training stack a stage's training function imports
from bench.common import package_version, write_report  # noqa: E402


def probe(config: dict) -> None:
    """A training function that does no training: rank 0 tells the stage it ran."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        config["sink"].put_nowait((1, {"started": 1.0}))


def _probe():
    """`probe` by its module's name, as a stage's function is pickled (run as a script, this module is
    __main__, whose functions cloudpickle would copy by value, importing nothing)."""
    import importlib

    return importlib.import_module("bench.train_start").probe


def ours(workers: int, storage: str) -> float:
    from stages.training.launch import fit

    messages = []
    start = time.perf_counter()
    fit(
        _probe(),
        {},
        num_workers=workers,
        cpus_per_worker=1,
        gpus_per_worker=0,
        max_failures=0,
        storage=storage,
        on_message=lambda step, metrics: messages.append(step),
    )
    seconds = time.perf_counter() - start
    assert messages == [1], messages
    return seconds


def ray_train_as_is(workers: int, storage: str) -> float:
    import uuid

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    start = time.perf_counter()
    sink = Queue(actor_options={"num_cpus": 0})
    TorchTrainer(
        _probe(),
        train_loop_config={"sink": sink},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, resources_per_worker={"CPU": 1} if workers else None
        ),
        run_config=ray.train.RunConfig(name=f"run-{uuid.uuid4().hex[:8]}", storage_path=storage),
    ).fit()
    message = sink.get(timeout=60)
    seconds = time.perf_counter() - start
    ray.kill(sink.actor)
    assert message[0] == 1, message
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="worker counts (0: local mode)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/train_start.json")
    args = parser.parse_args(argv)

    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # as the pipeline's local Ray has it
    ray.init(
        num_cpus=max(4, max(args.workers)),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}},
    )
    sides = {"ours": ours, "ray-train": ray_train_as_is}
    records = []
    with tempfile.TemporaryDirectory() as storage:
        ours(max(args.workers), storage)  # warm-up: the first run of a Ray pays its first worker start-ups
        for workers in args.workers:
            runs: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side, start in sides.items():
                    runs[side].append(start(workers, storage))
            for side, seconds in runs.items():
                median = statistics.median(seconds)
                records.append({"side": side, "workers": workers, "seconds": seconds, "median_s": median})
                print(f"{side:10s} workers={workers}: median {median:5.2f} s  runs {[round(s, 2) for s in seconds]}")
    ray.shutdown()
    report = {
        "bench": "train_start",
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "ray": package_version("ray"),
        "torch": package_version("torch"),
        "repeats": args.repeats,
        "records": records,
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
