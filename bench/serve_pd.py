"""Prefill/decode disaggregation against colocated serving on the same CPUs, under three request mixes.

Both serve the same checkpoint, in the same dtype, to the same closed-loop clients (`serve_load.run_clients`: C
clients on one event loop, as the API server reads an engine, each sending its next request when its last one
ends, tokens timed as they arrive):

  colocated  one `Engine` in this process with W x T torch threads: continuous batching on the paged cache,
             prompts chunked into the running requests' decode steps
  pd         `stages.serve.pd.PDEngine` on a local Ray: W worker actors of T threads each (one CPU per
             thread), `--prefill-workers` of them prefilling, the rest decoding; roles fixed unless
             `--switching` (then `RoleSwitchPolicy` moves workers as the load changes)

so each side has W x T cores. Mixes (prompt tokens, max_tokens; greedy, random ids, seeded):

  prefill-heavy  prompts 192-384, 4-12 tokens out
  decode-heavy   prompts 8-32, 64-128 tokens out
  mixed          the two kinds alternating, one request in two of each

Per mix and side: throughput (generated tokens / wall seconds), TTFT and TPOT p50 / p99, and for PD whether
its tokens equal colocated's (`same_tokens_as_colocated`: both are the model's greedy decode, so they
differ only where a batched bf16 matmul rounds a near-tie the other way).

    python bench/serve_pd.py --smoke                    # tiny-moe, a few short requests (tests)
    python bench/serve_pd.py                            # ernie-0.3b-4l in bf16, W=2 T=1, 8 streams

Writes JSON to --out.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_report  # noqa: E402  (bench/, the script's own directory)
from serve_load import cases, make_requests, run_clients, summarise, write_tokenizer  # noqa: E402  (bench/)

from ernie import ErnieForCausalLM  # noqa: E402
from ernie.checkpoint import save_pretrained  # noqa: E402
from stages.serve.engine import Engine  # noqa: E402
from stages.serve.scheduler import SamplingParams  # noqa: E402

MIXES = {
    "prefill-heavy": [((192, 384), (4, 12))],
    "decode-heavy": [((8, 32), (64, 128))],
    "mixed": [((192, 384), (4, 12)), ((8, 32), (64, 128))],
}
SMOKE_MIXES = {
    "prefill-heavy": [((48, 96), (2, 4))],
    "decode-heavy": [((4, 8), (12, 20))],
    "mixed": [((48, 96), (2, 4)), ((4, 8), (12, 20))],
}


def mix_requests(kinds, n: int, seed: int, vocab: int):
    """`n` requests cycling through `kinds` (each a (prompt range, max_tokens range))."""
    per_kind = [make_requests(n, seed + i, vocab, *kind) for i, kind in enumerate(kinds)]
    return [per_kind[i % len(kinds)][i] for i in range(n)]


def tokens_of(engine):
    return lambda req: engine.atokens(req.prompt, SamplingParams(req.max_tokens, temperature=0.0))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=list(cases()), default="ernie-0.3b-4l")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--workers", type=int, default=2, help="PD workers (W); colocated gets W x T threads")
    parser.add_argument("--prefill-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per PD worker (T)")
    parser.add_argument("--switching", action="store_true", help="PD roles follow the load")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="per mix")
    parser.add_argument("--mix", action="append", choices=list(MIXES), help="repeatable; default all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny-moe, short requests, 2 streams (tests)")
    parser.add_argument("--out", default="bench/results/serve_pd.json")
    args = parser.parse_args(argv)
    if not 1 <= args.prefill_workers < args.workers:
        parser.error("--prefill-workers must be between 1 and --workers - 1: each role needs a worker")
    mixes = SMOKE_MIXES if args.smoke else MIXES
    if args.smoke:
        args.case, args.dtype, args.streams, args.requests = "tiny-moe", "float32", 2, 4
    import ray

    from stages.serve.pd import PDEngine
    from stages.serve.roles import RoleSwitchPolicy

    cfg, dtype = cases()[args.case], getattr(torch, args.dtype)
    records = []
    with tempfile.TemporaryDirectory(prefix="serve_pd_") as tmp:
        root = Path(tmp)
        tokenizer_path = write_tokenizer(root)
        ckpt = root / "ckpt"
        torch.manual_seed(args.seed)
        save_pretrained(ErnieForCausalLM(cfg), ckpt)
        torch.set_num_threads(args.workers * args.threads)
        colocated = Engine.load(ckpt, tokenizer_path, dtype, max_batch=64)
        if not ray.is_initialized():
            cpus = args.workers * args.threads
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        pd = PDEngine(
            ckpt,
            tokenizer_path,
            workers=args.workers,
            prefill_workers=args.prefill_workers,
            worker_cpus=args.threads,
            dtype=dtype,
            policy=RoleSwitchPolicy(enabled=args.switching, interval_s=0.5, min_dwell_s=5.0),
            max_batch=64,
        )
        try:
            warm = make_requests(2, args.seed + 99, cfg.vocab_size, (4, 8), (4, 4))
            run_clients(tokens_of(colocated), warm, 2)
            run_clients(tokens_of(pd), warm, 2)
            for name in args.mix or list(mixes):
                requests = mix_requests(mixes[name], args.requests, args.seed, cfg.vocab_size)
                ours, ours_wall = run_clients(tokens_of(colocated), requests, args.streams)
                switches = len(pd.role_switches)
                theirs, theirs_wall = run_clients(tokens_of(pd), requests, args.streams)
                base = {"case": args.case, "dtype": args.dtype, "mix": name, "streams": args.streams}
                colocated_record = {**base, "impl": "colocated", **summarise(ours, ours_wall)}
                pd_record = {
                    **base,
                    "impl": "pd",
                    **summarise(theirs, theirs_wall),
                    "same_tokens_as_colocated": round(
                        sum(a.tokens == b.tokens for a, b in zip(theirs, ours, strict=True)) / len(requests), 3
                    ),
                    "role_switches": len(pd.role_switches) - switches,
                    "roles_after": pd.roles,
                }
                for record in (colocated_record, pd_record):
                    print(json.dumps(record), flush=True)
                    records.append(record)
        finally:
            pd.close()
            colocated.close()
    report = {
        "bench": "serve_pd",
        "device": platform.processor() or platform.machine() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "config": {
            "case": args.case,
            "dtype": args.dtype,
            "streams": args.streams,
            "requests_per_mix": args.requests,
            "mixes": {name: [{"prompt_tokens": p, "max_tokens": m} for p, m in kinds] for name, kinds in mixes.items()},
            "colocated": f"one Engine in process, {args.workers * args.threads} torch threads",
            "pd": f"PDEngine, {args.workers} Ray workers x {args.threads} threads, {args.prefill_workers} prefilling, "
            f"switching {'on' if args.switching else 'off'}",
        },
        "records": records,
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
