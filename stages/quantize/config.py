"""The quantize stage's settings and their checks, without torch: the CLI reads and checks configs without
loading a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.contract import Resources, UserError

EXPORTS = ("gptq", "compressed-tensors")
EXPORT_BITS = {"gptq": (2, 4, 8), "compressed-tensors": (4, 8)}
SCALE_DTYPE_NAMES = ("float16", "float32", "bfloat16")
"""Storage dtypes of the per-group scales (`stages.quantize.rtn.SCALE_DTYPES` maps them to torch's)."""
METHODS = ("rtn", "gptq", "tcq")
SUPPORTED_BITS = (2, 4, 8)  # the packable widths of ernie.quant; rtn and gptq quantize to any of them
TCQ_BITS = (2, 4)  # tcq's code widths (its point is 2)
CALIBRATED = ("gptq", "tcq")


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
    if cfg.scale_dtype not in SCALE_DTYPE_NAMES:
        raise UserError(f"quantize.scale_dtype={cfg.scale_dtype!r} must be one of {', '.join(SCALE_DTYPE_NAMES)}")
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


def check_export(formats: list[str], widths: list[int], method: str) -> None:
    """Refuse an export the format cannot hold, before any work is done; `widths`: every code width written."""
    for fmt in formats:
        if fmt not in EXPORTS:
            raise UserError(f"quantize.export: {fmt!r} is not a known format; available: {', '.join(EXPORTS)}")
        for bits in widths:
            if bits not in EXPORT_BITS[fmt]:
                raise UserError(
                    f"quantize.export={fmt} holds {'/'.join(map(str, EXPORT_BITS[fmt]))}-bit weights, not "
                    f"{bits}-bit ones (quantize.bits / quantize.module_bits)"
                    + ("; use quantize.export=[gptq] for 2 bits" if bits == 2 else "")
                )
        if method not in ("rtn", "gptq"):
            raise UserError(
                f"quantize.export={fmt} writes integer grids (codes, scales, zero points); quantize.method={method} "
                "writes no such grid; set quantize.export=[]"
            )


MAX_STATES = 4096  # 2**(window_bits - bits): the Viterbi's memory and time grow with it


@dataclass(frozen=True)
class TCQSettings:
    """How `tcq_quantize` codes one weight (the quantize stage's fields of the same names)."""

    bits: int = 2
    """Code bits per weight."""
    window_bits: int = 10
    """Bits of the window a weight reads (its own code and the previous ones): 2**(window_bits - bits) states."""
    group_size: int = 32
    """Inputs of one row sharing a scale."""
    block_size: int = 32
    """Columns per Viterbi block (a multiple of group_size); also the lazy-update block."""
    scale_updates: int = 1
    """Least-squares refits of each block's scales, each followed by a new Viterbi pass."""
    damp: float = 0.01
    """Share of the mean Hessian diagonal added to the diagonal."""

    def problem(self) -> str | None:
        """Why these settings cannot code anything, or None."""
        if self.bits not in (2, 4):
            return f"bits={self.bits}: the trellis codes 2 or 4 bits per weight"
        if self.window_bits % self.bits or self.window_bits < 2 * self.bits:
            return f"window_bits={self.window_bits} must be a multiple of bits={self.bits} and at least {2 * self.bits}"
        if 2 ** (self.window_bits - self.bits) > MAX_STATES:
            states = 2 ** (self.window_bits - self.bits)
            return f"window_bits={self.window_bits} gives {states} trellis states (at most {MAX_STATES})"
        if self.group_size <= 0 or self.block_size <= 0 or self.block_size % self.group_size:
            return f"block_size={self.block_size} must be a positive multiple of group_size={self.group_size}"
        if self.scale_updates < 0 or not 0 <= self.damp < 1:
            return f"scale_updates={self.scale_updates} must be >= 0 and damp={self.damp} in [0, 1)"
        return None
