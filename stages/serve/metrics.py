"""Prometheus metrics of one serving replica, scraped at GET /metrics.

Each replica keeps its own `CollectorRegistry`: the process-wide default one would also export
whatever else the Ray worker registers, and a second deployment in the same process would clash on
the names. Ray Serve routes a scrape to one replica; a deployed app's replicas share their registries
through a hub actor (`stages.serve.metrics_hub`), so whichever answers shows the sum over all of them.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROLE = "colocated"
"""The `role` label of the replica's own metrics: "colocated", or "router" in front of PD workers."""
PD_ROLES = ("prefill", "decode")
PREFIX = "ernie_serve_"
ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"})
"""Paths counted under their own name; any other path counts as "other", so a scanner probing random
URLs cannot grow the label set without bound."""
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """The replica's metrics; the scheduler's gauges are read when scraped, so they cost nothing per step."""

    def __init__(self, scheduler, role: str = ROLE, pd_stats=None) -> None:
        """`pd_stats`: `PDEngine.stats` in PD mode, for the per-role gauges."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.role = role
        r = self.registry
        self._requests = Counter(
            f"{PREFIX}requests",
            "HTTP requests answered, by route and status code",
            ["role", "route", "status"],
            registry=r,
        )
        self._ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds",
            "From the request's arrival at its handler to the first text of a choice",
            ["role"],
            buckets=TTFT_BUCKETS,
            registry=r,
        ).labels(role)
        self._tpot = Histogram(
            f"{PREFIX}time_per_output_token_seconds",
            "Per choice: the time after its first text divided by the tokens generated after the first",
            ["role"],
            buckets=TPOT_BUCKETS,
            registry=r,
        ).labels(role)
        self._generated = Counter(
            f"{PREFIX}generated_tokens", "Completion tokens of finished choices", ["role"], registry=r
        ).labels(role)
        self._prompt = Counter(
            f"{PREFIX}prompt_tokens", "Prompt tokens, once per prompt as `usage` counts them", ["role"], registry=r
        ).labels(role)
        gauges = {
            "queue_depth": ("Requests waiting for admission or prefilling", lambda: scheduler.queued),
            "running": ("Requests decoding now", lambda: scheduler.batch_size),
            "kv_cache_used_tokens": ("Token slots of the KV blocks requests hold now", lambda: scheduler.cached_tokens),
            "kv_cache_budget_tokens": ("Token slots of the KV block pool", lambda: scheduler.kv_cache_tokens),
            "prefix_cache_tokens": (
                "Token slots of cached prefix blocks nobody holds (reused by matching prompts, evicted when needed)",
                lambda: scheduler.prefix_cached_tokens,
            ),
            "prefix_cache_reused_tokens": (
                "Prompt tokens whose keys and values came from cached blocks instead of a prefill, so far",
                lambda: scheduler.prefix_hit_tokens,
            ),
            "preemptions": (
                "Requests that gave their KV blocks back so older ones could grow (computed again when readmitted)",
                lambda: scheduler.preemptions,
            ),
            "decode_steps": ("Forwards that decoded running requests, so far", lambda: scheduler.decode_steps),
            "compiled_decode_steps": (
                "Decode steps run by the compiled step (serve.compile_decode), so far; the others carried a prompt "
                "chunk (serve.prompt_wait_steps gathers prompts to raise this share)",
                lambda: scheduler.compiled_steps,
            ),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"{PREFIX}{name}", doc, ["role"], registry=r).labels(role).set_function(read)
        if pd_stats is not None:
            self._role_gauges(pd_stats)

    def _role_gauges(self, pd_stats) -> None:
        """PD serving: per worker role (prefill, decode) its workers, queue and running requests, and the role
        switches so far; one stats call a scrape (it asks the workers)."""
        cached = {"at": -1.0, "stats": {}}

        def read(key: str, role: str):
            def value() -> float:
                now = time.monotonic()
                if now - cached["at"] > 0.5:
                    cached["at"], cached["stats"] = now, pd_stats()
                return float(cached["stats"].get(key, {}).get(role, 0))

            return value

        docs = {
            "workers": "PD workers holding this role now",
            "queue_depth": "Requests queued at the workers of this role",
            "running": "Requests running at the workers of this role",
            "in_flight": "Requests the router sent to workers of this role and not done yet",
            "switches_to": "Workers switched to this role so far (dynamic role switching)",
        }
        for key, doc in docs.items():
            gauge = Gauge(f"{PREFIX}pd_{key}", doc, ["role"], registry=self.registry)
            for role in PD_ROLES:
                gauge.labels(role).set_function(read(key, role))

    def request(self, path: str, status: int) -> None:
        route = path if path in ROUTES else "other"
        self._requests.labels(self.role, route, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def choice_done(self, completion_tokens: int, after_first_s: float) -> None:
        """A finished choice: its tokens, and its pace once the first text was out (when it had more than one)."""
        self._generated.inc(completion_tokens)
        if completion_tokens > 1:
            self._tpot.observe(after_first_s / (completion_tokens - 1))

    def prompt_done(self, prompt_tokens: int) -> None:
        self._prompt.inc(prompt_tokens)

    def share(self, app_name: str) -> None:
        """Report to the app's metrics hub (started by the serve stage), and answer scrapes with the replicas' sum."""
        from .metrics_hub import ReplicaReporter

        self._reporter = ReplicaReporter(self.registry, self.role, app_name)

    def expose(self) -> tuple[bytes, str]:
        """The Prometheus text exposition (summed over the app's replicas once `share`d) and its content type."""
        reporter = getattr(self, "_reporter", None)
        body = generate_latest(self.registry) if reporter is None else reporter.expose()
        return body, CONTENT_TYPE_LATEST
