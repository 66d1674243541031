"""quantize: weight-only post-training quantization of a checkpoint, with a measured quality report.

    python -m pipeline run conf=tiny stages=[quantize]
    python -m pipeline run conf=tiny stages=[quantize] quantize.group_size=64 quantize.symmetric=true
    python -m pipeline run conf=tiny stages=[quantize] quantize.method=tcq quantize.bits=2

Inputs: `ckpt` (HF layout + tokenizer/) and `dataset` (its val rows measure perplexity, its
tasks/val.jsonl task accuracy, its train rows calibrate gptq / tcq).
The checkpoint is quantized one decoder layer at a time (stages/quantize/stream.py): memory holds
the embeddings, head and vision parts, one decoder layer and the rows' hidden states, never the
whole model. Output (qckpt): the packed model (`ernie.quant.QuantizedWriter`: config.json,
quant_config.json, one safetensors shard per decoder layer and their index), a copy of the
tokenizer, `quant_report.json` (bits, group size, method, bytes before / after, size ratio, bits
per weight counting every stored byte, validation perplexity before / after and its delta, task
accuracy before / after overall and per task, per-module weight reconstruction error, per-layer
hidden-state drift) and `quant_error.png`; with `quantize.export=[gptq]` (the pipeline presets) or
`[compressed-tensors]`, the same weights in a layout vLLM loads, under `export-<format>/`
(stages/quantize/export.py).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from math import gcd
from pathlib import Path

import torch

from ernie.batching import collate
from ernie.evaluation import perplexity
from ernie.quant import QuantizedWriter, load_quantized
from pipeline.contract import Resources, StageContext, StageResult, UserError
from pipeline.formats import TOKENIZER_FILE
from pipeline.shards import iter_rows

from .calibration import Calibration
from .export import check_export, write_export
from .gptq import GPTQLog, gptq_weight_quantizer
from .quality import TaskAccuracy, plot_layer_errors, save_figure
from .rtn import SCALE_DTYPES, by_bits, in_target_order, input_dims, quantization_targets, quantize_model
from .stream import PartQuantizer, StreamResult, load_by_parts, skeleton, stream_quantize
from .tcq import TCQSettings, quantize_model_tcq, tcq_weight_quantizer

INPUTS = {"ckpt": "ckpt", "dataset": "dataset"}
OUTPUT_KIND = "qckpt"
METHODS = ("rtn", "gptq", "tcq")
SUPPORTED_BITS = (2, 4, 8)  # the packable widths of ernie.quant; rtn and gptq quantize to any of them
TCQ_BITS = (2, 4)  # tcq's code widths (its point is 2)
CALIBRATED = ("gptq", "tcq")
TASKS_FILE = "tasks/val.jsonl"


@dataclass
class Config:
    method: str = "rtn"
    """rtn (round-to-nearest on per-group min/max grids), gptq (error-compensating, from the
    calibration rows' input Hessians; see stages/quantize/gptq.py) or tcq (trellis-coded: 2-bit codes
    of a convolutional code, Viterbi-searched under GPTQ's feedback; see stages/quantize/tcq.py)."""
    bits: int = 4
    """Stored code bits per weight: 2, 4 or 8 (tcq: 2 or 4). Scales, zero points and tcq's lead-in
    codes come on top: the report's bits_per_weight counts every stored byte."""
    group_size: int = 32
    """Weights sharing one scale (rtn / gptq: and zero point), along the input dim; must divide every
    quantized layer's input features."""
    symmetric: bool = False
    """rtn / gptq: symmetric groups (zero point fixed at 2**(bits-1)) instead of min/max asymmetric ones."""
    module_bits: dict[str, int] = field(default_factory=dict)
    """Per-module code widths: module name pattern (fnmatch; a parent's name covers its children) -> bits
    (2, 4 or 8), the first matching pattern winning; other modules take `bits`. E.g. attention and shared
    experts at 4 bits under 2-bit routed experts: {"*.self_attn": 4, "*.shared_experts": 4}. With
    method=tcq, modules at a width other than `bits` are quantized by gptq (tcq codes one width per run)."""
    skip: list[str] = field(default_factory=lambda: ["lm_head", "vision_encoder", "adapter"])
    """Module names (fnmatch patterns; a parent's name covers its children) kept in full precision.
    Routers, norms and embeddings are never quantized."""
    scale_dtype: str = "float16"
    """Storage dtype of the per-group scales: float16, bfloat16 or float32."""
    eval_rows: int = 64
    """Validation rows used for the perplexity before / after (0 = all of them)."""
    eval_items: int = 64
    """Items of the dataset's tasks/val.jsonl answered greedily before and after quantizing (task accuracy,
    exact match as the eval stage scores it), taken round-robin over tasks; 0 = all of them."""
    max_new_tokens: int = 8
    """Greedy tokens generated per task answer."""
    max_memory_gb: float = 0.0
    """Memory (GiB) the stage may use for whole models; 0 = the machine's. Quantizing never loads the whole model
    (one decoder layer at a time); task accuracy needs one: the full-precision model (before) and the packed one
    read back from the output (after) are loaded only when their bytes plus twice the largest layer's fit under
    this, else the report says why the accuracy was not measured."""
    calibration_rows: int = 64
    """gptq / tcq: training rows of the dataset whose tokens (text and image) give each layer's inputs."""
    sequential: bool = True
    """gptq / tcq: each layer is calibrated on the outputs of the layers before it as quantized (GPTQ's
    sequential setting); false: on full-precision inputs, the statistics of one whole-model pass."""
    damp: float = 0.01
    """gptq / tcq: share of the mean Hessian diagonal added to the diagonal."""
    act_order: bool = False
    """gptq: quantize the most active input columns first (grids set before any update)."""
    block_size: int = 128
    """gptq: columns per lazy update block (speed only). tcq: columns per Viterbi block, a multiple of
    group_size (memory: rows x 2**(window_bits - bits) x block_size floats per weight)."""
    min_expert_tokens: int = 16
    """gptq / tcq: a routed expert that saw fewer calibration tokens takes its pool's Hessian."""
    window_bits: int = 10
    """tcq: bits of the window a weight's value is read from (its own code and the ones before it): a
    multiple of bits, giving 2**(window_bits - bits) trellis states (at most 4096); more states, lower
    error, proportionally slower."""
    scale_updates: int = 1
    """tcq: least-squares refits of each block's scales, each followed by a new Viterbi search."""
    batch_size: int = 8
    """Rows per forward pass while measuring perplexity."""
    export: list[str] = field(default_factory=list)
    """Formats vLLM loads, each written beside our packed model into `export-<format>/`: gptq (2, 4
    or 8 bits) and compressed-tensors (4 or 8 bits); see stages/quantize/export.py."""
    resources: Resources = field(default_factory=lambda: Resources(num_cpus=1))
    """What the stage's Ray actor asks for."""


def validate(cfg: Config) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"quantize.method={cfg.method!r} is not a known method; available: {', '.join(METHODS)}")
    if cfg.method == "tcq":
        _validate_tcq(cfg)
    if cfg.bits not in SUPPORTED_BITS:
        raise UserError(
            f"quantize.bits={cfg.bits} is not supported: the {cfg.method} method writes "
            f"{'/'.join(map(str, SUPPORTED_BITS))}-bit weights"
        )
    if cfg.group_size <= 0:
        raise UserError(f"quantize.group_size={cfg.group_size} must be a positive number of weights")
    if cfg.scale_dtype not in SCALE_DTYPES:
        raise UserError(f"quantize.scale_dtype={cfg.scale_dtype!r} must be one of {', '.join(SCALE_DTYPES)}")
    if cfg.method in CALIBRATED:
        if cfg.calibration_rows <= 0 or not 0 <= cfg.damp < 1 or cfg.block_size <= 0 or cfg.min_expert_tokens < 0:
            raise UserError(
                f"quantize.calibration_rows={cfg.calibration_rows} and quantize.block_size={cfg.block_size} must be "
                f"positive, quantize.damp={cfg.damp} in [0, 1), quantize.min_expert_tokens >= 0"
            )
    _validate_module_bits(cfg)
    check_export(list(cfg.export), widths(cfg), cfg.method)
    if cfg.eval_rows < 0 or cfg.batch_size <= 0:
        raise UserError(f"quantize.eval_rows={cfg.eval_rows} must be >= 0 and quantize.batch_size={cfg.batch_size} > 0")
    if cfg.eval_items < 0 or cfg.max_new_tokens <= 0 or cfg.max_memory_gb < 0:
        raise UserError(
            f"quantize.eval_items={cfg.eval_items} and quantize.max_memory_gb={cfg.max_memory_gb} must be >= 0, "
            f"quantize.max_new_tokens={cfg.max_new_tokens} > 0"
        )


def widths(cfg: Config) -> list[int]:
    """Every code width the run writes: `bits` and those of `module_bits`."""
    return sorted({cfg.bits, *(int(b) for b in cfg.module_bits.values())})


def _validate_module_bits(cfg: Config) -> None:
    if not isinstance(cfg.module_bits, dict):
        raise UserError(
            f'quantize.module_bits={cfg.module_bits!r} must map module name patterns to bits, e.g. {{"*.self_attn": 4}}'
        )
    for pattern, bits in cfg.module_bits.items():
        if not isinstance(pattern, str) or not pattern:
            raise UserError(f"quantize.module_bits: {pattern!r} is not a module name pattern")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
            raise UserError(
                f"quantize.module_bits[{pattern!r}]={bits!r} is not supported: modules are written at "
                f"{'/'.join(map(str, SUPPORTED_BITS))} bits"
            )


def _validate_tcq(cfg: Config) -> None:
    if cfg.bits not in TCQ_BITS:
        raise UserError(
            f"quantize.bits={cfg.bits} is not supported by quantize.method=tcq: it codes 2 or 4 bits per weight"
        )
    for key in ("symmetric", "act_order"):
        if getattr(cfg, key):
            raise UserError(
                f"quantize.{key}=True applies to rtn / gptq grids; tcq has no zero points and codes the columns "
                "in input order: leave it false"
            )
    problem = _tcq_settings(cfg).problem()
    if problem:
        raise UserError(f"quantize.method=tcq: quantize.{problem}")


def _tcq_settings(cfg: Config) -> TCQSettings:
    return TCQSettings(cfg.bits, cfg.window_bits, cfg.group_size, cfg.block_size, cfg.scale_updates, cfg.damp)


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
