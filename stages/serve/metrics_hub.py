"""/metrics summed over a deployment's replicas.

Ray Serve sends a scrape to one replica, so a replica's own registry shows only the requests it served. Each
replica therefore pushes a snapshot of its registry to one named Ray actor per app, the hub, every
`PUSH_INTERVAL_S` (and right before it answers a scrape), and answers a scrape with the hub's snapshots summed:
counters, histogram buckets and gauges (queue depth, running requests, KV slots and the KV budget: the
deployment's totals) add up; a `_created` timestamp is the earliest. A replica that stops pushing (gone, or
replaced) drops out after `STALE_AFTER_S`, so the counters it had counted drop out with it, which Prometheus
reads as a counter reset. `ernie_serve_replicas` counts the replicas in the sum.

The serve stage starts the hub (detached, beside the app) in `start` and ends it in `stop`.
"""

from __future__ import annotations

import threading
import time
import uuid

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric

from .metrics import PREFIX

HUB_NAMESPACE = "ernie-serve"
PUSH_INTERVAL_S = 1.0
STALE_AFTER_S = 5.0

Snapshot = list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]
"""A registry's families: (name, type, documentation, samples as (sample name, labels, value))."""


def hub_name(app_name: str) -> str:
    return f"{app_name}-metrics"


def snapshot(registry) -> Snapshot:
    """What `registry` holds now, as plain tuples (a gauge read from a callback is read here)."""
    return [
        (m.name, m.type, m.documentation, [(s.name, dict(s.labels), float(s.value)) for s in m.samples])
        for m in registry.collect()
    ]


def merge(snapshots: list[Snapshot]) -> list[Metric]:
    """The snapshots' families with equal samples (name and labels) added up; `_created` samples: the earliest."""
    families: dict[str, tuple[str, str, dict]] = {}
    for snap in snapshots:
        for name, kind, doc, samples in snap:
            values = families.setdefault(name, (kind, doc, {}))[2]
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                if key not in values:
                    values[key] = value
                elif sample.endswith("_created"):
                    values[key] = min(values[key], value)
                else:
                    values[key] += value
    merged = []
    for name, (kind, doc, values) in families.items():
        metric = Metric(name, doc, kind)
        for (sample, labels), value in values.items():
            metric.add_sample(sample, dict(labels), value)
        merged.append(metric)
    return merged


class _Families:
    """What `generate_latest` reads: an object with `collect()`."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


def render(snapshots: list[Snapshot], role: str) -> bytes:
    """The Prometheus text of the snapshots summed, with `ernie_serve_replicas` (how many were summed)."""
    replicas = Metric(f"{PREFIX}replicas", "Replicas whose metrics this scrape sums", "gauge")
    replicas.add_sample(f"{PREFIX}replicas", {"role": role}, float(len(snapshots)))
    return generate_latest(_Families([*merge(snapshots), replicas]))


class MetricsHub:
    """The app's snapshots by replica, newest only (a Ray actor: `hub_actor`)."""

    def __init__(self) -> None:
        self._snapshots: dict[str, tuple[float, Snapshot]] = {}

    def push(self, replica: str, snap: Snapshot) -> None:
        self._snapshots[replica] = (time.monotonic(), snap)

    def snapshots(self) -> list[Snapshot]:
        now = time.monotonic()
        for replica in [r for r, (at, _) in self._snapshots.items() if now - at > STALE_AFTER_S]:
            del self._snapshots[replica]
        return [snap for _, snap in self._snapshots.values()]


def start_hub(app_name: str):
    """The app's hub, started if it is not running (detached: it lives as long as the app, not the driver)."""
    import ray

    actor = ray.remote(num_cpus=0)(MetricsHub)
    options = {"name": hub_name(app_name), "namespace": HUB_NAMESPACE, "lifetime": "detached", "get_if_exists": True}
    return actor.options(**options).remote()


def stop_hub(app_name: str) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(hub_name(app_name), namespace=HUB_NAMESPACE))
    except ValueError:
        pass  # not running


class ReplicaReporter:
    """A replica's side: pushes its registry to the hub in the background, and renders the sum for a scrape."""

    def __init__(self, registry, role: str, app_name: str) -> None:
        import ray

        self.registry, self.role = registry, role
        self.replica = uuid.uuid4().hex
        self._hub = ray.get_actor(hub_name(app_name), namespace=HUB_NAMESPACE)
        self._stop = threading.Event()
        threading.Thread(target=self._push_every_interval, name="metrics-push", daemon=True).start()

    def _push(self):
        return self._hub.push.remote(self.replica, snapshot(self.registry))

    def _push_every_interval(self) -> None:
        while not self._stop.wait(PUSH_INTERVAL_S):
            try:
                self._push()
            except Exception:  # noqa: BLE001 - the hub is gone (the app is stopping): nothing to report to
                return

    def expose(self) -> bytes:
        """This replica's metrics now plus the others' last pushed, summed. An actor runs one caller's calls in
        order, so the summed snapshots include the push made here."""
        import ray

        self._push()
        return render(ray.get(self._hub.snapshots.remote(), timeout=10), self.role)

    def close(self) -> None:
        self._stop.set()
