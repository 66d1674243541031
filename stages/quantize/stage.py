"""The quantize stage's run (the package's docstring says what it does)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import asdict
from math import gcd
from pathlib import Path

import torch

from ernie.batching import collate
from ernie.evaluation import perplexity
from ernie.quant import QuantizedWriter, load_quantized
from pipeline.contract import StageContext, StageResult, UserError
from pipeline.formats import TOKENIZER_FILE
from pipeline.shards import iter_rows

from .calibration import Calibration
from .config import CALIBRATED, Config, _tcq_settings, validate, widths
from .export import write_export
from .gptq import GPTQLog, gptq_weight_quantizer
from .quality import TaskAccuracy, plot_layer_errors, save_figure
from .rtn import SCALE_DTYPES, by_bits, in_target_order, input_dims, quantization_targets, quantize_model
from .stream import PartQuantizer, StreamResult, load_by_parts, skeleton, stream_quantize
from .tcq import quantize_model_tcq, tcq_weight_quantizer

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "qckpt"
TASKS_FILE = "tasks/val.jsonl"


def check_group_size(model, cfg: Config) -> None:
    """Every target's input features must split into whole groups; name the first that do not."""
    targets = quantization_targets(model, cfg.skip)
    dims = {name: input_dims(m) for name, m in targets.items()}
    bad = [(name, d) for name, ds in dims.items() for d in ds if d % cfg.group_size]
    if bad:
        common = 0
        for ds in dims.values():
            for d in ds:
                common = gcd(common, d)
        raise UserError(
            f"quantize.group_size={cfg.group_size} does not divide the input features of "
            f"{bad[0][0]} ({bad[0][1]}){f' and {len(bad) - 1} more layers' if len(bad) > 1 else ''}; "
            f"pick a divisor of {common}, or skip those layers with quantize.skip"
        )


def run(ctx: StageContext) -> StageResult:
    cfg: Config = ctx.config
    validate(cfg)
    ckpt_dir, dataset_dir = ctx.input("ckpt").local_dir(), ctx.input("dataset").local_dir()
    out = Path(ctx.output_dir)
    torch.manual_seed(ctx.seed)

    model = skeleton(ckpt_dir)  # on the meta device: shapes only
    check_group_size(model, cfg)
    targets = quantization_targets(model, cfg.skip)
    if not targets:
        raise UserError(f"quantize.skip={cfg.skip} leaves no layer to quantize")
    weights = sum(p.numel() for m in targets.values() for n, p in m.named_parameters() if n != "bias")
    rows = list(itertools.islice(iter_rows(dataset_dir / "val"), cfg.eval_rows or None))
    calibration_rows = _calibration_rows(cfg, dataset_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx.progress.set_total(model.config.num_layers + 2, "quantizing layer 0")

    log = GPTQLog()
    writer = QuantizedWriter(out, parts=model.config.num_layers + 1)
    t0 = time.perf_counter()
    result = stream_quantize(
        ckpt_dir,
        _batches(rows, cfg.batch_size),
        None if calibration_rows is None else _batches(calibration_rows, cfg.batch_size),
        _part_quantizer(cfg, log),
        writer,
        cfg.skip,
        cfg.sequential,
        lambda part: ctx.progress.update(1, f"quantized {part}"),
    )
    quantize_seconds = time.perf_counter() - t0
    quant_config = _quant_config(cfg)
    writer.close(model.config, result.dtype, quant_config)
    _copy_tokenizer(ckpt_dir, dataset_dir, out)

    memory_cap = int(cfg.max_memory_gb * 2**30) or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tasks = TaskAccuracy.from_file(dataset_dir / TASKS_FILE, out / TOKENIZER_FILE, cfg)
    packed, assembly = None, 2 * result.largest_layer_bytes  # loading part by part: one layer read and stacked
    if tasks is not None:
        tasks.measure("before", lambda: load_by_parts(ckpt_dir), result.model_bytes_before + assembly, memory_cap)
        packed = tasks.measure("after", lambda: load_quantized(out), result.model_bytes_after + assembly, memory_cap)
    for fmt in cfg.export:
        packed = load_quantized(out) if packed is None else packed
        write_export(packed, fmt, out / f"export-{fmt}", out / "tokenizer", cfg.symmetric)
    ctx.progress.update(1, "writing the report")

    calibration = {} if calibration_rows is None else _calibration_report(cfg, calibration_rows, result, log)
    return _report(ctx, cfg, quant_config, result, weights, len(rows), calibration, tasks, quantize_seconds)


def _batches(rows: list[dict], batch_size: int) -> list[dict]:
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _calibration_rows(cfg: Config, dataset_dir: Path) -> list[dict] | None:
    """gptq / tcq: the first `calibration_rows` rows of the dataset's train split; rtn: None."""
    if cfg.method not in CALIBRATED:
        return None
    train = dataset_dir / "train"
    if not train.is_dir():
        raise UserError(
            f"quantize.method={cfg.method} calibrates on the dataset's train rows, and {train} does not exist"
        )
    return list(itertools.islice(iter_rows(train), cfg.calibration_rows))


def _part_quantizer(cfg: Config, log: GPTQLog) -> PartQuantizer:
    """Quantizes one part's targets (a decoder layer's, the head...) with the configured method, from the part's
    calibration statistics (None for rtn); `log` collects the fallbacks over every part."""
    scale_dtype = SCALE_DTYPES[cfg.scale_dtype]

    def quantize_width(model, targets: dict, calibration: Calibration | None, bits: int) -> list:
        if cfg.method == "tcq" and bits == cfg.bits:
            settings = _tcq_settings(cfg)
            quantizer = tcq_weight_quantizer(calibration, settings, cfg.min_expert_tokens, scale_dtype, log)
            return quantize_model_tcq(model, targets, quantizer, settings, scale_dtype)
        quantizer = None
        if calibration is not None:
            quantizer = gptq_weight_quantizer(
                calibration,
                bits,
                cfg.symmetric,
                cfg.damp,
                cfg.act_order,
                cfg.block_size,
                cfg.min_expert_tokens,
                scale_dtype,
                log,
            )
        return quantize_model(
            model, bits, cfg.group_size, cfg.symmetric, cfg.skip, scale_dtype, None, quantizer, targets
        )

    def quantize_part(model, targets: dict, calibration: Calibration | None) -> list:
        stats = []
        for bits, group in by_bits(targets, cfg.module_bits, cfg.bits).items():
            stats += quantize_width(model, group, calibration, bits)
        return in_target_order(stats, targets)

    return quantize_part


def _quant_config(cfg: Config) -> dict:
    quant_config = {
        "method": cfg.method,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "scale_dtype": cfg.scale_dtype,
        "skip": list(cfg.skip),
    }
    if cfg.module_bits:
        quant_config["module_bits"] = dict(cfg.module_bits)
    calibrated = {"damp": cfg.damp, "calibration_rows": cfg.calibration_rows, "sequential": cfg.sequential}
    if cfg.method == "gptq":
        quant_config |= {"act_order": cfg.act_order} | calibrated
    if cfg.method == "tcq":
        quant_config |= {"window_bits": cfg.window_bits, "block_size": cfg.block_size}
        quant_config |= {"scale_updates": cfg.scale_updates} | calibrated
    return quant_config


def _calibration_report(cfg: Config, rows: list[dict], result: StreamResult, log: GPTQLog) -> dict:
    """Tokens seen, per-expert token counts, fallbacks (read once every part is quantized)."""
    return {
        "calibration_rows": len(rows),
        "calibration_tokens": int(sum(int((torch.as_tensor(r["document_ids"]) >= 0).sum()) for r in rows)),
        "experts_pooled": sum(log.pooled_experts.values()),
        "layers_uncalibrated": len(log.uncalibrated),
        "expert_tokens": result.expert_tokens,
        f"{cfg.method}_fallbacks": asdict(log),
    }


def _metrics(cfg: Config, result: StreamResult, weights: int, tasks: TaskAccuracy | None, seconds: float) -> dict:
    stats = result.stats
    bytes_before = sum(s.bytes_before for s in stats)
    bytes_after = sum(s.bytes_after for s in stats)
    errors = [s.rel_error for s in stats]
    ppl_before, ppl_after = perplexity(result.loss_before), perplexity(result.loss_after)
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "size_ratio": bytes_after / bytes_before,
        "bits_per_weight": 8 * bytes_after / weights,  # codes, scales, zero points, lead-ins: all of it
        "model_bytes_before": result.model_bytes_before,
        "model_bytes_after": result.model_bytes_after,
        "model_size_ratio": result.model_bytes_after / result.model_bytes_before,
        "val_loss_before": result.loss_before,
        "val_loss_after": result.loss_after,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_delta": ppl_after - ppl_before,
        "ppl_rel_delta": (ppl_after - ppl_before) / ppl_before,
        "recon_error_mean": sum(errors) / len(errors),
        "recon_error_max": max(errors),
        "layer_output_error_last": result.layer_output_errors[-1],
        **(tasks.metrics() if tasks is not None else {}),
        "quantize_seconds": seconds,
    }


def _report(ctx, cfg: Config, quant_config, result: StreamResult, weights, eval_rows, calibration, tasks, seconds):
    """quant_report.json, the logged metrics and figure, and the stage's result."""
    out, stats = Path(ctx.output_dir), result.stats
    metrics = _metrics(cfg, result, weights, tasks, seconds)
    report = {
        **quant_config,
        # timings stay out of the file: same inputs, same artifact bytes
        **{k: v for k, v in metrics.items() if k not in quant_config and k != "quantize_seconds"},
        "eval_tokens": result.eval_tokens,
        "eval_rows": eval_rows,
        **(tasks.report() if tasks is not None else {"task_accuracy_not_measured": f"no items in {TASKS_FILE}"}),
        **calibration,
        "layer_output_error": result.layer_output_errors,
        "layers": [asdict(s) for s in stats],
    }
    (out / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")

    ctx.log.metrics(metrics | {k: v for k, v in calibration.items() if isinstance(v, (int, float))})
    for i, s in enumerate(stats):
        ctx.log.metrics({"layer_recon_error": s.rel_error}, step=i)
    for i, error in enumerate(result.layer_output_errors):
        ctx.log.metrics({"layer_output_error": error}, step=i)
    title = f"{_label(cfg)}{' sym' if cfg.symmetric else ''}"
    fig = plot_layer_errors([s.name for s in stats], [s.rel_error for s in stats], title)
    ctx.log.figure(fig, "quant_error.png")
    save_figure(fig, out / "quant_error.png")

    accuracy = ""
    if tasks is not None:
        before, after = (metrics.get(f"task_accuracy_{which}") for which in ("before", "after"))
        accuracy = "; task accuracy " + " -> ".join("n/a" if a is None else f"{a:.1%}" for a in (before, after))
    summary = (
        f"{_label(cfg)}: {len(stats)} layers at {metrics['size_ratio']:.2f}x their "
        f"bytes (model {metrics['model_size_ratio']:.2f}x); val ppl {metrics['ppl_before']:.3f} -> "
        f"{metrics['ppl_after']:.3f} "
        f"({metrics['ppl_rel_delta']:+.2%}){accuracy}; mean weight error {metrics['recon_error_mean']:.3f}"
    )
    return StageResult(metrics=metrics, summary=summary, extra={"report": "quant_report.json"})


def _label(cfg: Config) -> str:
    """e.g. "gptq int4 g32", or "tcq int2+gptq int4 g32" with per-module widths."""
    parts = [f"{cfg.method} int{cfg.bits}"]
    for bits in widths(cfg):
        if bits != cfg.bits:
            parts.append(f"{'gptq' if cfg.method == 'tcq' else cfg.method} int{bits}")
    return f"{'+'.join(parts)} g{cfg.group_size}"


def _copy_tokenizer(ckpt_dir: Path, dataset_dir: Path, out: Path) -> None:
    source = ckpt_dir / "tokenizer"
    if not (source / "tokenizer.json").is_file():
        source = (dataset_dir / TOKENIZER_FILE).parent
    if not (source / "tokenizer.json").is_file():
        raise UserError(f"neither {ckpt_dir}/tokenizer nor {source} holds a tokenizer.json to ship with the model")
    shutil.copytree(source, out / "tokenizer", dirs_exist_ok=True)
