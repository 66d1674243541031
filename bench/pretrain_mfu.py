"""Full pretraining-step throughput and MFU: our ERNIE 4.5 model vs HF transformers', same config, same run.

A step is forward + backward of the LM loss + AdamW step (fused on CUDA) + zero_grad on random tokens.
Parameters are bf16 in both implementations, as shared/reference/hf_train_step_baseline.py loads HF
(`from_config(dtype=bfloat16)`, no autocast; fp32 on CPU for --smoke). Variants per implementation:
eager and, with --compile, each decoder layer `torch.compile`d (as the HF baseline's compiled figures);
ours also with `loss_impl="chunked"` (output projection + CE in token chunks, `ernie.chunked_loss`) and, on
compute capability >= 9.0 with torchao importable, FP8 training linears in the decoder layers (router and
lm_head stay bf16). MFU counts the same FLOPs as bench/model_step.py (`ernie.flops`) against the dense bf16
peak, also for FP8 variants.

    python bench/pretrain_mfu.py --smoke                    # CPU, tiny configs, 2 steps (tests)
    python bench/pretrain_mfu.py --compile                  # GPU: ernie-0.3b 8 x 4096, ernie-21b-4l 4 x 4096
    python bench/pretrain_mfu.py --compile --profile        # + top-15 CUDA kernels of our compiled step

Writes JSON (one record per case, implementation and variant; the step-1 loss in each) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import package_version  # noqa: E402  (bench/, the script's own directory)
from model_step import Case, build_hf, build_ours, cases  # noqa: E402

from ernie import ErnieForCausalLM  # noqa: E402
from ernie.flops import peak_flops, training_flops_per_token  # noqa: E402
from stages.training.fp8 import apply_fp8  # noqa: E402  (the stage's own FP8 swap)

IMPLS = {"hf": "hf-transformers", "ours": "ours"}
PROFILE_TOP = 15


@dataclass(frozen=True)
class Variant:
    compiled: bool = False
    chunked: bool = False
    fp8: bool = False

    @property
    def name(self) -> str:
        parts = [p for p, on in (("compiled", self.compiled), ("chunked", self.chunked), ("fp8", self.fp8)) if on]
        return "+".join(parts) or "eager"


def variants_for(impl: str, compile_layers: bool, fp8_ok: bool) -> list[Variant]:
    """HF: eager (+ compiled). Ours: eager, chunked (+ both compiled), + chunked FP8 (compiled with --compile)."""
    compiled = [False, True] if compile_layers else [False]
    if impl == "hf":
        return [Variant(compiled=c) for c in compiled]
    out = [Variant(compiled=c, chunked=ch) for c in compiled for ch in (False, True)]
    if fp8_ok:
        out.append(Variant(compiled=compile_layers, chunked=True, fp8=True))
    return out


# ------------------------------------------------------------------ FP8
def fp8_support(device: torch.device) -> tuple[bool, str]:
    """Whether torchao float8 training can run here, and why not (reported in the JSON instead of crashing)."""
    if device.type != "cuda":
        return False, "unavailable (no CUDA device)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return False, f"unavailable (compute capability {major}.{minor} < 9.0)"
    try:
        import torchao
        from torchao.float8 import convert_to_float8_training  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return False, f"unavailable ({type(exc).__name__}: {str(exc)[:200]})"
    return True, f"available (torchao {getattr(torchao, '__version__', '?')})"


# ------------------------------------------------------------------ one variant
def build(case: Case, impl: str, variant: Variant, device, dtype) -> tuple[nn.Module, dict]:
    """The model of one variant, and what was done to it (FP8 linears swapped)."""
    model = build_ours(case.config, device, dtype) if impl == "ours" else build_hf(case.config, device, dtype)
    extra: dict = {}
    if variant.chunked:
        model.loss_impl = "chunked"
    if variant.fp8:
        extra["fp8_linears"] = apply_fp8(model)
        if extra["fp8_linears"] == 0:
            raise RuntimeError("no linear layer was converted to FP8")
    if variant.compiled:
        for layer in model.model.layers:
            layer.compile()
    return model, extra


def make_step(model: nn.Module, ids: torch.Tensor, device):
    """forward + backward + AdamW step + zero_grad; returns the (detached) loss so nothing syncs inside a step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def time_steps(step, steps: int, warmup: int, device) -> tuple[float, float | None, float, list[float]]:
    """(seconds per step, peak GiB over the timed steps, step-1 loss, losses of the timed steps)."""
    first_loss = step().item()  # before any optimizer update: equal for variants with equal math
    for _ in range(warmup - 1):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return seconds, peak, first_loss, [loss.item() for loss in losses]


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(case: Case, impl: str, variant: Variant, device, dtype, args, peak, flops_tok) -> dict:
    record = {
        "case": case.name,
        "impl": IMPLS[impl],
        "variant": variant.name,
        "compiled": variant.compiled,
        "loss_impl": "chunked" if variant.chunked else "logits",
        "fp8": variant.fp8,
        "batch": case.batch,
        "seq": case.seq,
        "dtype": str(dtype).removeprefix("torch."),
        "optimizer": f"AdamW(fused={device.type == 'cuda'})",
    }
    model = None
    try:
        model, extra = build(case, impl, variant, device, dtype)
        record.update(extra)
        ids = torch.randint(
            3, case.config.vocab_size, (case.batch, case.seq), device=device, generator=_generator(device)
        )
        warmup = args.warmup + (2 if variant.compiled else 0)
        seconds, peak_mem, first_loss, losses = time_steps(make_step(model, ids, device), args.steps, warmup, device)
        tokens_per_s = case.batch * case.seq / seconds
        record.update(
            step_s=round(seconds, 4),
            tokens_per_s=round(tokens_per_s, 1),
            mfu=round(flops_tok * tokens_per_s / peak, 4) if peak else None,
            peak_mem_gb=None if peak_mem is None else round(peak_mem, 2),
            loss_step1=first_loss,
            loss_last=losses[-1],
        )
    except Exception as exc:  # one failing variant (OOM, FP8 kernels missing) must not lose the others
        if args.smoke:
            raise
        record["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    finally:
        del model
        _release(device, variant.compiled)
    return record


def _generator(device) -> torch.Generator:
    """The same token ids for every variant of a case."""
    return torch.Generator(device=device).manual_seed(1234)


def _release(device, compiled: bool) -> None:
    """Free the variant's memory (and compiled graphs) before the next one is measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()


# ------------------------------------------------------------------ profile
def profile_step(case: Case, device, dtype, out_path: Path, steps: int = 3) -> list[dict]:
    """Top kernels by device time over `steps` of our compiled step (CPU ops on a CPU run); a table to out_path."""
    variant = Variant(compiled=True)
    model, _ = build(case, "ours", variant, device, dtype)
    ids = torch.randint(3, case.config.vocab_size, (case.batch, case.seq), device=device, generator=_generator(device))
    step = make_step(model, ids, device)
    for _ in range(3):
        step()
    _sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows = top_kernels(prof, device, steps)
    out_path.write_text(_kernel_table(case, rows, device, steps))
    del model, step
    _release(device, True)
    return rows


def run_profile(case: Case, device, dtype, out: Path, smoke: bool) -> dict:
    """Profile one case into `<out stem>_profile_<case>.txt`; a failure is reported, not raised (outside smoke)."""
    path = out.with_name(f"{out.stem}_profile_{case.name}.txt")
    try:
        top = profile_step(case, device, dtype, path)
    except Exception as exc:
        if smoke:
            raise
        traceback.print_exc()
        _release(device, True)
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    print(path.read_text(), flush=True)
    return {"table": str(path), "top": top}


def top_kernels(prof, device, steps: int) -> list[dict]:
    """Aggregate device kernels (CUDA) or self CPU time of ops (CPU) by name; time per step."""
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            us = event.self_cpu_time_total
        totals[event.name][0] += us
        totals[event.name][1] += 1
    grand = sum(t for t, _ in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:PROFILE_TOP]
    return [
        {"name": name, "ms_per_step": round(us / steps / 1e3, 3), "calls_per_step": n / steps, "share": us / grand}
        for name, (us, n) in ranked
    ]


def _kernel_table(case: Case, rows: list[dict], device, steps: int) -> str:
    kind = "CUDA kernels" if device.type == "cuda" else "CPU ops (self time)"
    lines = [f"ours compiled step, {case.name} {case.batch}x{case.seq}: top {PROFILE_TOP} {kind} over {steps} steps"]
    lines.append(f"{'ms/step':>9s} {'share':>6s} {'calls':>6s}  name")
    for r in rows:
        lines.append(f"{r['ms_per_step']:9.3f} {100 * r['share']:5.1f}% {r['calls_per_step']:6.1f}  {r['name'][:160]}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=sorted(cases()), help="repeatable")
    parser.add_argument("--impl", action="append", choices=sorted(IMPLS), help="repeatable; default both")
    parser.add_argument("--variant", action="append", help="keep only these variant names (e.g. compiled+chunked)")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on CPU (fp32), 2 steps")
    parser.add_argument("--compile", action="store_true", help="also each decoder layer torch.compile'd")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels of our compiled step, per case")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="override the case's batch size")
    parser.add_argument("--seq", type=int, help="override the case's sequence length")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU; default ernie.flops.peak_flops")
    parser.add_argument("--out", default="bench/results/pretrain_mfu.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup = 2, 1
    args.warmup = max(args.warmup, 1)
    return args


def selected_cases(args) -> list[Case]:
    names = ["tiny-dense", "tiny-moe"] if args.smoke else (args.case or ["ernie-0.3b", "ernie-21b-4l"])
    out = []
    for name in names:
        case = cases()[name]
        case.batch = args.batch or case.batch
        case.seq = args.seq or case.seq
        out.append(case)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    fp8_ok, fp8_status = fp8_support(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    records, profiles = [], {}
    for case in selected_cases(args):
        with torch.device("meta"):
            flops_tok = training_flops_per_token(ErnieForCausalLM(case.config), case.seq)
        for impl in args.impl or ["hf", "ours"]:
            for variant in variants_for(impl, args.compile, fp8_ok):
                if args.variant and variant.name not in args.variant:
                    continue
                record = run_variant(case, impl, variant, device, dtype, args, peak, flops_tok)
                record["flops_per_token"] = flops_tok
                print(json.dumps(record), flush=True)
                records.append(record)
        if args.profile:
            profiles[case.name] = run_profile(case, device, dtype, out, args.smoke)
    fp8_errors = [r["error"] for r in records if r["fp8"] and "error" in r]
    if fp8_errors:
        fp8_status = f"unavailable (failed at run time: {fp8_errors[0][:300]})"
    _print_table(records, fp8_status)
    report = {
        "bench": "pretrain_mfu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
        "smoke": args.smoke,
        "peak_flops": peak,
        "mfu_basis": "dense bf16 peak, FLOPs of ernie.flops.training_flops_per_token (as bench/model_step.py)",
        "fp8": fp8_status,
        "records": records,
        "profiles": profiles,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _print_table(records: list[dict], fp8_status: str) -> None:
    header = f"\n{'case':34s} {'impl':16s} {'variant':22s} {'tokens/s':>12s} {'MFU':>7s} {'step s':>8s} {'mem GB':>7s}"
    print(header + f" {'loss@1':>8s}")
    for r in records:
        if "error" in r:
            print(f"{r['case']:34s} {r['impl']:16s} {r['variant']:22s} error: {r['error'][:60]}")
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        print(
            f"{r['case']:34s} {r['impl']:16s} {r['variant']:22s} {r['tokens_per_s']:12.1f} {mfu:>7s} "
            f"{r['step_s']:8.4f} {mem:>7s} {r['loss_step1']:8.4f}"
        )
    print(f"fp8: {fp8_status}")


if __name__ == "__main__":
    main()
