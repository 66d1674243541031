"""Weight-only integer quantization: the packed format the quantize stage writes and serving loads.

    from ernie.quant import QuantizedLinear, save_quantized, load_quantized
    qlinear = QuantizedLinear.from_codes(codes, scales, zeros, group_size=32, bits=4)
    save_quantized(qmodel, "out/qckpt", {"method": "rtn", "bits": 4, "group_size": 32})
    qmodel = load_quantized("out/qckpt")            # an ErnieForCausalLM with quantized modules

    writer = QuantizedWriter("out/qckpt", parts=3)  # or part by part (the quantize stage, a layer at a time)
    writer.write(layer.state_dict(prefix="model.layers.0."), {"model.layers.0.self_attn.q_proj": spec, ...})
    writer.close(config, "float32", {"method": "gptq", ...})

A weight W [..., out, in] is split along the input dim into groups of `group_size`; each
(row, group) has a scale s and an integer zero point z, and W ~ (q - z) * s with codes
q in [0, 2**bits - 1]. Codes are packed little-end first along the input dim: for 4 bits,
byte j holds code 2j in its low nibble and code 2j+1 in its high nibble (an odd tail is
padded with code 0). Scales are fp16 (or fp32), zero points uint8 (symmetric: 2**(bits-1)).

Which modules are quantized, and how they are computed (RTN, GPTQ...), is the quantize
stage's business; this module only holds the format: packing, the modules that run it
(`QuantizedLinear`, `QuantizedGroupedExperts`, dequantize-on-forward so a quantized model
runs through the normal `ErnieForCausalLM.forward`) and its safetensors I/O.

On disk (a qckpt directory):
    config.json, generation_config.json     as in a ckpt (HF config of the architecture)
    quant_config.json                       format, version, method, defaults, and per
                                            quantized module: kind, bits, group size, shape
    quantized.safetensors                   every tensor of the model under our own module
                                            names; a quantized linear X holds X.qweight,
                                            X.scales, X.zeros; an expert pool X holds
                                            X.gate_up.{qweight,scales,zeros} and X.down.*
  or, written part by part (`QuantizedWriter`; quant_config.json's "weights" names the index):
    quantized.safetensors.index.json        {"metadata": {"total_size"}, "weight_map": {tensor: shard}}
    quantized-00001-of-0000N.safetensors    the same tensors, one shard per part (a decoder layer;
                                            the last shard: everything outside the decoder layers)
Loading reads safetensors only, so it never unpickles. The same files hold trellis-coded modules
(`ernie.quant_tcq`: kinds tcq_linear / tcq_experts, tensors qweight and scales, no zeros).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import quant_kernel
from .config import ErnieConfig
from .hf_config import to_hf_config
from .model import ErnieForCausalLM
from .moe import GroupedExperts

FORMAT = "ernie-packed-int"
FORMAT_VERSION = 1
QUANT_CONFIG_FILE = "quant_config.json"
WEIGHTS_FILE = "quantized.safetensors"
WEIGHTS_INDEX_FILE = "quantized.safetensors.index.json"
SUPPORTED_BITS = (2, 4, 8)
_SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


class QuantFormatError(ValueError):
    """A quantized checkpoint or tensor that does not fit the format; the message says what."""


# ---------------------------------------------------------------------- packing
def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantFormatError(f"bits={bits} is not a packable width; supported: {SUPPORTED_BITS}")


def packed_length(length: int, bits: int) -> int:
    """Bytes that `length` codes of `bits` bits take along the packed dim."""
    per_byte = 8 // bits
    return -(-length // per_byte)


def pack(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Integer codes [..., L] in [0, 2**bits) -> uint8 [..., ceil(L * bits / 8)], packed along the last dim."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise QuantFormatError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise QuantFormatError(f"codes must lie in [0, {2**bits - 1}] for {bits} bits")
    per_byte = 8 // bits
    length = codes.shape[-1]
    padded = packed_length(length, bits) * per_byte
    codes = codes.to(torch.uint8)
    if padded != length:
        codes = F.pad(codes, (0, padded - length))
    codes = codes.reshape(*codes.shape[:-1], -1, per_byte)
    packed = torch.zeros(codes.shape[:-1], dtype=torch.uint8, device=codes.device)
    for i in range(per_byte):
        packed |= codes[..., i] << (bits * i)
    return packed


def unpack(packed: torch.Tensor, length: int, bits: int = 4) -> torch.Tensor:
    """The inverse of `pack`: uint8 [..., B] -> uint8 codes [..., length]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise QuantFormatError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_length(length, bits):
        raise QuantFormatError(
            f"{packed.shape[-1]} packed bytes cannot hold {length} codes of {bits} bits "
            f"(expected {packed_length(length, bits)})"
        )
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [..., out, in] = (codes - zeros) * scales, broadcast over groups of `group_size` (fp32)."""
    *lead, out_features, in_features = codes.shape
    groups = in_features // group_size
    q = codes.reshape(*lead, out_features, groups, group_size).float()
    w = (q - zeros[..., None].float()) * scales[..., None].float()
    return w.reshape(*lead, out_features, in_features)


# ---------------------------------------------------------------------- packed weight
class _PackedWeight(nn.Module):
    """One packed weight [..., out, in]: buffers `qweight` (uint8), `scales`, `zeros` (uint8)."""

    def __init__(self, shape: tuple[int, ...], bits: int, group_size: int, scale_dtype: torch.dtype) -> None:
        super().__init__()
        _check_bits(bits)
        *lead, out_features, in_features = shape
        if group_size <= 0 or in_features % group_size:
            raise QuantFormatError(f"group_size={group_size} must divide the input dim {in_features}")
        self.shape, self.bits, self.group_size = tuple(shape), bits, group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(*lead, out_features, packed_length(in_features, bits), dtype=torch.uint8)
        )
        self.register_buffer("scales", torch.zeros(*lead, out_features, groups, dtype=scale_dtype))
        self.register_buffer("zeros", torch.zeros(*lead, out_features, groups, dtype=torch.uint8))

    def fill(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        expected_groups = (*self.shape[:-1], self.shape[-1] // self.group_size)
        if tuple(codes.shape) != self.shape:
            raise QuantFormatError(f"codes {tuple(codes.shape)} do not match the weight shape {self.shape}")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != expected_groups:
                raise QuantFormatError(f"{name} {tuple(t.shape)} should be {expected_groups} (one per row and group)")
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2**self.bits):
            raise QuantFormatError(f"zero points must lie in [0, {2**self.bits - 1}]")
        self.qweight = pack(codes, self.bits).to(self.qweight.device)
        self.scales = scales.to(self.scales.dtype).to(self.scales.device)
        self.zeros = zeros.to(torch.uint8).to(self.zeros.device)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.shape[-1], self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size).to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def spec(self) -> dict:
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "scale_dtype": str(self.scales.dtype).removeprefix("torch."),
        }


KERNEL_MAX_ROWS = 64
"""Up to this many activation rows (decode steps, small batches) a CUDA forward runs the Triton
dequantizing matmul, which reads only the packed weight; more rows (prefill) amortise one
dequantization into a cuBLAS matmul."""


class QuantizedLinear(_PackedWeight):
    """A bias-optional linear layer whose weight [out, in] is stored packed (qweight, scales, zeros).

    forward dequantizes the weight to the activation dtype, then runs `F.linear`, so its
    output equals an `nn.Linear` holding the dequantized weight; on CUDA with few rows the
    Triton kernel of `ernie.quant_kernel` computes the same product from the packed codes.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 32,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__((out_features, in_features), bits, group_size, scale_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group_size: int,
        bits: int = 4,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias is not None, scales.dtype)
        layer.fill(codes, scales, zeros)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32), for inspection and export."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        rows = x.numel() // self.in_features
        if x.is_cuda and rows <= KERNEL_MAX_ROWS and quant_kernel.available():
            y = quant_kernel.dequant_matmul(
                x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features
            )
            return y if bias is None else y + bias
        return F.linear(x, self.dequantize(x.dtype), bias)

    def spec(self) -> dict:
        return {"kind": "linear", "bias": self.bias is not None, **super().spec()}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class _DenseExperts:
    """The dequantized experts of one forward pass, run through `GroupedExperts`' own code paths
    (so the quantized and the float experts share one implementation)."""

    forward = GroupedExperts.forward
    run_experts = GroupedExperts.run_experts
    _swiglu = GroupedExperts._swiglu
    _forward_loop = GroupedExperts._forward_loop
    _forward_grouped = GroupedExperts._forward_grouped
    _forward_gather = GroupedExperts._forward_gather
    ep = None  # quantized experts are whole on every rank

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, num_experts: int, intermediate: int):
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.num_experts, self.intermediate = num_experts, intermediate


class PackedExperts(nn.Module):
    """An expert pool whose `gate_up` [E, 2I, H] and `down` [E, H, I] weights are stored packed (by a
    subclass: integer grids, trellis codes); forward dequantizes both once per call and runs them
    through `GroupedExperts`' own code paths."""

    gate_up: nn.Module
    down: nn.Module

    def __init__(self, num_experts: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.ep = None  # whole on every rank: `MoE` asks, as it does of `GroupedExperts`

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.gate_up.dequantize()

    @property
    def down_proj(self) -> torch.Tensor:
        return self.down.dequantize()

    def forward(self, x_TH, topk_ids_TK, topk_weights_TK, impl="auto") -> torch.Tensor:
        dense = _DenseExperts(
            self.gate_up.dequantize(x_TH.dtype), self.down.dequantize(x_TH.dtype), self.num_experts, self.intermediate
        )
        return dense.forward(x_TH, topk_ids_TK, topk_weights_TK, impl)

    def nbytes(self) -> int:
        return self.gate_up.nbytes() + self.down.nbytes()


class QuantizedGroupedExperts(PackedExperts):
    """`GroupedExperts` with packed weights: gate_up_proj [E, 2I, H] and down_proj [E, H, I],
    each grouped along its input dim (H and I). forward dequantizes both once per call."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        bits: int = 4,
        group_size: int = 32,
        scale_dtype: torch.dtype = torch.float16,
        down_group_size: int | None = None,
    ) -> None:
        super().__init__(num_experts, intermediate)
        self.gate_up = _PackedWeight((num_experts, 2 * intermediate, hidden), bits, group_size, scale_dtype)
        self.down = _PackedWeight((num_experts, hidden, intermediate), bits, down_group_size or group_size, scale_dtype)

    def spec(self) -> dict:
        return {"kind": "experts", "gate_up_proj": self.gate_up.spec(), "down_proj": self.down.spec()}


QUANTIZED_MODULES = (QuantizedLinear, QuantizedGroupedExperts)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> quantized module (integer or trellis-coded, `ernie.quant_tcq`), in model order."""
    from .quant_tcq import TCQ_MODULES  # quant_tcq builds on this module

    kinds = QUANTIZED_MODULES + TCQ_MODULES
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def quantized_nbytes(module: nn.Module) -> int:
    """Bytes of a quantized module's packed codes, scales and zero points."""
    return module.nbytes()


def _module_from_spec(spec: dict) -> nn.Module:
    def scale_dtype(s: dict) -> torch.dtype:
        name = s.get("scale_dtype", "float16")
        if name not in _SCALE_DTYPES:
            raise QuantFormatError(f"unknown scale dtype {name!r}; expected one of {sorted(_SCALE_DTYPES)}")
        return _SCALE_DTYPES[name]

    if spec.get("kind") == "linear":
        out_features, in_features = spec["shape"]
        return QuantizedLinear(
            in_features, out_features, spec["bits"], spec["group_size"], spec.get("bias", False), scale_dtype(spec)
        )
    if spec.get("kind") == "experts":
        gu, down = spec["gate_up_proj"], spec["down_proj"]
        E, two_i, H = gu["shape"]
        if gu["bits"] != down["bits"]:
            raise QuantFormatError("gate_up_proj and down_proj of one expert pool must use the same bits")
        return QuantizedGroupedExperts(
            E, H, two_i // 2, gu["bits"], gu["group_size"], scale_dtype(gu), down_group_size=down["group_size"]
        )
    if spec.get("kind") in ("tcq_linear", "tcq_experts"):
        from .quant_tcq import tcq_module_from_spec

        return tcq_module_from_spec(spec, scale_dtype)
    raise QuantFormatError(f"unknown quantized module kind {spec.get('kind')!r}")


# ---------------------------------------------------------------------- save / load
def save_quantized(model: ErnieForCausalLM, directory: str | os.PathLike, quant_config: dict) -> Path:
    """Write config.json, generation_config.json, quant_config.json and quantized.safetensors.

    `quant_config` holds the method's settings (method, bits, group_size, symmetric, skip...);
    the per-module layout is added from the model itself.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    if not modules:
        raise QuantFormatError("the model has no quantized modules; quantize it before save_quantized")
    cfg = model.config
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt", "quant_format": FORMAT})
    specs = {name: m.spec() for name, m in modules.items()}
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    _write_configs(directory, cfg, dtype, quant_config, specs, WEIGHTS_FILE)
    return directory


class QuantizedWriter:
    """A qckpt written part by part, for models whose weights never are in memory all at once (the quantize
    stage writes each decoder layer as soon as it is quantized): each `write` is one safetensors shard,
    `close` writes the index, quant_config.json, config.json and generation_config.json. `load_quantized`
    reads the result as it reads `save_quantized`'s single file."""

    def __init__(self, directory: str | os.PathLike, parts: int) -> None:
        self.directory, self.parts = Path(directory), parts
        self.directory.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.specs: dict[str, dict] = {}
        self.written = self.total_bytes = 0

    def write(self, tensors: dict[str, torch.Tensor], modules: dict[str, dict]) -> int:
        """Write one part: its tensors (our names; a tied head left out by the caller) and the specs of its
        quantized modules. Returns the shard's bytes."""
        if self.written >= self.parts:
            raise QuantFormatError(f"all {self.parts} parts of {self.directory} are written already")
        file = f"quantized-{self.written + 1:05d}-of-{self.parts:05d}.safetensors"
        again = sorted(set(tensors) & set(self.weight_map))
        if again:
            raise QuantFormatError(f"tensors {again[:5]} are in two parts of {self.directory}")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, self.directory / file, metadata={"format": "pt", "quant_format": FORMAT})
        self.weight_map.update({k: file for k in tensors})
        self.specs.update(modules)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.written, self.total_bytes = self.written + 1, self.total_bytes + nbytes
        return nbytes

    def close(self, cfg: ErnieConfig, dtype: str, quant_config: dict) -> Path:
        """Write the index and the configs; `dtype` is the unquantized weights' (config.json's torch_dtype)."""
        if self.written != self.parts:
            raise QuantFormatError(f"{self.written} of the {self.parts} parts of {self.directory} were written")
        if not self.specs:
            raise QuantFormatError("the model has no quantized modules; quantize it before writing it")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        _write_json(self.directory / WEIGHTS_INDEX_FILE, index)
        _write_configs(self.directory, cfg, dtype, quant_config, self.specs, WEIGHTS_INDEX_FILE)
        return self.directory


def _write_configs(directory: Path, cfg: ErnieConfig, dtype: str, quant_config: dict, specs: dict, weights: str):
    full = {**quant_config, "format": FORMAT, "version": FORMAT_VERSION, "weights": weights, "modules": specs}
    _write_json(directory / "config.json", to_hf_config(cfg, dtype))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    _write_json(directory / "generation_config.json", generation)
    _write_json(directory / QUANT_CONFIG_FILE, full)


def is_quantized_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / QUANT_CONFIG_FILE).is_file()


def read_quant_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / QUANT_CONFIG_FILE
    if not path.is_file():
        raise QuantFormatError(f"{directory} has no {QUANT_CONFIG_FILE}; is it a quantized checkpoint?")
    try:
        qc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QuantFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(qc, dict) or qc.get("format") != FORMAT:
        raise QuantFormatError(f"{path} is not an {FORMAT!r} quant config (format={qc.get('format')!r})")
    if qc.get("version") != FORMAT_VERSION:
        raise QuantFormatError(f"{path} has format version {qc.get('version')}; this code reads {FORMAT_VERSION}")
    return qc


def load_quantized(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ErnieForCausalLM:
    """Rebuild the quantized model: the architecture from config.json, quantized modules from
    quant_config.json, every tensor from safetensors (checked: none missing, none unexpected).
    `dtype` casts the unquantized float tensors (routers stay fp32); packed codes never change."""
    from .checkpoint import _materialise_buffers, load_config

    directory = Path(directory)
    qc = read_quant_config(directory)
    cfg: ErnieConfig = load_config(directory)
    with torch.device("meta"):
        model = ErnieForCausalLM(cfg)
        for name, spec in qc["modules"].items():
            try:
                model.get_submodule(name)
            except AttributeError:
                raise QuantFormatError(
                    f"{QUANT_CONFIG_FILE} names module {name!r}, which {cfg.name} does not have"
                ) from None
            model.set_submodule(name, _module_from_spec(spec))
    state = _read_weights(directory, qc.get("weights", WEIGHTS_FILE))
    _check_state(model, state, str(directory))
    state = {k: _cast(k, v, dtype).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model, device)
    return model.eval()


def _read_weights(directory: Path, weights) -> dict[str, torch.Tensor]:
    """Every tensor of a qckpt: one safetensors file, or the shards its index lists (tensor by tensor)."""
    _check_weight_file(directory, weights)
    if not (directory / weights).is_file():
        raise QuantFormatError(f"{directory / weights} is missing")
    if not weights.endswith(".index.json"):
        with safe_open(directory / weights, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        shards: dict[str, list[str]] = {}
        for name, shard in json.loads((directory / weights).read_text())["weight_map"].items():
            shards.setdefault(shard, []).append(name)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise QuantFormatError(f"{directory / weights} is not a safetensors index ({err!r})") from None
    state = {}
    for shard, names in sorted(shards.items(), key=lambda item: str(item[0])):
        _check_weight_file(directory, shard)
        if not (directory / shard).is_file():
            raise QuantFormatError(f"{directory / shard} is listed in {weights} but missing")
        with safe_open(directory / shard, framework="pt") as f:
            held = set(f.keys())
            for name in names:
                if name not in held:
                    raise QuantFormatError(f"{weights} places {name} in {shard}, which does not hold it")
                state[name] = f.get_tensor(name)
    return state


def _check_weight_file(directory: Path, name) -> None:
    """Weight files are plain names inside the qckpt directory: never a path elsewhere on the machine."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") or "\0" in name:
        raise QuantFormatError(f"{directory / QUANT_CONFIG_FILE} names weight file {name!r}, not a file of {directory}")
    if not (directory / name).resolve().is_relative_to(directory.resolve()):
        raise QuantFormatError(f"weight file {name!r} of {directory} resolves to {(directory / name).resolve()}")


def load_model(
    directory: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> ErnieForCausalLM:
    """A ckpt (HF layout) or a qckpt (quant_config.json present) directory as a model, in eval mode."""
    if is_quantized_dir(directory):
        return load_quantized(directory, dtype, device)
    from .checkpoint import load_pretrained

    return load_pretrained(directory, dtype, device).eval()


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    keep = name.endswith((".gate.weight", "e_score_correction_bias", ".scales"))
    return tensor if keep else tensor.to(dtype)


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from .checkpoint import state_dict_problems

    problems = state_dict_problems(model, state)
    if problems:
        raise QuantFormatError(f"{source} does not fit its quant_config.json: " + "; ".join(problems))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
