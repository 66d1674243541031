"""serve: an OpenAI-compatible Ray Serve app for the final (quantized) model.

    python -m pipeline run conf=tiny stages=[serve]     # deploy, smoke-test over HTTP, shut down
    python -m pipeline serve conf=tiny                  # serve until Ctrl-C (serve_forever)

    curl http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
         -d '{"model": "ernie-tiny", "messages": [{"role": "user", "content": "2+3="}]}'
    # with serve.api_key (or $ERNIE_SERVE_API_KEY) set: -H "Authorization: Bearer $ERNIE_SERVE_API_KEY"

Inputs: `model` (a qckpt, or a ckpt: told apart by quant_config.json) and `dataset` (its
tokenizer, when the model dir carries none). Output (endpoint): `endpoint.json` with the URL,
model name, deployment config and the smoke test (responses and latencies) sent through the
real HTTP endpoint with the `openai` client.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.contract import Request, Resources, StageContext, StageResult, UserError, check_fits
from pipeline.formats import TOKENIZER_FILE

from .roles import PDSettings
from .vllm_backend import VLLMSettings, engines, gpus_per_engine, validate_settings

INPUTS = {"model": "qckpt", "dataset": "dataset"}
"""`model` may be a qckpt or a ckpt (ACCEPTED_KINDS)."""
ACCEPTED_KINDS = {"model": ("qckpt", "ckpt"), "dataset": ("dataset",)}
OUTPUT_KIND = "endpoint"
DEFAULT_MODEL_NAME = "ernie-tiny"
BACKENDS = ("engine", "vllm")
MODES = ("colocated", "pd")
MASKED = "***"
"""What endpoint.json records for a set API key (as pipeline.redact masks secrets)."""
API_KEY_ENV = "ERNIE_SERVE_API_KEY"
"""Where the API key comes from when serve.api_key is empty: a key kept out of config files."""


@dataclass
class Config:
    host: str = "127.0.0.1"
    """Interface the Ray Serve HTTP proxy listens on."""
    port: int = 8000
    """Port of the HTTP proxy; the API is at http://host:port/v1."""
    model_name: str = ""
    """Name clients put in `model`; empty: "ernie-tiny" (a preset sets its own, e.g. ernie-${name})."""
    app_name: str = "ernie"
    """Ray Serve application name (serve.run / serve.delete)."""
    num_replicas: int = 1
    """Model replicas; each holds a full copy of the model."""
    replica_cpus: float = 1.0
    """CPUs reserved per replica (torch threads follow Ray's OMP_NUM_THREADS)."""
    replica_gpus: float = 0.0
    """GPUs reserved per replica."""
    max_tokens: int = 64
    """Completion length when a request gives no max_tokens."""
    kv_cache_tokens: int = 65536
    """KV cache budget of a replica, in token slots: a pool of blocks of kv_block_tokens slots (rounded up to whole
    blocks), allocated when the replica starts. A request is admitted when the blocks it may hold at its longest
    (prompt + max_tokens) are free beside the running requests', else it waits in the queue; one whose prompt plus
    max_tokens exceeds the budget alone gets a 400. Memory per slot: 2 x layers x kv_heads x head_dim x bytes per
    value (0.3B in bf16: 18 KiB)."""
    kv_block_tokens: int = 16
    """Token slots per KV block (paged cache): a request holds whole blocks, so up to this many slots less one
    go unused per request."""
    prefill_chunk_tokens: int = 512
    """Prompt tokens one forward takes beside the decoding requests' tokens (chunked prefill): a longer prompt
    runs over several steps, so one long prompt stalls the running requests for at most this many tokens' work."""
    compile_decode: bool = False
    """Compile the decode step (`ernie.compiled_decode`: one torch.compile graph over every layer; CUDA graphs
    on a GPU) when the replica starts, and run steps without a prompt in them through it. On a CPU a model with
    linears as large as pack_weights packs is compiled with inductor's freezing (a second copy of the weights,
    packed in the graph). Compiling took 4-28 s on a 2-core CPU; there it speeds up small models' steps, and on
    the 0.3B shape it stays behind the packed eager engine (docs/benchmarks.md). Not measured on a GPU yet."""
    prompt_wait_steps: int = 0
    """With compile_decode: a prompt that arrives while requests decode waits up to this many decode steps for
    later prompts to run with it, so that prompts arriving one after another share one paged forward and the steps
    between stay compiled ones (a step with a prompt in it runs the paged forward). It adds up to this many steps
    to the prompt's time to first token; a prompt runs at once when nothing decodes. 0: a prompt joins the next
    step."""
    pack_weights: bool = True
    """On a CPU, reorder the decoder's linear weights for oneDNN once when the replica loads the model
    (`ernie.packed_linear`: fp32 and bf16 weights large enough to gain, not quantized layers or the vision
    encoder). The same products; per matmul 1.3-3.4x faster at 8-32 rows on a 2-core AMD EPYC
    (docs/benchmarks.md). A tied LM head then holds its weight a second time (the embedding keeps the first).
    Not with compile_decode: its graph packs its own copy (freezing), the eager forward then runs unpacked."""
    max_batch: int = 64
    """Most requests a replica decodes together (continuous batching); more wait in the queue. Each
    replica also takes this many HTTP requests at once (Ray Serve's max_ongoing_requests)."""
    prefix_caching: bool = True
    """Text requests share the KV blocks of a prefix computed before (a system prompt, earlier chat turns; matched
    in whole kv_block_tokens blocks) and compute only the rest. Cached blocks live in the pool's free room and are
    evicted, least recently released first, when requests need it: no memory of their own."""
    max_queued_requests: int = 256
    """Requests each HTTP proxy holds waiting for a free replica slot (beyond max_batch per replica); more get an
    HTTP 503 at once (Ray Serve's back pressure), so a flood cannot grow the server's memory without bound.
    -1: no bound."""
    api_key: str = ""
    """Bearer token every route but /health asks for (401 without it); empty: $ERNIE_SERVE_API_KEY, and
    when that is unset too the API is open. Masked in MLflow params and endpoint.json."""
    max_n: int = 8
    """Most choices (`n`) one request may ask for per prompt; more get a 400."""
    max_request_bytes: int = 8 * 1024 * 1024
    """Largest request body taken (images come inline, base64); larger ones get a 413 before parsing."""
    max_tokens_limit: int = 4096
    """Most tokens a request may ask to generate per choice (max_tokens); more get a 400."""
    smoke_requests: int = 5
    """Completion requests timed by the smoke test (latency percentiles)."""
    smoke_prompt: str = "1+2="
    """Prompt of the smoke test's chat and completion requests."""
    smoke_max_tokens: int = 16
    """max_tokens of the smoke test's requests."""
    ready_timeout_s: float = 120.0
    """How long to wait for the endpoint to answer after deployment."""
    block: bool = False
    """Keep serving after the smoke test until interrupted (Ctrl-C); else shut the app down."""
    mode: str = "colocated"
    """colocated: each replica prefills and decodes its own requests; pd: prefill/decode disaggregation, one replica
    routing to `pd.workers` worker actors, some prefilling, the rest decoding, the prompt's KV cache handed over
    through Ray's object store, roles switched as the load mix changes (docs/serving.md)."""
    pd: PDSettings = field(default_factory=PDSettings)
    """mode=pd: the workers, their resources and the role-switching policy."""
    backend: str = "engine"
    """engine: our own engine on Ray Serve (CPU or GPU, bf16 and our packed 4/2-bit weights); vllm: Ray Serve LLM
    over vLLM on the quantize stage's export (GPU clusters only, docs/serving_vllm.md)."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """backend=vllm: parallelism, prefill/decode disaggregation and its KV connector, checked by a preflight."""
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.5))
    """What the stage's own Ray actor asks for (the replicas ask for replica_cpus each)."""

    def fingerprint(self) -> dict:
        """What the cache key hashes: everything but the API key (a hash of a secret is not printed in keys)."""
        return {k: v for k, v in asdict(self).items() if k != "api_key"}

    def requested(self) -> Request:
        """The stage actor plus the replicas (backend=vllm: its engines' GPUs)."""
        r, n = self.resources, self.num_replicas
        if self.mode == "pd":
            w = self.pd
            return Request(
                cpus=r.num_cpus + self.replica_cpus + w.workers * w.worker_cpus,
                gpus=r.num_gpus + w.workers * w.worker_gpus,
                terms=f"resources.num_cpus={r.num_cpus:g} + replica_cpus={self.replica_cpus:g} + pd.workers="
                f"{w.workers} x (worker_cpus={w.worker_cpus:g}, worker_gpus={w.worker_gpus:g})",
            )
        if self.backend == "vllm":
            gpus = engines(self.vllm) * gpus_per_engine(self.vllm, self.vllm.tensor_parallel_size or 1)
            return Request(
                cpus=r.num_cpus,
                gpus=r.num_gpus + gpus,
                terms=f"resources.num_cpus={r.num_cpus:g}, num_gpus={r.num_gpus:g} + {gpus} GPUs of the vLLM engines",
            )
        return Request(
            cpus=r.num_cpus + n * self.replica_cpus,
            gpus=r.num_gpus + n * self.replica_gpus,
            terms=f"resources.num_cpus={r.num_cpus:g}, num_gpus={r.num_gpus:g} + num_replicas={n} x "
            f"(replica_cpus={self.replica_cpus:g}, replica_gpus={self.replica_gpus:g})",
        )


def validate(cfg: Config) -> None:
    checks = [
        (0 < cfg.port < 65536, "port", cfg.port, "must be a TCP port (1-65535)"),
        (cfg.num_replicas >= 1, "num_replicas", cfg.num_replicas, "must be at least 1"),
        (cfg.max_tokens >= 1, "max_tokens", cfg.max_tokens, "must be at least 1"),
        (cfg.max_batch >= 1, "max_batch", cfg.max_batch, "must be at least 1"),
        (cfg.kv_block_tokens >= 1, "kv_block_tokens", cfg.kv_block_tokens, "must be at least 1"),
        (cfg.prefill_chunk_tokens >= 1, "prefill_chunk_tokens", cfg.prefill_chunk_tokens, "must be at least 1"),
        (cfg.prompt_wait_steps >= 0, "prompt_wait_steps", cfg.prompt_wait_steps, "must be at least 0"),
        (cfg.max_n >= 1, "max_n", cfg.max_n, "must be at least 1"),
        (
            cfg.max_queued_requests == -1 or cfg.max_queued_requests >= 1,
            "max_queued_requests",
            cfg.max_queued_requests,
            "must be at least 1, or -1 for no bound",
        ),
        (cfg.max_request_bytes >= 1024, "max_request_bytes", cfg.max_request_bytes, "must be at least 1024"),
        (
            cfg.max_tokens_limit >= max(cfg.max_tokens, cfg.smoke_max_tokens),
            "max_tokens_limit",
            cfg.max_tokens_limit,
            f"must be at least max_tokens and smoke_max_tokens ({max(cfg.max_tokens, cfg.smoke_max_tokens)}): the "
            "server's own defaults must pass it",
        ),
        (
            cfg.kv_cache_tokens > max(cfg.max_tokens, cfg.smoke_max_tokens),
            "kv_cache_tokens",
            cfg.kv_cache_tokens,
            f"must exceed max_tokens and smoke_max_tokens ({max(cfg.max_tokens, cfg.smoke_max_tokens)}): a request "
            "needs room for its prompt and its completion",
        ),
        (cfg.smoke_requests >= 1, "smoke_requests", cfg.smoke_requests, "must be at least 1"),
        (cfg.smoke_max_tokens >= 1, "smoke_max_tokens", cfg.smoke_max_tokens, "must be at least 1"),
        (cfg.replica_cpus >= 0 and cfg.replica_gpus >= 0, "replica_cpus", cfg.replica_cpus, "must be >= 0"),
        (bool(cfg.app_name), "app_name", cfg.app_name, "must not be empty"),
    ]
    for ok, key, value, rule in checks:
        if not ok:
            raise UserError(f"serve.{key}={value!r} {rule}")
    if cfg.mode not in MODES:
        raise UserError(f"serve.mode={cfg.mode!r} is not a mode; available: {', '.join(MODES)}")
    if cfg.mode == "pd":
        if not 1 <= cfg.pd.prefill_workers < cfg.pd.workers:
            raise UserError(
                f"serve.pd.prefill_workers={cfg.pd.prefill_workers} of serve.pd.workers={cfg.pd.workers}: each role "
                "needs at least one worker"
            )
        if cfg.num_replicas != 1 or cfg.backend != "engine":
            raise UserError(
                f"serve.mode=pd runs one routing replica over its own workers (serve.pd.workers) on the engine "
                f"backend: set serve.num_replicas=1 (got {cfg.num_replicas}) and serve.backend=engine "
                f"(got {cfg.backend!r})"
            )
    if cfg.backend not in BACKENDS:
        raise UserError(f"serve.backend={cfg.backend!r} is not a backend; available: {', '.join(BACKENDS)}")
    if cfg.backend == "vllm":
        validate_settings(cfg.vllm)
        if api_key(cfg):
            raise UserError(
                f"serve.api_key / ${API_KEY_ENV} is not enforced with serve.backend=vllm (Ray Serve LLM's ingress "
                "checks no key); unset it or put an authenticating proxy in front"
            )


def find_tokenizer(*dirs: Path | None) -> Path:
    """tokenizer.json from the model dir's tokenizer/, else the dataset's (or a dir holding it)."""
    for d in dirs:
        if d is None:
            continue
        for candidate in (Path(d) / TOKENIZER_FILE, Path(d) / "tokenizer.json", Path(d)):
            if candidate.is_file():
                return candidate
    raise UserError(f"no tokenizer.json in {', '.join(str(d) for d in dirs if d)} (looked in tokenizer/ and the dir)")


def served_name(cfg: Config) -> str:
    """The model name of the API: the same for the stage and `serve_forever`."""
    return cfg.model_name or DEFAULT_MODEL_NAME


def api_key(cfg: Config) -> str:
    """The key clients must send: serve.api_key, else $ERNIE_SERVE_API_KEY; empty: no auth."""
    return cfg.api_key or os.environ.get(API_KEY_ENV, "")


def recorded_config(cfg: Config) -> dict:
    """The config as endpoint.json records it: the API key masked (whether one is set stays visible)."""
    record = {k: v for k, v in asdict(cfg).items() if k != "resources"}
    record["api_key"] = MASKED if api_key(cfg) else ""
    return record


# ---------------------------------------------------------------------- deploy / stop
def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(model_dir: Path, tokenizer_path: Path, cfg: Config, model_name: str) -> str:
    """Start Serve's HTTP proxy (if Serve is not running yet), deploy the app, wait until it
    answers; returns the base URL (http://host:port)."""
    import ray
    from ray import serve

    from .app import OpenAIServer
    from .metrics_hub import start_hub

    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS when set, else a local Ray
    if cfg.backend == "vllm":
        from .vllm_backend import deploy

        url = deploy(cfg.vllm, model_dir, model_name, cfg.host, cfg.port, cfg.app_name)  # preflight first
        _wait_ready(f"{url}/v1/models", cfg.ready_timeout_s)
        return url
    check_fits(cfg.requested(), ray.cluster_resources(), "serve")
    serve_running = bool(serve.status().proxies)
    if not serve_running and not port_is_free(cfg.host, cfg.port):
        raise UserError(f"serve.port={cfg.port} is already in use on {cfg.host}; pick another with serve.port=...")
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    actor_options = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}
    deployment = OpenAIServer.options(
        num_replicas=cfg.num_replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=cfg.max_batch,
        max_queued_requests=cfg.max_queued_requests,
    )
    scheduling: dict = {
        "kv_cache_tokens": cfg.kv_cache_tokens,
        "max_batch": cfg.max_batch,
        "prefix_caching": cfg.prefix_caching,
        "kv_block_tokens": cfg.kv_block_tokens,
        "prefill_chunk_tokens": cfg.prefill_chunk_tokens,
        "compile_decode": cfg.compile_decode,
        "pack_weights": cfg.pack_weights,
        "prompt_wait_steps": cfg.prompt_wait_steps,
    }
    if cfg.mode == "pd":
        w = cfg.pd
        scheduling["pd"] = {
            "workers": w.workers,
            "prefill_workers": w.prefill_workers,
            "worker_cpus": w.worker_cpus,
            "worker_gpus": w.worker_gpus,
            "policy": w.roles,
        }
    limits = {
        "api_key": api_key(cfg),
        "max_n": cfg.max_n,
        "max_request_bytes": cfg.max_request_bytes,
        "max_tokens_limit": cfg.max_tokens_limit,
    }
    start_hub(cfg.app_name)  # the replicas' /metrics summed (stages/serve/metrics_hub.py)
    app = deployment.bind(
        str(model_dir), str(tokenizer_path), model_name, cfg.max_tokens, scheduling, limits, cfg.app_name
    )
    serve.run(app, name=cfg.app_name, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    _wait_ready(f"{url}/v1/models", cfg.ready_timeout_s, api_key(cfg))
    return url


def stop(cfg: Config, timeout_s: float = 30.0) -> None:
    """Delete our app; shut Serve down (freeing the port) when no other app is left."""
    import ray
    from ray import serve

    from .metrics_hub import stop_hub

    if not ray.is_initialized():
        return
    status = serve.status()
    if not status.proxies and not status.applications:
        return  # Serve never started (or is already down)
    serve.delete(cfg.app_name)
    stop_hub(cfg.app_name)
    if not serve.status().applications:
        serve.shutdown()
        deadline = time.monotonic() + timeout_s
        while not port_is_free(cfg.host, cfg.port) and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait_ready(url: str, timeout_s: float, key: str = "") -> None:
    """Poll an authenticated route, so a key the app does not take fails here, not in the smoke test."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last = None
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as err:
            if err.code == 401:
                raise RuntimeError(f"the endpoint {url} refused the API key (HTTP 401)") from None
            last = err
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            last = err
        time.sleep(0.25)
    raise RuntimeError(f"the endpoint {url} did not answer within {timeout_s:.0f} s (last error: {last})")


# ---------------------------------------------------------------------- smoke test
def smoke_test(url: str, model_name: str, cfg: Config) -> tuple[dict, dict[str, float]]:
    """Chat + completion requests through the real HTTP endpoint with the openai client."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key(cfg) or "unused", max_retries=0, timeout=60)
    t0 = time.perf_counter()
    chat = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": cfg.smoke_prompt}],
        max_tokens=cfg.smoke_max_tokens,
        temperature=0.0,
    )
    chat_ms = (time.perf_counter() - t0) * 1000
    latencies, tokens, completion = [], 0, None
    for i in range(cfg.smoke_requests):
        t0 = time.perf_counter()
        completion = client.completions.create(
            model=model_name, prompt=cfg.smoke_prompt, max_tokens=cfg.smoke_max_tokens, temperature=0.0, seed=i
        )
        latencies.append((time.perf_counter() - t0) * 1000)
        tokens += completion.usage.completion_tokens
    ordered = sorted(latencies)
    metrics = {
        "chat_latency_ms": chat_ms,
        "latency_ms_p50": statistics.median(ordered),
        "latency_ms_p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "latency_ms_max": ordered[-1],
        "latency_ms_mean": statistics.fmean(ordered),
        "completion_tokens_per_s": tokens / (sum(latencies) / 1000),
    }
    report = {
        "prompt": cfg.smoke_prompt,
        "chat": chat.model_dump(exclude_none=True),
        "completion": completion.model_dump(exclude_none=True),
        "latency_ms": latencies,
        **metrics,
    }
    return report, metrics


# ---------------------------------------------------------------------- stage + CLI entry points
def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    validate(cfg)
    model_dir = ctx.input("model").local_dir()
    dataset_dir = ctx.inputs["dataset"].local_dir() if "dataset" in ctx.inputs else None
    tokenizer_path = find_tokenizer(model_dir, dataset_dir)
    model_name = served_name(cfg)
    quantized = (model_dir / "quant_config.json").is_file()

    ctx.progress.set_total(3, "deploying")
    try:  # stop() runs also when the deployment itself fails, so no proxy is left on the port
        t0 = time.perf_counter()
        url = start(model_dir, tokenizer_path, cfg, model_name)
        deploy_s = time.perf_counter() - t0
        ctx.progress.update(1, "smoke test")
        smoke, metrics = smoke_test(url, model_name, cfg)
        metrics["deploy_seconds"] = deploy_s
        endpoint = {
            "url": f"{url}/v1",
            "model": model_name,
            "quantized": quantized,
            "status": "serving" if cfg.block else "stopped after the smoke test",
            "deployment": {
                **recorded_config(cfg),
                "model_name": model_name,
                "model_dir": str(model_dir),
                "tokenizer": str(tokenizer_path),
                "route_prefix": "/",
            },
            "smoke": smoke,
        }
        if cfg.backend == "vllm":
            from .vllm_backend import preflight

            endpoint["vllm_preflight"] = preflight(cfg.vllm, model_dir, model_name).to_dict()
        out = Path(ctx.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "endpoint.json").write_text(json.dumps(endpoint, indent=2, default=str) + "\n")
        ctx.log.metrics(metrics)
        ctx.progress.update(1, f"serving at {url}/v1" if cfg.block else "stopping")
        if cfg.block:
            print(f"serving {model_name} at {url}/v1 (Ctrl-C stops)", flush=True)
            _block_until_interrupted()
    finally:
        stop(cfg)
    ctx.progress.update(1, "done")
    summary = (
        f"{model_name} ({'quantized' if quantized else 'full precision'}) served at {url}/v1: "
        f"p50 {metrics['latency_ms_p50']:.0f} ms per completion of up to {cfg.smoke_max_tokens} tokens"
    )
    return StageResult(metrics=metrics, summary=summary, extra={"url": f"{url}/v1", "model": model_name})


def serve_forever(
    model_dir: str | Path, dataset_dir_or_tokenizer_dir: str | Path | None = None, cfg: Config | None = None
) -> None:
    """Serve `model_dir` (ckpt or qckpt) until interrupted: `python -m pipeline serve` calls this.

    The tokenizer comes from model_dir/tokenizer/, else from the given dataset or tokenizer dir
    (or tokenizer.json path)."""
    cfg = cfg or Config()
    validate(cfg)
    model_dir = Path(model_dir)
    extra = Path(dataset_dir_or_tokenizer_dir) if dataset_dir_or_tokenizer_dir else None
    tokenizer_path = find_tokenizer(model_dir, extra)
    model_name = served_name(cfg)
    try:
        url = start(model_dir, tokenizer_path, cfg, model_name)
        print(f"serving {model_name} from {model_dir} at {url}/v1 (Ctrl-C stops)", flush=True)
        _block_until_interrupted()
    finally:  # also when interrupted while deploying
        stop(cfg)


def _block_until_interrupted() -> None:
    """Sleep until Ctrl-C (SIGINT) or SIGTERM (kill, a container stop); the caller then shuts down."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
