"""Running stages in-process in tests: a context with local artifacts, and the shared local Ray."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.contract import Artifact, MemoryLogger, StageContext


def make_ctx(
    stage, config, model, inputs: dict[str, Path], root: Path, seed: int = 0, state_uri: str | None = None
) -> StageContext:
    """A stage's context: inputs are local artifact dirs, outputs under `root`, metrics in memory;
    resume state under `root` too unless `state_uri` (an fsspec URL) says otherwise."""
    artifacts = {name: Artifact(name, str(path), cache_key=f"key-{path.name}") for name, path in inputs.items()}
    return StageContext(
        stage=stage,
        config=config,
        model=model,
        inputs=artifacts,
        output_dir=root / "out",
        log=MemoryLogger(),
        seed=seed,
        work_dir=root / "work",
        state_uri=state_uri,
    )


def local_ray() -> Iterator:
    """A module fixture's body: a local Ray of 4 logical CPUs unless one is running already."""
    import ray

    # Ray Train's controller polls its workers every 2 s by default: a few seconds per run here
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()
