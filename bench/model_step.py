"""Training-step throughput: our ERNIE 4.5 model vs HF transformers' implementation.

Forward + backward of the LM loss on random tokens, same config, same device, same run.
Reports tokens/s and MFU = (6 * active params incl. the output projection
+ 6 * layers * hidden * seq) * tokens/s / peak FLOP/s, the formula of the HF baselines in
shared/reference.

    python bench/model_step.py --smoke                       # CPU, tiny configs (make test)
    python bench/model_step.py --case ernie-0.3b --compile   # GPU: batch 8 x 4096
    python bench/model_step.py --case ernie-21b-4l --compile # GPU: 21B-A3B shape, 4 layers, 4 x 4096

Writes JSON (one record per implementation and case) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import write_report  # noqa: E402  (bench/, the script's own directory)

from ernie import ErnieForCausalLM, get_preset  # noqa: E402
from ernie.config import ErnieConfig  # noqa: E402
from ernie.flops import training_flops_per_token  # noqa: E402
from ernie.hf_config import to_hf_config  # noqa: E402


@dataclass
class Case:
    name: str
    config: ErnieConfig
    batch: int
    seq: int


def cases() -> dict[str, Case]:
    moe4 = get_preset("ernie_21b").replace(
        name="ernie-4.5-21b-a3b-shaped-4-layers", num_layers=4, tie_word_embeddings=False
    )
    return {
        "ernie-0.3b": Case("ernie-4.5-0.3b", get_preset("ernie_0_3b"), 8, 4096),
        "ernie-21b-4l": Case(moe4.name, moe4.validate(), 4, 4096),
        "tiny-dense": Case("tiny-dense", get_preset("tiny_dense"), 2, 64),
        "tiny-moe": Case("tiny-moe", get_preset("tiny_moe"), 2, 64),
    }


def build_ours(cfg: ErnieConfig, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = ErnieForCausalLM(cfg)
    return model.to(dtype).train()


def build_hf(cfg: ErnieConfig, device, dtype) -> torch.nn.Module:
    import transformers

    hf_dict = to_hf_config(cfg)
    config_cls = transformers.AutoConfig.for_model(hf_dict["model_type"]).__class__
    hf_cfg = config_cls.from_dict(hf_dict)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return model.train()


def time_steps(model, ids, steps: int, warmup: int, device) -> tuple[float, float]:
    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case, impl: str, device, dtype, steps, warmup, compile_layers, peak_flops, flops_tok):
    model = build_ours(case.config, device, dtype) if impl == "ours" else build_hf(case.config, device, dtype)
    if compile_layers:
        for layer in model.model.layers:
            layer.compile()
    ids = torch.randint(3, case.config.vocab_size, (case.batch, case.seq), device=device)
    seconds, peak_mem = time_steps(model, ids, steps, warmup + (2 if compile_layers else 0), device)
    tokens_per_s = case.batch * case.seq / seconds
    record = {
        "case": case.name,
        "impl": "ours" if impl == "ours" else "hf-transformers",
        "compiled": compile_layers,
        "batch": case.batch,
        "seq": case.seq,
        "dtype": str(dtype).removeprefix("torch."),
        "step_s": round(seconds, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(flops_tok * tokens_per_s / peak_flops, 4) if peak_flops else None,
        "peak_mem_gb": None if peak_mem != peak_mem else round(peak_mem, 2),
    }
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(cases()), help="repeatable")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU, a few steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="override the case's batch size")
    parser.add_argument("--seq", type=int, help="override the case's sequence length")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=float(os.environ.get("PEAK_TFLOPS", "989")),
        help="dense bf16 peak for MFU (H100 SXM: 989); MFU is omitted on CPU",
    )
    parser.add_argument("--out", default="out/bench/model_step.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = ["tiny-dense", "tiny-moe"] if args.smoke else (args.case or ["ernie-0.3b", "ernie-21b-4l"])
    steps, warmup = (2, 1) if args.smoke else (args.steps, args.warmup)
    peak_flops = args.peak_tflops * 1e12 if device.type == "cuda" else None

    records = []
    for name in names:
        case = cases()[name]
        if args.batch:
            case.batch = args.batch
        if args.seq:
            case.seq = args.seq
        with torch.device("meta"):
            flops_tok = training_flops_per_token(ErnieForCausalLM(case.config), case.seq)
        for impl in ("hf", "ours"):
            record = run_case(case, impl, device, dtype, steps, warmup, args.compile, peak_flops, flops_tok)
            print(json.dumps(record), flush=True)
            records.append(record)
    _print_table(records)
    report = {
        "bench": "model_step",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "records": records,
    }
    write_report(args.out, report)
    return records


def _print_table(records: list[dict]) -> None:
    print(f"\n{'case':38s} {'impl':16s} {'tokens/s':>12s} {'MFU':>7s} {'step s':>8s} {'mem GB':>7s}")
    for r in records:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        print(f"{r['case']:38s} {r['impl']:16s} {r['tokens_per_s']:12.1f} {mfu:>7s} {r['step_s']:8.4f} {mem:>7s}")


if __name__ == "__main__":
    main()
