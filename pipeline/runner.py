"""Walk the stage graph: compute cache keys, skip what is cached, run the rest on Ray,
track everything in MLflow and record the run for `ls` / `show`."""

from __future__ import annotations

import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from . import driver, keylock
from .config import PipelineConfig, to_yaml
from .contract import Artifact, StageContext, UserError, check_custom_resources, check_fits, requested
from .graph import EVAL_MODULE, STAGE_MODULES, Selection, StageNode, build_graph, stage_module
from .redact import redact_text
from .store import ArtifactStore, cache_key, code_fingerprint


@dataclass
class PlannedStage:
    node: StageNode
    key: str
    cached: Artifact | None
    run: bool = False
    selected: bool = False
    """Shown to the user (run, or reported as cached); unselected stages only lend their artifacts."""
    explicit: bool = False
    """Named in `stages=[..]` or `force=[..]`: recomputed even when its artifact exists."""


@dataclass
class RunOutcome:
    run_id: str
    stages: dict[str, dict] = field(default_factory=dict)
    endpoint: str | None = None
    parent_run: str | None = None


def make_store(cfg: PipelineConfig) -> ArtifactStore:
    """Relative local roots are taken from the working directory of the command."""
    return ArtifactStore(_absolute(cfg.artifacts.root), _absolute(cfg.artifacts.local_root))


def _absolute(root: str) -> str:
    return root if "://" in root else str(Path(root).expanduser().resolve())


def plan_stages(cfg: PipelineConfig, store: ArtifactStore, selection: Selection) -> list[PlannedStage]:
    """Keys for every stage and which ones this run executes."""
    nodes = build_graph(cfg.posttrain.recipe)
    selection.check(nodes)
    keys: dict[str, str] = {}
    planned: list[PlannedStage] = []
    for node in nodes:
        inputs = {name: keys[upstream] for name, upstream in node.inputs.items()}
        model_cfg = None if node.name == "data" else cfg.model
        extra = {"seed": cfg.seed, "model": model_cfg}
        if node.evaluated:
            extra["eval"] = cfg.eval
        section = cfg.section(node.config_path)
        # training stages key on what changes their weights: a rerun on more workers (or with other
        # resources, checkpoint cadence, ...) finds the artifact, or resumes the train state, of the same key
        keyed = section.fingerprint() if hasattr(section, "fingerprint") else section
        keys[node.name] = cache_key(node.name, keyed, code_fingerprint(STAGE_MODULES[node.name]), inputs, extra)
        planned.append(PlannedStage(node, keys[node.name], store.find(node.name, keys[node.name])))
    wanted = set(selection.wanted(nodes))
    by_name = {p.node.name: p for p in planned}
    for p in planned:
        p.selected = p.node.name in wanted or p.node.name in selection.force
        # `stages=[..]` and `force=[..]` recompute; otherwise only what is not cached runs
        p.explicit = p.node.name in selection.force or (selection.stages is not None and p.selected)
        p.run = p.selected and (p.explicit or p.cached is None)
    for p in reversed(planned):  # missing upstream artifacts are produced first
        if p.run:
            for upstream in p.node.inputs.values():
                if by_name[upstream].cached is None:
                    by_name[upstream].run = by_name[upstream].selected = True
    return planned


def check_resources(cfg: PipelineConfig, planned: list[PlannedStage], cluster: dict[str, float]) -> None:
    """Refuse, before anything runs, a stage the cluster can never place (Ray would wait forever). An autoscaling
    cluster is judged by the ceiling it may grow to (`cluster.max_cpus` / `max_gpus`), not by its size at rest;
    its custom resources (the node types it may add) are then not checked either."""
    autoscaling = cfg.cluster.max_cpus > cluster.get("CPU", 0.0) or cfg.cluster.max_gpus > cluster.get("GPU", 0.0)
    cluster = {
        **cluster,
        "CPU": max(cluster.get("CPU", 0.0), cfg.cluster.max_cpus),
        "GPU": max(cluster.get("GPU", 0.0), cfg.cluster.max_gpus),
    }
    for p in planned:
        if p.run:
            section = cfg.section(p.node.config_path)
            check_fits(requested(section), cluster, p.node.config_path)
            check_custom_resources(
                getattr(section, "resources", None), None if autoscaling else cluster, p.node.config_path
            )


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def execute(cfg: PipelineConfig, conf_name: str, selection: Selection, dry_run: bool, ui) -> RunOutcome:
    """Run the pipeline; `ui` draws progress and prints stage results."""
    from . import executor
    from .tracking import PipelineTracker, tracking_uri

    store = make_store(cfg)
    planned = plan_stages(cfg, store, selection)  # reads only
    if any(p.run for p in planned):  # an all-cached run needs no cluster
        cluster = executor.connect(cfg.cluster.address, cfg.cluster.local_num_cpus)
        autoscaling = bool(cfg.cluster.max_cpus or cfg.cluster.max_gpus)
        executor.check_shared_root(store.root, store.is_local, autoscaling)
        check_resources(cfg, planned, cluster)
    uri = tracking_uri(cfg.tracking.uri)
    tracker = PipelineTracker(uri, cfg.tracking.experiment)  # a tracking server that refuses us: before any write
    store.check_writable()  # the first write of the run
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    for killed in driver.end_killed_runs(store, tracker, uri, run_id):
        print(f"run {killed} was left running by a driver that is gone: marked {driver.KILLED}", file=sys.stderr)
    tracker.start(
        f"{conf_name}-{run_id}",
        {"conf": conf_name, "git_commit": git_commit(), "dry_run": str(dry_run).lower(), "pipeline_run": run_id},
        to_yaml(cfg),
    )
    outcome = RunOutcome(run_id=run_id, parent_run=tracker.parent_id)
    record = {
        "run_id": run_id,
        "conf": conf_name,
        "dry_run": dry_run,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mlflow_uri": redact_text(uri),  # the record is printed by `show`
        "mlflow_run_id": tracker.parent_id,
        "driver": driver.identity(),
        "status": "running",
        "stages": {},
    }
    store.save_run(record)
    artifacts: dict[str, Artifact] = {}
    ok = False
    try:
        for p in planned:
            if not p.selected:
                if p.cached is not None:
                    artifacts[p.node.name] = p.cached
                continue
            artifacts[p.node.name] = _run_or_reuse(cfg, p, artifacts, store, tracker, ui, outcome, record)
            store.save_run(record)
        ok = True
    finally:
        record["status"] = "finished" if ok else "failed"
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        try:
            store.save_run(record)
        except Exception as err:
            if ok:
                raise
            # the stage's own error is the one to report (the store may fail for the same reason)
            print(f"warning: the run record was not updated: {redact_text(str(err))}", file=sys.stderr)
        finally:
            tracker.finish(tracker.parent_id, ok)
    _register(cfg, tracker, artifacts, outcome)
    return outcome


def _run_or_reuse(cfg, p: PlannedStage, artifacts, store, tracker, ui, outcome: RunOutcome, record) -> Artifact:
    """The stage's artifact: the cached one, or run the stage under its key's lock (`keylock`); a run
    that waited for another run of the same key takes what that one made (unless told to recompute)."""
    if not p.run and p.cached is not None:
        return _reuse(cfg, p, p.cached, tracker, ui, outcome, record)
    holder = {"pipeline_run": outcome.run_id, **driver.identity()}
    with keylock.held(store.lock_path(p.node.name, p.key), holder, lambda other: ui.waiting(p.node.name, other)):
        made = None if p.explicit else store.find(p.node.name, p.key)
        if made is not None:  # the run this one waited for produced it
            return _reuse(cfg, p, made, tracker, ui, outcome, record)
        return _run(cfg, p, artifacts, store, tracker, ui, outcome, record)


def _reuse(cfg, p: PlannedStage, cached: Artifact, tracker, ui, outcome: RunOutcome, record) -> Artifact:
    name = p.node.name
    logger = tracker.stage(
        name,
        cfg.section(p.node.config_path),
        {"cache": "hit", "cache_key": p.key, "produced_by_run": cached.manifest.get("pipeline_run", "")},
        p.node.config_path,
    )
    logger.metrics({k: v for k, v in cached.manifest.get("metrics", {}).items() if isinstance(v, (int, float))})
    tracker.finish(logger.run_id, True)
    ui.cached(name, cached)
    _record(outcome, record, name, cached, "cached", logger.run_id)
    return cached


def _run(cfg, p: PlannedStage, artifacts, store, tracker, ui, outcome: RunOutcome, record) -> Artifact:
    from . import executor

    name = p.node.name
    section = cfg.section(p.node.config_path)
    module = stage_module(name)
    inputs = {}
    for input_name, upstream in p.node.inputs.items():
        if upstream not in artifacts:
            raise UserError(
                f"stage {name} needs the {upstream} artifact, which is missing; rerun with stages=[{upstream},{name}]"
            )
        inputs[input_name] = artifacts[upstream]
    logger = tracker.stage(name, section, {"cache": "miss", "cache_key": p.key}, p.node.config_path)
    ctx = StageContext(
        stage=name,
        config=section,
        model=cfg.model,
        inputs=inputs,
        output_dir=Path("."),
        seed=cfg.seed,
        dry_run=False,
        num_cpus=section.resources.num_cpus,
        num_gpus=section.resources.num_gpus,
        work_dir=store.work_dir(name, p.key),
        state_uri=store.state_uri(name, p.key),
    )
    job = executor.StageJob(
        stage=name,
        module=STAGE_MODULES[name],
        kind=module.OUTPUT_KIND,
        key=p.key,
        context=ctx,
        eval_module=EVAL_MODULE if p.node.evaluated else None,
        eval_config=cfg.eval,
        store_args=(store.root, str(store.local_root)),
        manifest_extra={
            "inputs": {k: a.cache_key for k, a in inputs.items()},
            "pipeline_run": outcome.run_id,
            "mlflow_run_id": logger.run_id,
        },
    )
    start = time.time()
    bar = ui.start(name)
    try:
        actor = section.actor_resources() if hasattr(section, "actor_resources") else section.resources
        result = executor.run_stage(job, actor, bar.update, logger)
        artifact = _publish(store, name, p.key, result["manifest"])
    except executor.StageFailure:
        tracker.finish(logger.run_id, False)
        bar.close(failed=True)
        raise
    bar.close()
    logger.metrics({"stage_seconds": time.time() - start})
    tracker.finish(logger.run_id, True)
    ui.finished(name, artifact, result["metrics"], result["summary"], time.time() - start)
    _record(outcome, record, name, artifact, "ran", logger.run_id)
    if name == "serve":
        outcome.endpoint = result["metrics"].get("url") or artifact.manifest.get("url")
    return artifact


def _publish(store, stage: str, key: str, manifest: dict) -> Artifact:
    """The stage's placed output made an artifact by its driver (`ArtifactStore.publish`)."""
    from . import executor

    try:
        return store.publish(stage, key, manifest)
    except Exception as err:  # noqa: BLE001 - reported as the stage's failure, like an error in its actor
        tb = traceback.format_exc()
        err = executor.disk_full(err, stage, [store.path if store.is_local else None, store.local_root]) or err
        raise executor.StageFailure(stage, err, tb) from None


def _record(outcome: RunOutcome, record: dict, name: str, artifact: Artifact, status: str, mlflow_run: str) -> None:
    entry = {
        "status": status,
        "cache_key": artifact.cache_key,
        "uri": artifact.uri,
        "mlflow_run_id": mlflow_run,
        "metrics": artifact.manifest.get("metrics", {}),
    }
    outcome.stages[name] = entry
    record["stages"][name] = entry


def _register(cfg: PipelineConfig, tracker, artifacts: dict[str, Artifact], outcome: RunOutcome) -> None:
    if not cfg.tracking.register_model or "quantize" not in artifacts:
        return
    served = artifacts["quantize"]
    version = tracker.register_model(
        f"{cfg.name}-model", served.uri, served.manifest.get("mlflow_run_id") or tracker.parent_id
    )
    outcome.stages.setdefault("quantize", {})["registered_version"] = version
