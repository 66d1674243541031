"""The serving API's n > 1, /metrics, bearer-token auth, request limits and a short KV pool, over real HTTP.

One app serves the whole module (a deployment takes most of the module's time on a small machine):
a random tiny_moe checkpoint, an API key, small limits and a KV pool of 96 token slots, which a few long
choices outgrow (preemption)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import openai
import pytest
import requests
import served_app
import tiny_artifacts
import torch
from omegaconf import OmegaConf
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

import stages.serve as serve_stage
from ernie import ErnieForCausalLM, get_preset
from pipeline.redact import redact_params, redact_text
from pipeline.tracking import flatten
from stages.serve.engine import Engine

KEY = "sk-test-6f1d0c2b9a8e7d"
MODEL = "ernie-limits-test"
LIMITS = dict(
    api_key=KEY,
    max_n=4,
    max_request_bytes=4096,
    max_tokens_limit=32,
    max_tokens=6,
    kv_cache_tokens=96,
    kv_block_tokens=8,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return served_app.random_checkpoint(tmp_path_factory.mktemp("limits_ckpt"))


@pytest.fixture(scope="module")
def served(ckpt):
    """(config, base url) of the module's app."""
    with served_app.served(ckpt, MODEL, "ernie-limits", **LIMITS) as app:
        yield app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[1]}/v1", api_key=KEY, max_retries=0, timeout=60)


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _texts(response) -> list[str]:
    assert [c.index for c in response.choices] == list(range(len(response.choices)))
    return [c.text for c in response.choices]


# ---------------------------------------------------------------------- engine-level (no Ray)
def test_choices_of_one_request_are_decoded_in_one_batch_and_stop_together(ckpt):
    """What the HTTP tests cannot see: the choices reach the scheduler together, not one after
    another, and a reader that stops (a client gone mid-stream) frees every choice's rows. In-process,
    and first in the module, so the app's replica does not compete for the CPUs."""
    from stages.serve.app import _together

    torch.manual_seed(0)  # in fp32 and in memory: the stored checkpoint runs slower on a busy CPU
    model = ErnieForCausalLM(get_preset("tiny_moe").replace(vocab_size=served_app.VOCAB))
    engine = Engine(model, Tokenizer.from_file(str(ckpt / "tokenizer" / "tokenizer.json")))
    try:
        prompt = engine.encode("1+2=")

        async def read_all() -> dict:
            streams = [engine.astream(prompt, 48, temperature=0.0) for _ in range(4)]
            return {i: d.completion async for i, d in _together(streams) if d.completion}

        finals = asyncio.run(read_all())
        assert sorted(finals) == [0, 1, 2, 3] and len({f.text for f in finals.values()}) == 1
        assert engine.scheduler.stats.max_batch == 4
        steps = engine.scheduler.stats.decode_steps

        async def read_one_and_stop() -> None:
            reader = _together([engine.astream(prompt, 2000, temperature=0.0) for _ in range(2)])
            await anext(reader)
            await reader.aclose()

        asyncio.run(read_one_and_stop())
        deadline = time.monotonic() + 10
        while engine.scheduler.batch_size and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.scheduler.batch_size == 0 and engine.scheduler.stats.decode_steps - steps < 1000
    finally:
        engine.close()


# ---------------------------------------------------------------------- n > 1
def test_seeded_choices_are_seed_plus_j_and_repeat(client):
    kw = dict(model=MODEL, prompt="1+2=", max_tokens=6, temperature=1.0, seed=11)
    first, again = (client.completions.create(n=3, **kw) for _ in range(2))
    assert _texts(first) == _texts(again) and len(first.choices) == 3
    alone = [client.completions.create(**{**kw, "seed": 11 + j}).choices[0].text for j in range(3)]
    assert _texts(first) == alone  # choice j samples with seed + j
    assert first.usage.prompt_tokens == client.completions.create(**kw).usage.prompt_tokens  # the prompt once
    assert first.usage.completion_tokens == sum(
        client.completions.create(**{**kw, "seed": 11 + j}).usage.completion_tokens for j in range(3)
    )


def test_greedy_choices_are_identical_and_the_single_greedy_answer(client):
    kw = dict(model=MODEL, prompt="reverse cat", max_tokens=6, temperature=0)
    one = client.completions.create(**kw).choices[0].text
    assert _texts(client.completions.create(n=2, **kw)) == [one, one]
    messages = [{"role": "user", "content": "2+2="}]
    chat_kw = dict(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    single = client.chat.completions.create(**chat_kw)
    pair = client.chat.completions.create(n=2, **chat_kw)
    assert [c.index for c in pair.choices] == [0, 1]
    assert [c.message.content for c in pair.choices] == [single.choices[0].message.content] * 2
    assert pair.usage.prompt_tokens == single.usage.prompt_tokens
    assert pair.usage.completion_tokens == 2 * single.usage.completion_tokens


def test_long_choices_outgrowing_the_kv_pool_are_preempted_and_still_the_single_answer(served, client):
    """Four greedy choices of 32 tokens need about 160 slots of a 96-slot pool: they all start, and as they grow
    the later ones give their blocks back and are computed again. Each is still the single greedy answer."""
    kw = dict(model=MODEL, prompt="how many red squares are there", max_tokens=32, temperature=0)
    one = client.completions.create(**kw)
    assert one.usage.completion_tokens == 32  # no early end: the choices do outgrow the pool
    before = _value(_scrape(served[1]), "ernie_serve_preemptions")
    four = client.completions.create(n=4, **kw)
    assert _texts(four) == [one.choices[0].text] * 4
    assert four.usage.completion_tokens == 4 * 32
    assert _value(_scrape(served[1]), "ernie_serve_preemptions") > before


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(client):
    kw = dict(model=MODEL, prompt="how many red squares are there? " * 3, max_tokens=2, temperature=0)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    whole_blocks = (first.usage.prompt_tokens - 1) // LIMITS["kv_block_tokens"] * LIMITS["kv_block_tokens"]
    assert again.usage.prompt_tokens_details.cached_tokens == whole_blocks > 0  # all but the last token's block
    assert again.choices[0].text == first.choices[0].text
    chat = dict(model=MODEL, messages=[{"role": "user", "content": kw["prompt"]}], max_tokens=2, temperature=0)
    client.chat.completions.create(**chat)
    assert client.chat.completions.create(**chat).usage.prompt_tokens_details.cached_tokens > 0


def test_a_list_of_prompts_gives_n_choices_each_indexed_prompt_major(client):
    prompts = ["1+2=", "how many red squares"]
    kw = dict(model=MODEL, max_tokens=4, temperature=1.0, seed=3)
    both = client.completions.create(prompt=prompts, n=2, **kw)
    alone = [client.completions.create(prompt=p, n=2, **kw) for p in prompts]
    assert _texts(both) == _texts(alone[0]) + _texts(alone[1])
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_streamed_choices_interleave_and_each_ends_with_its_finish_reason(client):
    kw = dict(model=MODEL, prompt="1+2=", max_tokens=6, temperature=1.0, seed=5, n=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index].append(choice.finish_reason)
    assert [texts[0], texts[1]] == _texts(whole)
    assert [reasons[0], reasons[1]] == [[c.finish_reason] for c in whole.choices]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=2, stream=True, seed=1
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chat if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert len([c for c in mine if c.finish_reason]) == 1 and mine[-1].finish_reason


def test_n_above_max_n_is_a_400_naming_n(client):
    for create in (
        lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=1, n=5),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=5),
    ):
        with pytest.raises(openai.BadRequestError, match="serve.max_n") as caught:
            create()
        assert caught.value.body["param"] == "n"


# ---------------------------------------------------------------------- auth
def test_every_route_but_health_wants_the_key(served):
    _, url = served
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, _auth("sk-wrong"), {"Authorization": KEY}):  # the last: no Bearer scheme
            response = requests.get(f"{url}{path}", headers=headers, timeout=30)
            assert response.status_code == 401, (path, headers)
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
            assert KEY not in response.text
        assert requests.get(f"{url}{path}", headers=_auth(), timeout=30).status_code == 200
    missing = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
    assert requests.get(f"{url}/health", timeout=30).status_code == 200


def test_the_openai_client_sees_a_wrong_key_as_an_authentication_error(served, client):
    wrong = openai.OpenAI(base_url=f"{served[1]}/v1", api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).choices


def test_the_key_comes_from_the_environment_when_the_config_has_none(monkeypatch):
    monkeypatch.setenv(serve_stage.API_KEY_ENV, "from-the-env")
    assert serve_stage.api_key(serve_stage.Config()) == "from-the-env"
    assert serve_stage.api_key(serve_stage.Config(api_key="from-config")) == "from-config"
    monkeypatch.delenv(serve_stage.API_KEY_ENV)
    assert serve_stage.api_key(serve_stage.Config()) == ""


def test_the_stage_smoke_tests_with_the_key_and_records_no_key(served, ckpt, tmp_path, monkeypatch):
    """The stage's own run against the module's app (start/stop stubbed: a second deployment costs
    half a minute): its smoke test gets through auth, and the key is nowhere in what it records."""
    cfg, url = served
    monkeypatch.setattr(serve_stage, "start", lambda *args: url)
    monkeypatch.setattr(serve_stage, "stop", lambda *args: None)
    stage_cfg = dataclasses.replace(cfg, smoke_requests=2)
    ctx = tiny_artifacts.context("serve", stage_cfg, {"model": ("ckpt", ckpt)}, tmp_path)
    result = serve_stage.run(ctx)
    endpoint = (tmp_path / "endpoint.json").read_text()
    assert json.loads(endpoint)["deployment"]["api_key"] == "***"
    assert json.loads(endpoint)["smoke"]["completion"]["choices"]
    recorded = [endpoint, repr(ctx.log.metric_log), repr(ctx.log.param_log), repr(result)]
    # what the pipeline logs of the config: MLflow params and config.yaml
    recorded.append(repr(redact_params(flatten({"serve": stage_cfg}))))
    recorded.append(redact_text(OmegaConf.to_yaml(OmegaConf.structured(stage_cfg))))
    assert all(KEY not in text for text in recorded)


# ---------------------------------------------------------------------- limits
def test_a_body_over_max_request_bytes_is_a_413_before_parsing(served):
    _, url = served
    big = json.dumps({"model": MODEL, "prompt": "x" * 5000, "max_tokens": 1}).encode()
    for body in (big, iter([big[:3000], big[3000:]])):  # with a Content-Length, then chunked without one
        response = requests.post(
            f"{url}/v1/completions", data=body, headers={**_auth(), "content-type": "application/json"}, timeout=30
        )
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "serve.max_request_bytes" in error["message"]
    small = requests.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=_auth(), timeout=30)
    assert small.status_code == 200


def test_malformed_json_is_a_400_with_an_openai_error_body(served):
    _, url = served
    response = requests.post(
        f"{url}/v1/completions",
        data=b'{"prompt": "x", "max_tokens":',
        headers={**_auth(), "content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_max_tokens_over_the_limit_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="serve.max_tokens_limit") as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=33)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=33, stream=True
        )
    assert caught.value.body["param"] == "max_completion_tokens"
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=32).usage.completion_tokens >= 1


# ---------------------------------------------------------------------- /metrics
def _scrape(url: str) -> dict[str, list]:
    """{sample name: samples} of a /metrics scrape; every sample carries the role label."""
    scrape = requests.get(f"{url}/metrics", headers=_auth(), timeout=30)
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(scrape.text):
        for s in family.samples:
            assert s.labels["role"] == "colocated", s
            samples.setdefault(s.name, []).append(s)
    return samples


def _value(samples: dict[str, list], name: str, **labels) -> float:
    return sum(s.value for s in samples.get(name, []) if labels.items() <= s.labels.items())


def test_metrics_count_requests_tokens_and_time_to_first_token(served, client):
    _, url = served
    before = _scrape(url)
    response = client.completions.create(model=MODEL, prompt="1+2=", max_tokens=4, temperature=1.0, seed=0, n=2)
    requests.get(f"{url}/v1/models", timeout=30)  # no key: a 401
    after = _scrape(url)

    def grew(name: str, **labels) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert grew("ernie_serve_requests_total", route="/v1/completions", status="200") == 1
    assert grew("ernie_serve_requests_total", route="/v1/models", status="401") == 1
    assert grew("ernie_serve_requests_total", route="/metrics", status="200") == 1  # the first scrape
    assert grew("ernie_serve_time_to_first_token_seconds_count") == 2  # one per choice
    assert 1 <= grew("ernie_serve_time_per_output_token_seconds_count") <= 2  # choices of more than one token
    assert grew("ernie_serve_generated_tokens_total") == response.usage.completion_tokens > 0
    assert grew("ernie_serve_prompt_tokens_total") == response.usage.prompt_tokens > 0
    assert _value(after, "ernie_serve_kv_cache_budget_tokens") == LIMITS["kv_cache_tokens"]
    for gauge in ("queue_depth", "running", "kv_cache_used_tokens", "preemptions", "prefix_cache_reused_tokens"):
        assert f"ernie_serve_{gauge}" in after and _value(after, f"ernie_serve_{gauge}") >= 0
    assert grew("ernie_serve_decode_steps") > 0 and grew("ernie_serve_compiled_decode_steps") == 0  # not compiled
