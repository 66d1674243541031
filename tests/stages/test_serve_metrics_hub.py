"""/metrics summed over replicas (`stages.serve.metrics_hub`): the sum of two registries' snapshots, and a
deployment of two replicas whose every scrape shows both, over real HTTP."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import requests
import served_app
from prometheus_client.parser import text_string_to_metric_families

import stages.serve as serve_stage
from stages.serve.metrics import ServeMetrics
from stages.serve.metrics_hub import HUB_NAMESPACE, hub_name, render, snapshot


def scheduler(**values) -> SimpleNamespace:
    """What ServeMetrics reads of a scheduler."""
    fields = ("queued", "batch_size", "cached_tokens", "kv_cache_tokens", "prefix_cached_tokens", "decode_steps")
    fields += ("compiled_steps",)
    return SimpleNamespace(**{**dict.fromkeys(fields, 0), "prefix_hit_tokens": 0, "preemptions": 0, **values})


def samples(text: bytes) -> dict[tuple, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_two_replicas_snapshots_add_up_and_the_earliest_created_is_kept():
    a = ServeMetrics(scheduler(batch_size=3, kv_cache_tokens=1000, preemptions=2))
    b = ServeMetrics(scheduler(batch_size=1, kv_cache_tokens=1000, preemptions=5))
    for metrics, statuses in ((a, [200, 200, 400]), (b, [200])):
        for status in statuses:
            metrics.request("/v1/completions", status)
    a.first_token(0.03)
    b.first_token(0.3)
    b.first_token(20.0)
    got = samples(render([snapshot(a.registry), snapshot(b.registry)], "colocated"))
    role = (("role", "colocated"),)

    def completions(status: str) -> tuple:
        return ("ernie_serve_requests_total", (("role", "colocated"), ("route", "/v1/completions"), ("status", status)))

    assert got[completions("200")] == 3 and got[completions("400")] == 1
    assert got[("ernie_serve_running", role)] == 4 and got[("ernie_serve_preemptions", role)] == 7
    assert got[("ernie_serve_kv_cache_budget_tokens", role)] == 2000
    ttft = "ernie_serve_time_to_first_token_seconds"
    assert got[(f"{ttft}_count", role)] == 3 and got[(f"{ttft}_sum", role)] == pytest.approx(20.33)
    assert got[(f"{ttft}_bucket", (("le", "0.05"), ("role", "colocated")))] == 1
    assert got[(f"{ttft}_bucket", (("le", "0.5"), ("role", "colocated")))] == 2
    assert got[(f"{ttft}_bucket", (("le", "+Inf"), ("role", "colocated")))] == 3
    created = [s for s in snapshot(a.registry) + snapshot(b.registry) if s[0] == "ernie_serve_requests"]
    earliest = min(v for fam in created for name, _, v in fam[3] if name.endswith("_created"))
    assert got[("ernie_serve_requests_created", completions("200")[1])] == earliest
    assert got[("ernie_serve_replicas", role)] == 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return served_app.random_checkpoint(tmp_path_factory.mktemp("hub_ckpt"))


def test_every_scrape_of_two_replicas_shows_both(ckpt):
    import ray

    settings = dict(num_replicas=2, replica_cpus=0.5, max_tokens=4)
    with served_app.served(ckpt, "ernie-hub", "ernie-hub", **settings) as (cfg, url):
        for i in range(8):
            body = {"model": "ernie-hub", "prompt": f"{i}+1=", "max_tokens": 3}
            assert requests.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        answered = (
            "ernie_serve_requests_total",
            (("role", "colocated"), ("route", "/v1/completions"), ("status", "200")),
        )
        role = (("role", "colocated"),)
        deadline = time.monotonic() + 15
        while True:  # a replica's snapshot is at most a push interval old
            got = samples(requests.get(f"{url}/metrics", timeout=30).content)
            if got.get(answered) == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert got[answered] == 8
        assert got[("ernie_serve_replicas", role)] == 2
        assert got[("ernie_serve_kv_cache_budget_tokens", role)] == 2 * cfg.kv_cache_tokens
        assert got[("ernie_serve_generated_tokens_total", role)] > 0
        ray.get_actor(hub_name(cfg.app_name), namespace=HUB_NAMESPACE)  # running beside the app
        serve_stage.stop(cfg)
        with pytest.raises(ValueError):
            ray.get_actor(hub_name(cfg.app_name), namespace=HUB_NAMESPACE)  # and stopped with it
