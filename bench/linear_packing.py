"""Linear layers with weights packed for oneDNN (`ernie.packed_linear`) against `F.linear`, per layer shape.

The serving engine packs its linear layers on a CPU (`serve.pack_weights`). This measures what that does
to one matmul, side by side in one process: for every linear layer shape of ERNIE-4.5-0.3B (q, k, v, o,
gate, up, down, and the LM head), in fp32 and bf16, at 1, 8 and 32 rows (decode steps of 1 / 8 / 32
requests) and 512 (a prefill chunk; not for the LM head, which a step runs on one token per request),
the median time of `F.linear(x, weight)` (what nn.Linear and HF transformers run) and of
`PackedLinear(x)` on the same weight and input, and the largest difference between their outputs.
"layer" sums one decoder layer's seven projections. Square weights of 64 to 1024 a side, at the decode
row counts, show where the packed layer's dearer call starts to pay (`ernie.packed_linear.MIN_ELEMENTS`).

    python bench/linear_packing.py                 # 1 torch thread (as bench/serve_load.py)
    python bench/linear_packing.py --threads 2
    python bench/linear_packing.py --smoke         # small shapes, few repeats (tests)

Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_report  # noqa: E402  (bench/, the script's own directory)

from ernie import get_preset  # noqa: E402
from ernie.packed_linear import PackedLinear, can_pack  # noqa: E402

LAYER = ("q", "k", "v", "o", "gate", "up", "down")
MAX_DECODE_ROWS = 64
"""The LM head is measured up to this many rows: a step computes logits for one token per request."""


def shapes(smoke: bool) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of the 0.3B model (a tiny one with --smoke)."""
    cfg = get_preset("tiny_dense" if smoke else "ernie_0_3b")
    hidden, heads, kv, head_dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {
        "q": (hidden, heads * head_dim),
        "k": (hidden, kv * head_dim),
        "v": (hidden, kv * head_dim),
        "o": (heads * head_dim, hidden),
        "gate": (hidden, cfg.intermediate_size),
        "up": (hidden, cfg.intermediate_size),
        "down": (cfg.intermediate_size, hidden),
        "lm_head": (hidden, cfg.vocab_size),
    }


SQUARES = (64, 256, 512, 1024)
"""Side of the square weights measured too: where the packed layer's dearer call starts to pay."""


def median_ms(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def measure(name: str, dims: tuple[int, int], dtype: torch.dtype, rows: int, repeats: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(*dims, bias=False, dtype=dtype)
    x = torch.randn(rows, dims[0], dtype=dtype)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        plain_ms = median_ms(lambda x: F.linear(x, linear.weight), x, repeats)
        packed_ms = median_ms(packed, x, repeats)
        diff = (packed(x).float() - F.linear(x, linear.weight).float()).abs().max().item()
    flops = 2 * rows * dims[0] * dims[1]
    return {
        "shape": name,
        "in_features": dims[0],
        "out_features": dims[1],
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "f_linear_ms": plain_ms,
        "packed_ms": packed_ms,
        "speedup": round(plain_ms / packed_ms, 2),
        "f_linear_gflops": round(flops / plain_ms / 1e6, 1),
        "packed_gflops": round(flops / packed_ms / 1e6, 1),
        "max_abs_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, action="append", help="repeatable; default 1, 8, 32, 512")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per measurement (default 20; smoke 3)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="bench/results/linear_packing.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.smoke else 20)
    rows = args.rows or ([1, 4] if args.smoke else [1, 8, 32, 512])
    dtypes = [torch.float32, torch.bfloat16]
    usable = [d for d in dtypes if can_pack(torch.empty(0, dtype=d))]
    records = []
    for dtype in usable:
        for n in rows:
            level = [
                measure(name, dims, dtype, n, repeats)
                for name, dims in shapes(args.smoke).items()
                if name != "lm_head" or n <= MAX_DECODE_ROWS
            ]
            if n <= MAX_DECODE_ROWS:
                level += [measure(f"square-{side}", (side, side), dtype, n, repeats * 5) for side in SQUARES]
            layer = [r for r in level if r["shape"] in LAYER]
            plain, packed = sum(r["f_linear_ms"] for r in layer), sum(r["packed_ms"] for r in layer)
            level.append(
                {
                    "shape": "layer",
                    "dtype": level[0]["dtype"],
                    "rows": n,
                    "f_linear_ms": plain,
                    "packed_ms": packed,
                    "speedup": round(plain / packed, 2),
                }
            )
            for record in level:
                print(json.dumps(record), flush=True)
            records += level
    report = {
        "bench": "linear_packing",
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "not_packable": [str(d).removeprefix("torch.") for d in dtypes if d not in usable],
        "config": {
            "model": "tiny_dense" if args.smoke else "ernie_0_3b",
            "repeats": repeats,
            "square_repeats": repeats * 5,
            "timing": "median wall time of one call after two untimed calls, torch.inference_mode",
            "baseline": "F.linear(x, weight) (nn.Linear; HF transformers' layers)",
        },
        "records": records,
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
