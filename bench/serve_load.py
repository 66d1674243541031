"""Serving under load: our engine's continuous batching vs HF transformers `generate`, in one process.

The same checkpoint (exported by `ernie.checkpoint.save_pretrained`) is served by our `Engine` (loaded
as the server loads it, `Engine.load`) and by HF transformers' own ERNIE 4.5 classes
(`AutoModelForCausalLM.from_pretrained`, sdpa), in the same dtype (fp32, bf16) on CPU with the same
torch threads. Both get the same request set: greedy, prompts of 8-48 random token ids, max_tokens
16-64 (seeded), stopping at the end-of-sentence token. At each concurrency C (1, 8, 32 streams):

  ours  C clients in a closed loop (each sends its next request when its last one ends) against one
        engine: requests join the running batch between decode steps. The clients are coroutines on
        one event loop, reading the engine as the API server does (`Engine.atokens`: the scheduler's
        tokens for every request reach the loop in one wake-up per step). A request's tokens are
        timed as its client receives them (the token stream `Engine.astream` turns into text;
        detokenizing is left out on both sides).
  HF    what a user without a server does with C concurrent requests: the next C requests left-padded
        into one batch and one `model.generate` call (do_sample=False), then the next C. Tokens are
        timed by a streamer (`put` once per decode step); a row's tokens end at its own max_tokens or
        eos (the rest of its batch's steps is the waste of static batching).

Per level: throughput = generated tokens / wall seconds of the level; TTFT = first token - request
sent (for HF: its batch started); TPOT = (last - first token) / (tokens - 1); p50 / p99 over requests.
`same_tokens_as_hf` is the fraction of requests whose greedy tokens agree with HF's.

    python bench/serve_load.py --smoke          # tiny dense, 1 and 4 streams, a few short requests (tests)
    python bench/serve_load.py                  # tiny-dense, tiny-moe, ernie-0.3b-4l; fp32, bf16; 1 / 8 / 32 streams
    python bench/serve_load.py --case ernie-0.3b-4l --streams 32 --threads 2
    python bench/serve_load.py --workload shared-prefix   # a 256-token system prompt before every prompt;
                                                          # ours with and without prefix caching, and HF
    python bench/serve_load.py --device cuda    # on a GPU: ernie-0.3b (all 18 layers), bf16, both sides on it
    python bench/serve_load.py --compile        # ours also with its decode step compiled (serve.compile_decode)
    python bench/serve_load.py --unpacked       # ours also without its weights packed for oneDNN (serve.pack_weights)
    python bench/serve_load.py --thread-readers # ours also read by a thread per stream instead of one event loop

On a GPU (`--device cuda`, the default where one is visible) both sides run there; tokens reach the host
each decode step on both sides (ours: the sampled ids; HF: the streamer), so the times need no extra
synchronisation.

Prefill/decode disaggregation against colocated serving: bench/serve_pd.py.

Writes JSON (one record per case, implementation and concurrency) to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import deque  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import package_version  # noqa: E402  (bench/, the script's own directory)

from ernie import ErnieForCausalLM, get_preset  # noqa: E402
from ernie.checkpoint import save_pretrained  # noqa: E402
from ernie.config import ErnieConfig  # noqa: E402
from stages.data.tokenizer import train_tokenizer  # noqa: E402
from stages.serve.engine import Engine  # noqa: E402
from stages.serve.scheduler import (  # noqa: E402
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_PREFILL_CHUNK_TOKENS,
    SamplingParams,
    SchedulerStats,
)


def cases() -> dict[str, ErnieConfig]:
    return {
        "tiny-dense": get_preset("tiny_dense"),
        "tiny-moe": get_preset("tiny_moe"),
        # the published 0.3B shape (hidden 1024, 16 / 2 heads, head_dim 128, FFN 3072, vocab 103,424, tied
        # embeddings) cut from 18 to 4 layers so that both sides fit a CPU run
        "ernie-0.3b-4l": get_preset("ernie_0_3b").replace(name="ernie-4.5-0.3b-shaped-4-layers", num_layers=4),
        # the whole published 0.3B shape (18 layers): the GPU case, as in shared/reference's HF figures
        "ernie-0.3b": get_preset("ernie_0_3b"),
    }


CPU_CASES = ["tiny-dense", "tiny-moe", "ernie-0.3b-4l"]
GPU_CASES = ["ernie-0.3b"]


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


@dataclass
class Served:
    """One request's result: when it was sent, when each token arrived, the tokens."""

    sent: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def write_tokenizer(root: Path) -> Path:
    """A small BPE tokenizer under `root` (the engines need one; the benchmarks feed token ids)."""
    path = root / "tokenizer" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    train_tokenizer([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)], 512).save(str(path))
    return path


def make_requests(
    n: int, seed: int, vocab: int, prompt_range: tuple[int, int], max_range: tuple[int, int], system: int = 0
):
    """`system` > 0: every prompt starts with the same `system` tokens (a system prompt), then its own."""
    rng = random.Random(seed)
    shared = [rng.randrange(11, vocab) for _ in range(system)]
    return [
        Request(shared + [rng.randrange(11, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*max_range))
        for _ in range(n)
    ]


# ---------------------------------------------------------------------- ours
def run_ours(engine: Engine, requests: list[Request], streams: int) -> tuple[list[Served], float]:
    def tokens(req: Request):
        return engine.atokens(req.prompt, SamplingParams(req.max_tokens, temperature=0.0))

    return run_clients(tokens, requests, streams)


def run_clients(tokens_of, requests: list[Request], streams: int) -> tuple[list[Served], float]:
    """`streams` closed-loop clients, coroutines on one event loop as the API server reads the engine (one
    thread for every request: `EngineFront.atokens`); `tokens_of(request)`: its async token stream, timed on
    receipt."""
    pending = deque(enumerate(requests))
    served: list = [None] * len(requests)

    async def client() -> None:
        while pending:
            i, req = pending.popleft()
            result = Served(time.perf_counter())
            async for token in tokens_of(req):
                result.times.append(time.perf_counter())
                result.tokens.append(token)
            served[i] = result

    async def clients() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(streams)))
        return time.perf_counter() - start

    wall = asyncio.run(clients())
    return served, wall


def run_thread_readers(engine: Engine, requests: list[Request], streams: int) -> tuple[list[Served], float]:
    """`--thread-readers`: `streams` closed-loop client threads, each reading its request's tokens from a queue
    of its own (`Engine.tokens`, one thread woken per token): how the API server read the engine before it read
    on an event loop."""
    pending = deque(enumerate(requests))
    lock = threading.Lock()
    served: list = [None] * len(requests)

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i, req = pending.popleft()
            result = Served(time.perf_counter())
            for token in engine.tokens(req.prompt, SamplingParams(req.max_tokens, temperature=0.0)):
                result.times.append(time.perf_counter())
                result.tokens.append(token)
            served[i] = result

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return served, time.perf_counter() - start


# ---------------------------------------------------------------------- HF transformers
class StepTimes:
    """A transformers streamer that notes when each decode step's tokens come out (`put` is called with
    the prompt first, then once per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(model, requests: list[Request], streams: int, pad: int, eos: int) -> tuple[list[Served], float]:
    device = model.device
    served: list[Served] = []
    start = time.perf_counter()
    for first in range(0, len(requests), streams):
        batch = requests[first : first + streams]
        sent = time.perf_counter()
        width = max(len(r.prompt) for r in batch)
        ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in batch], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch], device=device)
        streamer = StepTimes()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in batch),
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            streamer=streamer,
        )
        step_times = streamer.times[1:]  # the first put is the prompt
        for row, req in enumerate(batch):
            tokens = out[row, width : width + req.max_tokens].tolist()
            if eos in tokens:
                tokens = tokens[: tokens.index(eos) + 1]
            served.append(Served(sent, step_times[: len(tokens)], tokens))
    return served, time.perf_counter() - start


# ---------------------------------------------------------------------- figures
def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": round(float(np.percentile(values, 50)), 3), "p99": round(float(np.percentile(values, 99)), 3)}


def same_tokens(ours: list[Served], theirs: list[Served]) -> float:
    """The fraction of requests whose tokens are the same on both sides."""
    return sum(a.tokens == b.tokens for a, b in zip(ours, theirs, strict=True)) / len(ours)


def summarise(served: list[Served], wall: float) -> dict:
    tokens = sum(len(s.tokens) for s in served)
    ttft = [(s.times[0] - s.sent) * 1000 for s in served]
    tpot = [(s.times[-1] - s.times[0]) * 1000 / (len(s.times) - 1) for s in served if len(s.times) > 1]
    return {
        "requests": len(served),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
    }


def bench_case(name: str, cfg: ErnieConfig, ckpt: Path, tokenizer_path: Path, dtype: str, args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    scheduling = {"kv_cache_tokens": args.kv_cache_tokens, "max_batch": max(args.streams)}
    engine = Engine.load(ckpt, tokenizer_path, torch_dtype, args.device, **scheduling)
    # sides of our engine with one feature off, each measured on its own: what that feature brings
    plain = {}
    if args.system:  # with shared prompt prefixes, without the prefix cache
        plain["ours-no-prefix-cache"] = {"prefix_caching": False}
    if args.unpacked:  # without the linear weights packed for oneDNN (serve.pack_weights)
        plain["ours-unpacked"] = {"pack_weights": False}
    plain = {
        impl: Engine.load(ckpt, tokenizer_path, torch_dtype, args.device, **off, **scheduling)
        for impl, off in plain.items()
    }
    # --compile: our engine with its decode step compiled too (serve.compile_decode), compiling timed apart
    compiled, compile_s = None, None
    if args.compile:
        started = time.perf_counter()
        compiled = Engine.load(ckpt, tokenizer_path, torch_dtype, args.device, compile_decode=True, **scheduling)
        compile_s = round(time.perf_counter() - started, 1)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype, attn_implementation="sdpa")
    hf = hf.to(args.device).eval()
    # every side once at the widest level, short requests: its first batches of that many rows are not timed
    widest = max(args.streams)
    warm = make_requests(max(2, widest), args.seed + 1, cfg.vocab_size, (4, 8), (4, 4))
    with torch.inference_mode():
        run_ours(engine, warm, widest)
        for other in plain.values():
            run_ours(other, warm, widest)
        if compiled is not None:
            run_ours(compiled, warm, widest)
        run_hf(hf, warm, widest, cfg.pad_token_id, cfg.eos_token_id)
    records = []
    for streams in args.streams:
        n = max(args.min_requests, args.requests_per_stream * streams)
        requests = make_requests(
            n, args.seed + streams, cfg.vocab_size, args.prompt_range, args.max_tokens_range, args.system
        )
        base = {"case": name, "model": cfg.name, "dtype": dtype, "streams": streams, "workload": args.workload}
        level = []
        for impl, other in plain.items():
            other.scheduler.stats = SchedulerStats()
            served, wall = run_ours(other, requests, streams)
            level.append({**base, "impl": impl, **summarise(served, wall)})
        if args.thread_readers:  # the default engine, read by a thread per stream
            served, wall = run_thread_readers(engine, requests, streams)
            level.append({**base, "impl": "ours-thread-readers", **summarise(served, wall)})
        # the compiled engine, then the same with prompts waiting up to N decode steps (serve.prompt_wait_steps)
        waits = [] if compiled is None else list(dict.fromkeys([0, *(args.prompt_wait_steps or [])]))
        compiled_sides = []  # (record, served)
        for wait in waits:
            compiled.scheduler.prompt_wait_steps, compiled.scheduler.stats = wait, SchedulerStats()
            served, wall = run_ours(compiled, requests, streams)
            steps = compiled.scheduler.stats
            record = {
                **base,
                "impl": f"ours-compiled-wait{wait}" if wait else "ours-compiled",
                **summarise(served, wall),
                "compiled_steps": steps.compiled_steps,
                "decode_steps": steps.decode_steps,
            }
            record |= {"prompt_wait_steps": wait} if wait else {"load_and_compile_s": compile_s}
            compiled_sides.append((record, served))
            level.append(record)
        engine.scheduler.stats = SchedulerStats()
        ours, ours_wall = run_ours(engine, requests, streams)
        stats = engine.scheduler.stats
        with torch.inference_mode():
            theirs, theirs_wall = run_hf(hf, requests, streams, cfg.pad_token_id, cfg.eos_token_id)
        same = same_tokens(ours, theirs)
        mean_batch = stats.row_steps / max(stats.decode_steps, 1)
        ours_record = {
            **base,
            "impl": "ours",
            **summarise(ours, ours_wall),
            "same_tokens_as_hf": round(same, 3),
            "packed_layers": engine.packed_layers,
            "scheduler": {
                "decode_steps": stats.decode_steps,
                "prefills": stats.prefills,
                "max_batch": stats.max_batch,
                "mean_batch": round(mean_batch, 2),
                "max_cached_tokens": stats.max_cached_tokens,
                "kv_cache_tokens": args.kv_cache_tokens,
                "prefix_hit_tokens": stats.prefix_hit_tokens,
                "preemptions": stats.preemptions,
            },
        }
        hf_record = {**base, "impl": "hf-generate", **summarise(theirs, theirs_wall), "batching": f"waves of {streams}"}
        level += [ours_record, hf_record]
        for record, served in compiled_sides:
            record["same_tokens_as_hf"] = round(same_tokens(served, theirs), 3)
        for record in level:
            if record is not hf_record:
                record["speedup_vs_hf"] = round(record["tokens_per_s"] / hf_record["tokens_per_s"], 2)
        for record in level:
            print(json.dumps(record), flush=True)
            records.append(record)
    for ours_engine in (engine, compiled, *plain.values()):
        if ours_engine is not None:
            ours_engine.close()
    del engine, compiled, plain, hf
    gc.collect()
    return records


# ---------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=list(cases()), help="repeatable; default all")
    parser.add_argument("--streams", type=int, action="append", help="concurrent streams (repeatable; 1, 8, 32)")
    parser.add_argument("--smoke", action="store_true", help="tiny-dense, 1 and 4 streams, short requests (tests)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="repeatable; default both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], help="where both sides run (default: cuda if one is visible)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also ours with the decode step compiled (serve.compile_decode)"
    )
    parser.add_argument(
        "--prompt-wait-steps",
        type=int,
        action="append",
        help="with --compile: also the compiled engine with serve.prompt_wait_steps=N (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--min-requests", type=int, default=8, help="requests per level at least (1 stream: 8)")
    parser.add_argument("--kv-cache-tokens", type=int, default=65536, help="our engine's KV budget (serve config)")
    parser.add_argument(
        "--workload",
        choices=["random", "shared-prefix"],
        default="random",
        help="random: prompts of 8-48 random ids; shared-prefix: a --system-tokens system prompt before each",
    )
    parser.add_argument("--system-tokens", type=int, default=256, help="the shared-prefix workload's system prompt")
    parser.add_argument(
        "--thread-readers",
        action="store_true",
        help="ours also read by a client thread per stream (Engine.tokens) instead of one event loop",
    )
    parser.add_argument(
        "--unpacked", action="store_true", help="ours also without its weights packed for oneDNN (serve.pack_weights)"
    )
    parser.add_argument("--out", default="bench/results/serve_load.json")
    args = parser.parse_args(argv)
    args.prompt_range, args.max_tokens_range = (8, 48), (16, 64)
    args.system = args.system_tokens if args.workload == "shared-prefix" else 0
    if args.smoke:
        args.case = args.case or ["tiny-dense"]
        args.streams = args.streams or [1, 4]
        args.min_requests, args.prompt_range, args.max_tokens_range = 4, (4, 12), (4, 10)
    if args.prompt_wait_steps and not args.compile:
        parser.error("--prompt-wait-steps: only with --compile (it gathers prompts between compiled steps)")
    if any(wait < 0 for wait in args.prompt_wait_steps or []):
        parser.error(f"--prompt-wait-steps {args.prompt_wait_steps}: each must be at least 0")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    gpu = args.device == "cuda"
    args.case = args.case or (GPU_CASES if gpu else CPU_CASES)
    args.dtype = args.dtype or (["float32"] if args.smoke else ["bfloat16"] if gpu else ["float32", "bfloat16"])
    args.streams = sorted(set(args.streams or [1, 8, 32]))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        root = Path(tmp)
        tokenizer_path = write_tokenizer(root)
        for name in args.case:
            ckpt = root / "ckpt" / name
            torch.manual_seed(args.seed)
            save_pretrained(ErnieForCausalLM(cases()[name]), ckpt)  # fp32; each side loads it in `dtype`
            for dtype in args.dtype:
                records += bench_case(name, cases()[name], ckpt, tokenizer_path, dtype, args)
    _print_table(records)
    report = {
        "bench": "serve_load",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "dtypes": args.dtype,
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "config": {
            "device": args.device,
            "seed": args.seed,
            "streams": args.streams,
            "requests": f"max({args.min_requests}, {args.requests_per_stream} x streams) per level",
            "workload": args.workload,
            "system_prompt_tokens": args.system,
            "prompt_tokens": list(args.prompt_range),
            "max_tokens": list(args.max_tokens_range),
            "sampling": "greedy, stops at eos",
            "kv_cache_tokens": args.kv_cache_tokens,
            "kv_block_tokens": DEFAULT_BLOCK_TOKENS,
            "prefill_chunk_tokens": DEFAULT_PREFILL_CHUNK_TOKENS,
            "ours": "Engine.load (linear weights packed for oneDNN on a CPU: serve.pack_weights) + continuous "
            "batching on the paged KV cache, C closed-loop clients on one event loop (Engine.atokens, as the API "
            "server reads it), tokens timed on receipt",
            "ours-unpacked": "--unpacked only: the same engine with serve.pack_weights off",
            "ours-thread-readers": "--thread-readers only: the default engine read by C client threads, each "
            "woken per token from a queue of its own (Engine.tokens)",
            "hf": "AutoModelForCausalLM (sdpa) generate on left-padded waves of C requests, streamer-timed steps",
            "ours-no-prefix-cache": "shared-prefix workload only: the same engine with serve.prefix_caching off",
            "ours-compiled": "--compile only: the same engine with serve.compile_decode (load_and_compile_s: "
            "Engine.load with the compile, before the warm-up requests)",
            "ours-compiled-waitN": "--compile --prompt-wait-steps N only: the compiled engine with "
            "serve.prompt_wait_steps=N (a prompt waits up to N decode steps for others to run with it)",
        },
        "records": records,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _print_table(records: list[dict]) -> None:
    head = f"{'case':14s} {'dtype':9s} {'streams':>7s} {'impl':20s} {'tok/s':>9s}"
    print(f"\n{head} {'TTFT p50/p99 ms':>18s} {'TPOT p50/p99 ms':>18s}")
    for r in records:
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        print(
            f"{r['case']:14s} {r['dtype']:9s} {r['streams']:7d} {r['impl']:20s} {r['tokens_per_s']:9.1f} "
            f"{ttft['p50']:8.1f}/{ttft['p99']:8.1f} {tpot['p50'] or 0:8.2f}/{tpot['p99'] or 0:8.2f}"
        )


if __name__ == "__main__":
    main()
