"""Quantization quality and time: RTN, GPTQ and trellis-coded (tcq) weights of one checkpoint, side by side.

Each method runs through the quantize stage itself (`stages.quantize.run`, the code a pipeline run uses)
on the same checkpoint and dataset, in one process: validation perplexity before / after, bits per weight
counting every stored byte (codes, scales, zero points, tcq's lead-in codes), quantization seconds, and
held-out task accuracy (`ernie.tasks`: greedy answers to the dataset's tasks/val.jsonl, exact match) of the
saved quantized model. RTN is the baseline every PTQ paper reports; GPTQ the published Hessian method;
tcq ours for 2 bits; two rows keep attention at 4 bits (quantize.module_bits) under 2-bit MLPs and experts.
llm-compressor and GPTQModel are not run: neither installs beside this project's
pinned transformers / compressed-tensors without changing them.

    python bench/quant_quality.py --smoke                   # tests: the test checkpoint, rtn4 and tcq2, few rows
    python bench/quant_quality.py                           # the test checkpoint: rtn/gptq 4 and 2 bits, tcq 2
    python bench/quant_quality.py --ckpt DIR --dataset DIR  # any ckpt + dataset artifact (e.g. a pipeline run's)

The test checkpoint is the one tests/stages/test_quantize.py quantizes (a tiny MoE trained briefly on
chat documents, built deterministically by tests/helpers/tiny_artifacts.py). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stages.quantize as quantize  # noqa: E402
from ernie.checkpoint import load_pretrained  # noqa: E402
from ernie.quant import load_quantized  # noqa: E402
from ernie.tasks import accuracy_by_task, balanced_items, task_predictions  # noqa: E402
from pipeline.contract import Artifact, StageContext  # noqa: E402
from pipeline.formats import load_tokenizer, read_jsonl  # noqa: E402


@dataclass(frozen=True)
class Method:
    name: str
    method: str
    bits: int
    group_size: int
    module_bits: dict[str, int] = field(default_factory=dict)
    """Per-module widths (quantize.module_bits): here attention at 4 bits under 2-bit MLPs and experts."""


ATTENTION_AT_4 = {"*.self_attn": 4}
METHODS = [
    Method("rtn-4", "rtn", 4, 32),
    Method("gptq-4", "gptq", 4, 32),
    Method("rtn-2", "rtn", 2, 16),
    Method("gptq-2 (g16)", "gptq", 2, 16),
    Method("gptq-2 (g32)", "gptq", 2, 32),
    Method("tcq-2", "tcq", 2, 32),
    Method("gptq-2 + attn gptq-4 (g32)", "gptq", 2, 32, ATTENTION_AT_4),
    Method("tcq-2 + attn gptq-4", "tcq", 2, 32, ATTENTION_AT_4),
]
SMOKE = [METHODS[0], METHODS[3]]


def test_checkpoint(root: Path, train_steps: int) -> tuple[Path, Path]:
    """The test checkpoint's recipe trained `train_steps` steps, and its dataset (built once under `root`)."""
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    import tiny_artifacts

    paths = tiny_artifacts.build(root / f"steps-{train_steps}", train_steps=train_steps)
    return paths["ckpt"], paths["dataset"]


def task_accuracy(model, tokenizer, dataset: Path, max_items: int) -> float | None:
    tasks = dataset / "tasks" / "val.jsonl"
    if not tasks.is_file():
        return None
    items = balanced_items(read_jsonl(tasks), max_items)
    per_task, counts = accuracy_by_task(items, task_predictions(model.eval(), tokenizer, items, 8, 8))
    return sum(per_task[t] * counts[t] for t in counts) / max(1, len(items))


def run_method(m: Method, ckpt: Path, dataset: Path, out: Path, eval_rows: int, calibration_rows: int) -> dict:
    cfg = quantize.Config(
        method=m.method,
        bits=m.bits,
        group_size=m.group_size,
        module_bits=dict(m.module_bits),
        eval_rows=eval_rows,
        calibration_rows=calibration_rows,
    )
    inputs = {"ckpt": Artifact("ckpt", str(ckpt), "bench"), "dataset": Artifact("dataset", str(dataset), "bench")}
    ctx = StageContext(stage="quantize", config=cfg, model=None, inputs=inputs, output_dir=out)
    t0 = time.perf_counter()
    result = quantize.run(ctx)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "quant_report.json").read_text())
    return {
        "method": m.name,
        "stage_method": m.method,
        "bits": m.bits,
        "group_size": m.group_size,
        "module_bits": m.module_bits,
        "bits_per_weight": report.get("bits_per_weight"),
        "ppl_before": report["ppl_before"],
        "ppl_after": report["ppl_after"],
        "ppl_rel_delta": report["ppl_rel_delta"],
        "quantize_seconds": result.metrics.get("quantize_seconds"),
        "stage_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="rtn-4 and gptq-2 only, few rows (tests)")
    parser.add_argument("--ckpt", type=Path, help="a ckpt artifact directory (default: the test checkpoint)")
    parser.add_argument("--dataset", type=Path, help="its dataset artifact directory")
    parser.add_argument("--work", type=Path, help="where to build the test checkpoint (default: a temp dir)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=600,
        help="steps of the built checkpoint (600: it answers ~40%% of the held-out tasks; the tests' 100: none)",
    )
    parser.add_argument("--eval-rows", type=int, default=64)
    parser.add_argument("--eval-items", type=int, default=64, help="task items answered per model (0 = all)")
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results/quant_quality.json")
    args = parser.parse_args(argv)
    if (args.ckpt is None) != (args.dataset is None):
        parser.error("--ckpt and --dataset go together")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        steps = 100 if args.smoke else args.train_steps
        ckpt, dataset = (args.ckpt, args.dataset) if args.ckpt else test_checkpoint(work / "tiny_artifacts", steps)
        eval_rows, items = (8, 8) if args.smoke else (args.eval_rows, args.eval_items)
        tokenizer = load_tokenizer(dataset)
        accuracy_before = task_accuracy(load_pretrained(ckpt), tokenizer, dataset, items)
        records = []
        for m in SMOKE if args.smoke else METHODS:
            out = Path(tmp) / "out" / m.name.replace(" ", "_")
            record = run_method(m, ckpt, dataset, out, eval_rows, 8 if args.smoke else args.calibration_rows)
            record["task_accuracy_before"] = accuracy_before
            record["task_accuracy_after"] = task_accuracy(load_quantized(out), tokenizer, dataset, items)
            records.append(record)
            print(json.dumps(record), flush=True)
    report = {
        "benchmark": "quant_quality",
        "date": time.strftime("%Y-%m-%d"),
        "device": platform.processor() or platform.machine() or "cpu",
        "threads": args.threads,
        "checkpoint": str(args.ckpt) if args.ckpt else f"tests/helpers/tiny_artifacts.py's, trained {steps} steps",
        "eval_rows": eval_rows,
        "task_items": items,
        "records": records,
    }
    _print_table(records)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def _print_table(records: list[dict]) -> None:
    head = f"{'method':27s} {'bits/w':>7s} {'ppl before':>11s} {'ppl after':>10s} {'delta':>8s} {'acc':>11s}"
    print(f"\n{head} {'s':>6s}")
    for r in records:
        acc = r["task_accuracy_after"]
        acc_text = "-" if acc is None else f"{r['task_accuracy_before']:.2f}->{acc:.2f}"
        bpw = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        print(
            f"{r['method']:27s} {bpw:>7s} {r['ppl_before']:11.3f} {r['ppl_after']:10.3f} "
            f"{r['ppl_rel_delta']:+8.2%} {acc_text:>11s} {r['quantize_seconds'] or 0:6.1f}"
        )


if __name__ == "__main__":
    main()
