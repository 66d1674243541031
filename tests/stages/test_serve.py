"""The serve stage: a Ray Serve OpenAI-compatible app, exercised over real HTTP with the openai client."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import openai
import pytest
import tiny_artifacts
import torch

import stages.serve as serve_stage
from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import render
from pipeline.contract import UserError
from pipeline.formats import load_tokenizer
from stages.serve.engine import Engine, split_reasoning


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return tiny_artifacts.build(tmp_path_factory.getbasetemp() / "tiny_artifacts")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage_deploys_smoke_tests_over_http_and_frees_the_port(artifacts, local_ray, tmp_path):
    port = free_port()
    cfg = serve_stage.Config(port=port, model_name="tiny-test", smoke_requests=3, smoke_max_tokens=8)
    inputs = {"model": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    ctx = tiny_artifacts.context("serve", cfg, inputs, tmp_path)
    result = serve_stage.run(ctx)
    endpoint = json.loads((tmp_path / "endpoint.json").read_text())
    assert endpoint["url"] == f"http://127.0.0.1:{port}/v1"
    assert endpoint["model"] == "tiny-test" and endpoint["quantized"] is False
    assert endpoint["deployment"]["num_replicas"] == 1
    smoke = endpoint["smoke"]
    assert smoke["completion"]["object"] == "text_completion"
    assert smoke["chat"]["choices"][0]["message"]["role"] == "assistant"
    assert len(smoke["latency_ms"]) == 3 and all(ms > 0 for ms in smoke["latency_ms"])
    assert result.metrics["latency_ms_p50"] > 0 and ctx.log.last("latency_ms_p50") == result.metrics["latency_ms_p50"]
    assert serve_stage.port_is_free("127.0.0.1", port)  # block=false: the app and Serve's proxy are gone
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)


def test_bad_serve_settings_and_a_busy_port_are_user_errors(artifacts, local_ray, tmp_path):
    with pytest.raises(UserError, match="serve.port=0"):
        serve_stage.validate(serve_stage.Config(port=0))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = serve_stage.Config(port=busy.getsockname()[1])
        with pytest.raises(UserError, match=f"serve.port={cfg.port} is already in use"):
            serve_stage.start(artifacts["ckpt"], artifacts["dataset"] / "tokenizer" / "tokenizer.json", cfg, "x")


@pytest.fixture(scope="module")
def endpoint(artifacts, local_ray, tmp_path_factory):
    """The quantized model served on a free port: (openai client, tokenizer, base url)."""
    import stages.quantize as quantize

    qdir = tmp_path_factory.mktemp("served_qckpt")
    inputs = {"ckpt": ("ckpt", artifacts["ckpt"]), "dataset": ("dataset", artifacts["dataset"])}
    quantize.run(tiny_artifacts.context("quantize", quantize.Config(), inputs, qdir))
    cfg = serve_stage.Config(port=free_port(), model_name="ernie-test", max_tokens=6)
    tokenizer_path = serve_stage.find_tokenizer(qdir, artifacts["dataset"])
    url = serve_stage.start(qdir, tokenizer_path, cfg, cfg.model_name)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    yield client, load_tokenizer(artifacts["dataset"]), url
    serve_stage.stop(cfg)
    assert serve_stage.port_is_free(cfg.host, cfg.port)


def test_models_lists_the_served_model(endpoint):
    client, _, _ = endpoint
    models = client.models.list()
    assert [m.id for m in models.data] == ["ernie-test"]


def test_completion_response_schema_and_usage(endpoint):
    client, tokenizer, _ = endpoint
    prompt = "3+4="
    response = client.completions.create(model="ernie-test", prompt=prompt, max_tokens=5, temperature=0)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.model == "ernie-test" and response.created > 0
    choice = response.choices[0]
    assert choice.index == 0 and isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert 1 <= response.usage.completion_tokens <= 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    # a one-token budget ends by length unless that token is the end of sentence
    one = client.completions.create(model="ernie-test", prompt="User: reverse", max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1
    assert one.choices[0].finish_reason == ("stop" if one.choices[0].text == "" else "length")


def test_greedy_is_deterministic_and_seeded_sampling_repeats(endpoint):
    client, _, _ = endpoint
    kw = dict(model="ernie-test", prompt=["1+1=", "reverse cat"], max_tokens=6)
    greedy = [client.completions.create(**kw, temperature=0).choices for _ in range(2)]
    assert [c.text for c in greedy[0]] == [c.text for c in greedy[1]] and len(greedy[0]) == 2
    sampled = [client.completions.create(**kw, temperature=1.0, top_p=0.9, seed=7).choices for _ in range(2)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]


def test_chat_completion_uses_the_chat_template(endpoint):
    client, tokenizer, _ = endpoint
    messages = [{"role": "user", "content": "2+2="}]
    response = client.chat.completions.create(model="ernie-test", messages=messages, max_tokens=6, temperature=0)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    message = response.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    assert response.choices[0].finish_reason in ("stop", "length")
    prompt = render(messages, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    thinking = client.chat.completions.create(
        model="ernie-test", messages=messages, max_tokens=4, temperature=0, extra_body={"enable_thinking": True}
    )
    prompt = render(messages, add_generation_prompt=True, enable_thinking=True)
    assert thinking.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert thinking.usage.prompt_tokens < response.usage.prompt_tokens  # an open think block, not an empty one


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": 5}, "temperature"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "system", "content": "late"}]},
            "messages",
        ),
    ],
)
def test_bad_requests_get_400_with_an_openai_error_body(endpoint, path, body, param):
    _, _, url = endpoint
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
    error = json.loads(err.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_the_openai_client_sees_400_and_404_as_its_own_errors(endpoint):
    client, _, _ = endpoint
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="ernie-test", prompt="x", max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


# ---------------------------------------------------------------------- the engine alone (no Ray)
@pytest.fixture(scope="module")
def engine(artifacts):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_moe").replace(vocab_size=tiny_artifacts.VOCAB))
    return Engine(model, load_tokenizer(artifacts["dataset"]))


def test_engine_stops_at_a_stop_string_and_counts_what_it_generated(engine):
    prompt = engine.encode("1+2=")
    sample = dict(temperature=1.0, seed=3)  # seeded sampling: a varied but repeatable text
    free = engine.complete(prompt, max_tokens=12, **sample)
    assert free.finish_reason == "length" and free.completion_tokens == 12  # a random model never says EOS here
    stop = next(ch for i, ch in enumerate(free.text) if i >= 2 and ch not in free.text[:i])
    cut = engine.complete(prompt, max_tokens=12, stop=[stop, "never-there"], **sample)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.completion_tokens < 12 and cut.prompt_tokens == len(prompt)


def test_engine_refuses_a_request_beyond_the_context(engine):
    from stages.serve.engine import RequestError

    with pytest.raises(RequestError, match="exceeds the model's context"):
        engine.complete([5] * 10, max_tokens=engine.config.max_position_embeddings)


def test_reasoning_is_split_at_the_think_close():
    assert split_reasoning("step one\n</think>\n\n42") == ("step one", "42")
    assert split_reasoning("still thinking") == ("still thinking", "")


def _streamed(chunks) -> tuple[str, list, object]:
    """(the text of a completions stream, its finish reasons, the usage of its last chunk)."""
    text, reasons, used = "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.text
            reasons.append(choice.finish_reason)
        used = chunk.usage or used
    return text, [r for r in reasons if r], used


def test_streamed_completion_adds_up_to_the_whole_one(endpoint):
    client, _, _ = endpoint
    for kw in ({"prompt": "1+1=", "max_tokens": 6}, {"prompt": "reverse cat", "max_tokens": 6, "stop": ["a"]}):
        whole = client.completions.create(model="ernie-test", temperature=0, **kw)
        chunks = list(
            client.completions.create(
                model="ernie-test", temperature=0, stream=True, stream_options={"include_usage": True}, **kw
            )
        )
        text, reasons, used = _streamed(chunks)
        assert text == whole.choices[0].text and reasons == [whole.choices[0].finish_reason]
        assert used.prompt_tokens == whole.usage.prompt_tokens
        assert used.completion_tokens == whole.usage.completion_tokens
        assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_streamed_chat_splits_reasoning_from_the_answer_as_the_whole_reply_does(endpoint):
    client, _, _ = endpoint
    messages = [{"role": "user", "content": "2+2="}]
    for thinking in (False, True):
        kw = dict(model="ernie-test", messages=messages, max_tokens=8, temperature=0)
        kw["extra_body"] = {"chat_template_kwargs": {"enable_thinking": thinking}}
        whole = client.chat.completions.create(**kw).choices[0]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
        assert content.strip() == whole.message.content
        assert reasoning.strip() == (getattr(whole.message, "reasoning_content", None) or "")
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [whole.finish_reason]
        assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_a_stream_that_cannot_be_served_is_refused_before_it_starts(endpoint):
    client, _, _ = endpoint
    with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
        client.completions.create(model="ernie-test", prompt="hi", max_tokens=10**5, stream=True)


def test_stream_holds_back_text_that_may_begin_a_stop_string():
    from stages.serve.engine import _held_back

    assert _held_back("abc ST", ["STOP"]) == 2 and _held_back("abc", ["STOP"]) == 0
    assert _held_back("ab\ufffd", []) == 1
