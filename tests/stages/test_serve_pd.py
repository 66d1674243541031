"""Prefill/decode disaggregation: a request prefilled by one engine and decoded by another gets exactly
the tokens colocated serving gives (greedy, seeded sampling, images), the handoff travels through Ray's
object store, roles follow the load mix without losing requests, and a closed stream frees its rows."""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from dataclasses import replace

import pytest
import torch
from served_app import varied_model
from serving_requests import run_concurrently

from ernie import get_preset
from ernie.checkpoint import save_pretrained
from pipeline.formats import IMAGE_SETTINGS
from stages.data.tokenizer import train_tokenizer
from stages.serve.engine import Engine
from stages.serve.roles import DECODE, PREFILL, RoleSwitchPolicy, WorkerLoad, decide
from stages.serve.scheduler import SamplingParams, Scheduler

PRESET = "tiny_vl"  # a VL model serves text requests too: one model (and one set of workers) for every test
EOS = get_preset(PRESET).eos_token_id
BOUNDS = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
SAMPLED = [
    SamplingParams(max_tokens=20, temperature=1.0, seed=7),
    SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=20, seed=123),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A VL checkpoint with peaked logits (varied greedy text, no near-ties) and no end-of-sentence
    (greedy runs to max_tokens), its tokenizer and image settings, as the pipeline's artifacts hold them."""
    model = varied_model(PRESET, eos=False)
    path = tmp_path_factory.mktemp("pd_ckpt")
    save_pretrained(model, path)
    tokenizer = train_tokenizer(["how many red squares are there", "two", "three", "a blue circle"] * 30, 300)
    (path / "tokenizer").mkdir()
    tokenizer.save(str(path / "tokenizer" / "tokenizer.json"))
    (path / "images").mkdir()
    (path / IMAGE_SETTINGS).write_text(json.dumps(BOUNDS))
    return path


@pytest.fixture(scope="module")
def colocated(ckpt):
    """The reference: one engine in this process, on one torch thread as each worker is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.load(ckpt, ckpt / "tokenizer" / "tokenizer.json")
    yield engine
    engine.close()
    torch.set_num_threads(threads)


def prompts(n: int, seed: int, lengths: tuple[int, int] = (4, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(11, 300) for _ in range(rng.randrange(*lengths))] for _ in range(n)]


def image_request(engine) -> tuple[list[int], dict]:
    from stages.data.scenes import generate_scenes
    from stages.serve.images import image_bytes

    png = generate_scenes(1, random.Random(0))[0].png
    url = f"data:image/png;base64,{base64.b64encode(png).decode()}"
    return engine.images.apply([11, 12, engine.config.image_token_id, 13, 14], [(image_bytes(url, "x"), "x")])


def alone(engine, prompt: list[int], params: SamplingParams, vision: dict | None = None) -> list[int]:
    return list(engine.tokens(prompt, params, vision))


def concurrently(engine, requests: list[tuple]) -> list[list[int]]:
    """Every request from its own thread at once, through the engine's own API; the tokens each got."""
    return run_concurrently(engine, requests, lambda request: alone(engine, *request))


def wait_for(condition, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------- one engine, no Ray
def test_submit_prefilled_continues_exactly_as_submit(colocated, local_ray):
    """The handoff alone (the prompt's cache, first token, generator state), through Ray's object store and
    back, decodes to the same tokens as the request served whole; greedy, seeded and with an image."""
    import ray

    ids, vision = image_request(colocated)
    requests = [(p, GREEDY, None) for p in prompts(2, seed=0)] + [(ids, GREEDY, vision)]
    requests += [(p, params, None) for p, params in zip(prompts(2, seed=1), SAMPLED, strict=True)]
    scheduler = colocated.scheduler
    for prompt, params, vis in requests:
        whole = list(scheduler.submit(prompt, params, vis).tokens())
        prefilled = scheduler.submit_prefill(prompt, params, vis).result(timeout=30)
        assert prefilled.first_token == whole[0]
        assert prefilled.cache["keys"][0].shape[2] == len(prompt)  # trimmed to the prompt
        received = ray.get(ray.put(prefilled))
        assert received.arrays() and received.nbytes == prefilled.nbytes
        assert list(scheduler.submit_prefilled(received).tokens()) == whole
    # the same request through the engine's API: text of the handed-over decode equals the whole one
    prompt = prompts(1, seed=2)[0]
    handoff = colocated.prefill(prompt, 12, temperature=1.0, seed=5)
    tokens = list(scheduler.submit_prefilled(handoff).tokens())
    assert colocated.decode(tokens) == colocated.complete(prompt, 12, temperature=1.0, seed=5).text
    assert scheduler.stats.handed_off == scheduler.stats.taken_over == len(requests) + 1


def test_handed_over_requests_preempted_on_a_short_decode_pool_give_the_whole_requests_tokens(colocated):
    """A decode engine whose pool holds about one request at its longest takes over a text, an image and a seeded
    request at once: as they grow, the later ones are preempted and computed again from their tokens (the image one
    with the pixels its handoff carries), and each gives the tokens of the request served whole."""
    ids, vision = image_request(colocated)
    long_greedy = SamplingParams(max_tokens=60, temperature=0.0)
    requests = [(prompts(1, seed=3)[0], long_greedy, None), (ids, long_greedy, vision)]
    requests.append((prompts(1, seed=4)[0], SamplingParams(max_tokens=50, temperature=1.0, seed=9), None))
    whole = [alone(colocated, *r) for r in requests]
    handoffs = [colocated.scheduler.submit_prefill(*r).result(timeout=30) for r in requests]
    decoder = Scheduler(colocated.model, kv_cache_tokens=96, max_batch=8, block_tokens=8, prefix_caching=False)
    try:
        seqs = [decoder.submit_prefilled(h) for h in handoffs]
        assert [list(seq.tokens()) for seq in seqs] == whole
    finally:
        decoder.close()
    assert decoder.stats.preemptions >= 1 and decoder.stats.taken_over == len(requests)


def test_role_policy_wants_pressure_on_one_side_and_room_on_the_other():
    policy = RoleSwitchPolicy(min_dwell_s=5, prefill_high=3, prefill_low=1, decode_high=8, decode_low=4)

    def workers(*spec: tuple[str, int, int, float]) -> list[WorkerLoad]:
        return [WorkerLoad(i, role, since, p, d) for i, (role, p, d, since) in enumerate(spec)]

    prefill_heavy = workers((PREFILL, 6, 0, 0.0), (DECODE, 0, 2, 0.0), (DECODE, 0, 1, 0.0))
    worker, role, reason = decide(policy, prefill_heavy, 10.0, None, None)
    assert (worker.index, role) == (2, PREFILL) and "6 prefills in flight" in reason
    assert decide(policy, prefill_heavy, 4.0, None, None) is None  # dwell
    busy_decode = workers((PREFILL, 6, 0, 0.0), (DECODE, 0, 4, 0.0), (DECODE, 0, 4, 0.0))
    assert decide(policy, busy_decode, 10.0, None, None) is None  # 8 decodes do not fit one worker
    assert decide(policy, workers((PREFILL, 9, 0, 0.0), (DECODE, 0, 0, 0.0)), 10.0, None, None) is None  # last one
    decode_heavy = workers((PREFILL, 1, 0, 0.0), (PREFILL, 0, 0, 0.0), (DECODE, 0, 9, 0.0))
    worker, role, _ = decide(policy, decode_heavy, 10.0, None, None)
    assert (worker.index, role) == (1, DECODE)
    # hysteresis: right after that switch neither side is pressed
    after = workers((PREFILL, 1, 0, 0.0), (DECODE, 0, 0, 10.0), (DECODE, 0, 9, 0.0))
    assert decide(policy, after, 100.0, None, None) is None
    slow = replace(policy, ttft_slo_s=0.5, tpot_slo_s=0.1)
    worker, role, reason = decide(
        slow, workers((PREFILL, 1, 0, 0.0), (DECODE, 0, 1, 0.0), (DECODE, 0, 0, 0.0)), 9, 2.0, 0.01
    )
    assert role == PREFILL and "TTFT 2.000s over its SLO" in reason
    with pytest.raises(ValueError, match="prefill_low < prefill_high"):
        RoleSwitchPolicy(prefill_low=4, prefill_high=4)


# ---------------------------------------------------------------------- PD workers on Ray
def test_serve_pd_bench_smoke_compares_pd_and_colocated_on_each_mix(local_ray, tmp_path):
    """bench/serve_pd.py on this module's Ray (before the `pd` fixture's workers hold its CPUs)."""
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    threads = torch.get_num_threads()
    try:
        import serve_pd

        report = serve_pd.main(["--smoke", "--out", str(tmp_path / "serve_pd.json")])
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(bench))
    records = {(r["mix"], r["impl"]): r for r in report["records"]}
    assert set(records) == {
        (mix, impl) for mix in ("prefill-heavy", "decode-heavy", "mixed") for impl in ("colocated", "pd")
    }
    for mix in ("prefill-heavy", "decode-heavy", "mixed"):
        colocated, pd = records[mix, "colocated"], records[mix, "pd"]
        assert colocated["tokens"] == pd["tokens"] > 0 and pd["same_tokens_as_colocated"] == 1.0  # fp32 greedy
        assert all(r["ttft_ms"]["p99"] > 0 and r["tpot_ms"]["p50"] > 0 for r in (colocated, pd))
    assert json.loads((tmp_path / "serve_pd.json").read_text())["records"] == report["records"]


@pytest.fixture(scope="module")
def pd(ckpt, local_ray):
    from stages.serve.pd import PDEngine

    engine = PDEngine(
        ckpt,
        ckpt / "tokenizer" / "tokenizer.json",
        workers=3,
        prefill_workers=1,
        worker_cpus=1,
        policy=RoleSwitchPolicy(enabled=False, interval_s=0.05),
    )
    yield engine
    engine.close()


def test_pd_gives_colocated_tokens_greedy_batched_and_seeded(pd, colocated):
    requests = [(p, GREEDY, None) for p in prompts(6, seed=3)]
    requests += [(p, params, None) for p, params in zip(prompts(2, seed=4), SAMPLED, strict=True)]
    expected = [alone(colocated, *r) for r in requests]
    assert concurrently(pd, requests) == expected
    loads = pd.worker_loads()
    assert max(loads[i]["max_batch_seen"] for i, role in enumerate(pd.roles) if role == DECODE) > 1
    assert sum(load["handed_off"] for load in loads) == sum(load["taken_over"] for load in loads) == len(requests)
    # and through the API the app uses: text, counts, stop strings
    prompt = requests[0][0]
    whole = colocated.complete(prompt, 24, temperature=0.0)
    assert pd.complete(prompt, 24, temperature=0.0) == whole
    stop = whole.text[len(whole.text) // 2 :][:2]
    assert pd.complete(prompt, 24, temperature=0.0, stop=[stop]) == colocated.complete(
        prompt, 24, temperature=0.0, stop=[stop]
    )
    assert pd.complete(prompt, 1, temperature=0.0).completion_tokens == 1  # the prefill alone answers it


def test_pd_image_request_gives_colocated_tokens(pd, colocated):
    ids, vision = image_request(pd)
    assert pd.config.image_token_id in ids
    requests = [(ids, GREEDY, vision), (ids, SAMPLED[0], vision), (prompts(1, seed=5)[0], GREEDY, None)]
    assert concurrently(pd, requests) == [alone(colocated, *r) for r in requests]


def test_a_prefix_the_prefill_worker_cached_is_counted_in_the_usage(pd, colocated):
    """The prefill worker's prefix cache serves a repeated prompt; the router reports it as the request's cached
    prompt tokens, and the text is colocated serving's."""
    prompt = prompts(1, seed=8, lengths=(40, 41))[0]
    first = pd.complete(prompt, 6, temperature=0.0)
    again = pd.complete(prompt, 6, temperature=0.0)
    assert again.cached_tokens == 32 and again.text == first.text == colocated.complete(prompt, 6, temperature=0.0).text


def test_a_repeated_prompt_goes_to_the_prefill_worker_holding_its_prefix(ckpt, colocated, local_ray):
    """With two prefill workers, each with its own prefix cache, a prompt goes by its first block to the same one:
    its repeats find their prefix cached (least-loaded routing alone would alternate between idle workers)."""
    from stages.serve.pd import AFFINITY_SLACK, PDEngine
    from stages.serve.roles import PREFILL

    engine = PDEngine(
        ckpt,
        ckpt / "tokenizer" / "tokenizer.json",
        workers=3,
        prefill_workers=2,
        worker_cpus=0.25,  # beside the module's PD engine (3 CPUs) on the module's 4-CPU Ray
        policy=RoleSwitchPolicy(enabled=False),
    )
    try:
        prompt = prompts(1, seed=9, lengths=(40, 41))[0]
        # the routing alone, with prefills held in flight: the prompt's worker until it has AFFINITY_SLACK more
        held = [engine._acquire(PREFILL, prompt) for _ in range(AFFINITY_SLACK + 2)]
        own, other = held[0], next(w for w in engine._workers if w.role == PREFILL and w is not held[0])
        assert held[: AFFINITY_SLACK + 1] == [own] * (AFFINITY_SLACK + 1) and held[-1] is other
        short = engine._acquire(PREFILL, prompt[:5])  # less than a block: no preference, the least loaded
        assert short is other
        for worker in [*held, short]:
            engine._release(worker, PREFILL)
        done = [engine.complete(prompt, 4, temperature=0.0) for _ in range(3)]
        assert [d.cached_tokens for d in done] == [0, 32, 32]
        assert {d.text for d in done} == {colocated.complete(prompt, 4, temperature=0.0).text}
    finally:
        engine.close()


def test_handoff_goes_through_the_object_store(pd):
    import ray

    from stages.serve.scheduler import Prefilled

    prefill = pd._actors[pd.roles.index(PREFILL)]
    head = ray.get(prefill.prefill.remote(prompts(1, seed=6)[0], GREEDY, None))
    (ref,) = head.handoff
    assert isinstance(ref, ray.ObjectRef)  # the router holds a reference, not the K/V
    fetched = ray.get(ref)
    assert isinstance(fetched, Prefilled) and fetched.nbytes == head.nbytes > 0
    assert not any(a.flags.writeable for a in fetched.arrays())  # views of shared memory: zero-copy
    pd.complete(prompts(1, seed=6)[0], 8, temperature=0.0)  # a handoff the decode worker takes (whatever ran before)
    logs = [entry for log in pd.transport_logs() for entry in log]
    assert logs and all(entry["object_ref"] and entry["zero_copy"] for entry in logs)


def test_roles_follow_the_load_mix_and_no_request_is_lost(pd, colocated):
    """Long prompts with short answers turn a decode worker to prefill; long answers with short prompts
    turn one back. Every request of both floods completes with its colocated tokens."""
    for i, role in enumerate([PREFILL, DECODE, DECODE]):
        pd.set_role(i, role)
    before = len(pd.role_switches)
    heavy_prefill = [(p, SamplingParams(max_tokens=3, temperature=0.0), None) for p in prompts(4, 7, (300, 400))]
    heavy_decode = [(p, SamplingParams(max_tokens=40, temperature=0.0), None) for p in prompts(4, 8, (3, 6))]
    expected = {id(r): alone(colocated, *r) for r in heavy_prefill + heavy_decode}
    policy = RoleSwitchPolicy(
        interval_s=0.05, min_dwell_s=0.3, prefill_high=3, prefill_low=1, decode_high=4, decode_low=2
    )
    sent: list[tuple] = []
    results: list[tuple[tuple, list[int] | Exception]] = []

    def flood(requests: list[tuple], switched_to: str) -> None:
        """8 clients in a closed loop until the controller moves a worker to `switched_to`; the policy
        is off while they drain, so the roles stay as the flood left them."""
        stop = threading.Event()

        def client(k: int) -> None:
            n = k
            while not stop.is_set():
                request = requests[n % len(requests)]
                sent.append(request)
                try:
                    results.append((request, alone(pd, *request)))
                except Exception as err:  # noqa: BLE001 - a lost request fails the test below
                    results.append((request, err))
                n += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        pd.policy = policy
        try:
            wait_for(lambda: any(s.to_role == switched_to for s in pd.role_switches[before:]), 40, switched_to)
        finally:
            pd.policy = replace(policy, enabled=False)
            stop.set()
            for t in threads:
                t.join(timeout=60)

    flood(heavy_prefill, PREFILL)
    assert pd.roles.count(PREFILL) == 2
    flood(heavy_decode, DECODE)
    assert pd.roles.count(DECODE) == 2
    switches = pd.role_switches[before:]
    assert [s.to_role for s in switches[:1]] == [PREFILL] and DECODE in [s.to_role for s in switches]
    assert all(s.from_role != s.to_role and "in flight" in s.reason for s in switches)
    assert len(results) == len(sent) >= 2 and all(tokens == expected[id(request)] for request, tokens in results)
    stats = pd.stats()
    assert stats["switches_to"][PREFILL] >= 1 and stats["switches_to"][DECODE] >= 1
    assert stats["in_flight"] == {PREFILL: 0, DECODE: 0}


def test_closing_a_stream_frees_the_decode_rows(pd, colocated):
    prompt = prompts(1, seed=9)[0]
    deltas = pd.stream(prompt, max_tokens=2000, temperature=0.0)
    next(deltas)
    next(deltas)
    wait_for(lambda: sum(load["running"] for load in pd.worker_loads()) == 1, what="the stream to decode")
    deltas.close()  # what a client disconnect does to the app's generator
    wait_for(lambda: sum(load["running"] for load in pd.worker_loads()) == 0, what="the rows to be freed")
    assert pd.stats()["in_flight"][DECODE] == 0
    # the worker serves on
    assert alone(pd, prompt, GREEDY) == alone(colocated, prompt, GREEDY)


def test_the_served_app_in_pd_mode_answers_as_colocated_and_reports_roles(ckpt, colocated, pd):
    """serve.mode=pd through the real HTTP app: a routing replica over two workers gives the colocated
    engine's greedy text, and /metrics shows the workers per role (alongside the module's own PD engine)."""
    import requests as http
    import served_app

    from pipeline.contract import Resources
    from stages.serve.roles import PDSettings

    prompt = "how many red squares"
    expected = colocated.complete(colocated.encode(prompt), 12, temperature=0.0).text
    pd_settings = PDSettings(workers=2, worker_cpus=0.25, roles=RoleSwitchPolicy(enabled=False))
    settings = dict(mode="pd", pd=pd_settings, replica_cpus=0.1, resources=Resources(num_cpus=0))
    with served_app.served(ckpt, "ernie-pd", "ernie-pd", **settings) as (_cfg, url):
        body = {"model": "ernie-pd", "prompt": prompt, "max_tokens": 12, "temperature": 0.0}
        answer = http.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["text"] == expected
        metrics = http.get(f"{url}/metrics", timeout=30).text
    assert 'ernie_serve_pd_workers{role="prefill"} 1.0' in metrics
    assert 'ernie_serve_pd_workers{role="decode"} 1.0' in metrics
    assert 'ernie_serve_requests_total{role="router",route="/v1/completions",status="200"} 1.0' in metrics
